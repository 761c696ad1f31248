//! `lookaside.v1.Discovery/Watch`: the current snapshot at once, then every newer one.
//!
//! Written by hand rather than generated so that a snapshot is encoded and
//! framed once per version and the same bytes go to every subscriber: with
//! thousands of subscribers per service, per-subscriber message building,
//! encoding or even copying would dominate a push. The response body is ours
//! too (no tonic encoder and its per-stream buffer), since idle subscribers
//! are the common case.
//!
//! No response is larger than [`MAX_WATCH_RESPONSE_BYTES`], the limit
//! lb-client reads from the same constant: a snapshot over it is sent
//! without endpoint names, and one that is over it even so ends the stream
//! with `RESOURCE_EXHAUSTED` (see [`framed`]).
//!
//! A stream that asked for `incremental` updates gets the same full snapshot
//! first, then for each newer version the diff from the version it last sent
//! (see [`incremental`]): a reader that fell behind gets the diff from where
//! it was to the newest, so skipping versions costs nothing. The diff between
//! two versions is made and framed once, and shared like a snapshot: every
//! live reader goes from the same version to the next.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use lookaside_proto::lookaside::v1::{MAX_WATCH_RESPONSE_BYTES, WatchRequest};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, body::Body, codec::Streaming, server::NamedService};

use super::{
    BoxFuture, MAX_REQUEST_BYTES, Protocol, RawServer, RawService, Shared, convert, grpc_frame,
    streaming_response,
    subscribers::SubscriberGuard,
    zones::{Membership, ZoneEntry, ZoneTable},
};
use crate::{
    model::{ServiceKey, Snapshot, TopologyError, check_node, check_zone},
    store::SnapshotStream,
    zones::Shares,
};

const WATCH_PATH: &str = "/lookaside.v1.Discovery/Watch";

/// A snapshot as one gRPC message of the Watch response, framed once per
/// snapshot and shared by every subscriber of its service (see
/// [`Snapshot::encoded`]). A snapshot whose message would be over
/// [`MAX_WATCH_RESPONSE_BYTES`] is sent without the endpoints' `pod` and
/// `node`, and if still over, without `zone` and hints too (lb-client routes
/// by address, port, weight and draining, and by zone and hints when it
/// has them); one still over it is an error, `RESOURCE_EXHAUSTED`, that ends
/// the stream: a client would refuse the message, and a partial list would
/// overload the endpoints it keeps.
pub fn framed(key: &ServiceKey, snapshot: &Snapshot) -> Result<Bytes, Status> {
    let framed = snapshot
        .encoded
        .get_or_init(|| frame_within(key, snapshot, MAX_WATCH_RESPONSE_BYTES))
        .clone();
    // Empty: too large to send (a framed message is never empty).
    if framed.is_empty() {
        return Err(Status::resource_exhausted(format!(
            "{} endpoints of {key} do not fit the largest Watch response, \
             {MAX_WATCH_RESPONSE_BYTES} bytes, even without names",
            snapshot.endpoints.len()
        )));
    }
    Ok(framed)
}

/// The framed Watch response of `snapshot` if it fits `limit` bytes, with
/// names or without; empty bytes if it does not fit even without. Runs once
/// per snapshot, so each warning is logged once, not once per subscriber.
fn frame_within(key: &ServiceKey, snapshot: &Snapshot, limit: usize) -> Bytes {
    let mut response = convert::watch_response(key, snapshot);
    let full = prost::Message::encoded_len(&response);
    if full <= limit {
        return grpc_frame(&response);
    }
    // Zone-aware routing reads `zone` and the hints: drop what no client
    // routes by first, and those only if that is not enough.
    for endpoint in &mut response.endpoints {
        endpoint.pod = String::new();
        endpoint.node = String::new();
    }
    let endpoints = snapshot.endpoints.len();
    let unnamed = prost::Message::encoded_len(&response);
    if unnamed <= limit {
        tracing::warn!(
            target_key = %key, version = snapshot.version, endpoints, bytes = full, limit,
            "Watch response over the limit: sent without pod and node names"
        );
        return grpc_frame(&response);
    }
    for endpoint in &mut response.endpoints {
        endpoint.zone = String::new();
        endpoint.for_zones = Vec::new();
        endpoint.for_nodes = Vec::new();
    }
    let stripped = prost::Message::encoded_len(&response);
    if stripped <= limit {
        tracing::warn!(
            target_key = %key, version = snapshot.version, endpoints, bytes = unnamed, limit,
            "Watch response over the limit: sent without pod, node and zone names and hints"
        );
        return grpc_frame(&response);
    }
    tracing::error!(
        target_key = %key, version = snapshot.version, endpoints, bytes = stripped, limit,
        "Watch response over the limit even without names: not sent"
    );
    Bytes::new()
}

/// What an incremental stream that last sent `base` sends for `snapshot`:
/// the diff from `base`, made and framed once per pair of versions and
/// shared by every stream going from one to the other (see
/// [`Snapshot::diffs`]), or the full snapshot as [`framed`] sends it when a
/// diff cannot be sent: the service started or stopped existing, the diff
/// would not be smaller, or it is over [`MAX_WATCH_RESPONSE_BYTES`].
pub fn incremental(
    key: &ServiceKey,
    base: &Snapshot,
    snapshot: &Snapshot,
) -> Result<Bytes, Status> {
    let diff = snapshot
        .diffs
        .entry(base.version)
        .get_or_init(|| diff_within(key, base, snapshot, MAX_WATCH_RESPONSE_BYTES))
        .clone();
    match diff {
        Some(diff) => Ok(diff),
        None => framed(key, snapshot),
    }
}

/// The framed diff from `base` to `snapshot` if one should be sent and fits
/// `limit` bytes; `None` for the full snapshot instead. Both lists are sorted
/// by address and port, so the diff is one merge of the two.
fn diff_within(
    key: &ServiceKey,
    base: &Snapshot,
    snapshot: &Snapshot,
    limit: usize,
) -> Option<Bytes> {
    use std::cmp::Ordering;
    if base.exists != snapshot.exists {
        return None;
    }
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    // What the full snapshot would take for the endpoints the diff leaves out.
    let mut kept_len = 0;
    let (mut old, mut new) = (
        base.endpoints.iter().peekable(),
        snapshot.endpoints.iter().peekable(),
    );
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(o), Some(n)) => (o.address, o.port).cmp(&(n.address, n.port)),
        };
        match order {
            Ordering::Less => removed.extend(old.next()),
            Ordering::Greater => changed.extend(new.next()),
            Ordering::Equal => {
                let (o, n) = (old.next()?, new.next()?);
                if o == n {
                    kept_len += convert::endpoint_len_in_response(n);
                } else {
                    changed.push(n);
                }
            }
        }
    }
    let nothing = changed.is_empty() && removed.is_empty();
    let response = convert::diff_response(key, base.version, snapshot, changed, removed);
    // Beside the endpoints both carry, a diff has the removed keys and its
    // base where the snapshot has the kept endpoints. A diff of nothing is
    // sent as such even so (a shares-only update, or an empty list).
    let diff_only = prost::encoding::message::encoded_len_repeated(7, &response.removed)
        + prost::encoding::bool::encoded_len(5, &true)
        + prost::encoding::uint64::encoded_len(6, &response.base_version);
    if !nothing && diff_only >= kept_len {
        return None;
    }
    (prost::Message::encoded_len(&response) <= limit).then(|| grpc_frame(&response))
}

/// The Discovery service, as a tonic-compatible tower service.
#[derive(Debug, Clone)]
pub struct DiscoveryApi {
    shared: Shared,
}

impl DiscoveryApi {
    /// The service, ready for `Server::add_service`.
    pub fn server(shared: Shared) -> RawServer<Self> {
        RawServer(Self { shared })
    }

    /// Reads the one `WatchRequest`, then answers with headers and a body
    /// that streams snapshots.
    async fn watch(self, request: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let (parts, body) = request.into_parts();
        let peer = super::peer(&tonic::Request::from_http(http::Request::from_parts(
            parts,
            (),
        )));
        let decoder = tonic_prost::ProstDecoder::<WatchRequest>::default();
        let mut requests = Streaming::new_request(decoder, body, None, Some(MAX_REQUEST_BYTES));
        let request = requests
            .message()
            .await
            .map_err(|status| self.shared.request_error("discovery", status))?
            .ok_or_else(|| Status::invalid_argument("Watch needs a WatchRequest message"))?;
        let key = self.shared.parse_target("discovery", &request.target)?;
        check_topology(&self.shared, &request)?;
        if !self.shared.synced().await {
            return Err(Shared::not_synced());
        }
        let mut subscription = self.shared.store.subscribe(&key);
        let guard = self
            .shared
            .subscribers
            .register(peer, key.to_string(), Protocol::Discovery);
        tracing::debug!(target_key = %key, "discovery watch started");
        let current = subscription.current();
        guard.sent(current.version);
        let mut zones = ZoneStream::join(&self.shared, &key, &request.zone, &guard, &current);
        let first = match &mut zones {
            Some(zones) => zones.wrap(framed(&key, &current), &current, &guard),
            None => framed(&key, &current),
        };
        let messages = WatchMessages {
            first: Some(first),
            zones,
            sent: request.incremental.then_some(current),
            key,
            updates: subscription.into_stream(),
            guard,
            stopped: self.shared.stream_stopped(),
            shared: self.shared,
        };
        Ok(streaming_response(messages))
    }
}

/// The messages of one Watch response: the current snapshot at once, then
/// every newer one (or the diff to it), each as the shared bytes [`framed`]
/// or [`incremental`] made (no per-subscriber encoding or copy); they end at
/// shutdown.
struct WatchMessages {
    first: Option<Result<Bytes, Status>>,
    /// On a stream that asked for incremental updates, the snapshot it sent
    /// last: the base of the next diff.
    sent: Option<Arc<Snapshot>>,
    /// Zone shares, on a stream whose client named its zone.
    zones: Option<ZoneStream>,
    key: ServiceKey,
    updates: SnapshotStream,
    guard: SubscriberGuard,
    /// Shutdown, for this stream.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Shared,
}

impl Stream for WatchMessages {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        // The rest of a message with zone shares (the first one's too):
        // never cut by shutdown.
        if let Some(chunk) = this.zones.as_mut().and_then(|z| z.queued.pop_front()) {
            return Poll::Ready(Some(Ok(chunk)));
        }
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let update = match this.updates.poll_next_unpin(cx) {
            Poll::Ready(update) => update,
            Poll::Pending => return this.poll_shares(cx).map(Some),
        };
        match update {
            Some(snapshot) => {
                this.shared
                    .record_push(Protocol::Discovery, Some(snapshot.event_at));
                this.guard.sent(snapshot.version);
                let message = this.message(Arc::clone(&snapshot));
                Poll::Ready(Some(match &mut this.zones {
                    Some(zones) => zones.wrap(message, &snapshot, &this.guard),
                    None => message,
                }))
            }
            None => Poll::Ready(None),
        }
    }
}

impl WatchMessages {
    /// `snapshot` as this stream sends it: whole, or as the diff from the
    /// snapshot it sent last if it asked for incremental updates.
    fn message(&mut self, snapshot: Arc<Snapshot>) -> Result<Bytes, Status> {
        match &mut self.sent {
            None => framed(&self.key, &snapshot),
            Some(sent) => {
                let message = incremental(&self.key, sent, &snapshot);
                *sent = snapshot;
                message
            }
        }
    }
}

impl WatchMessages {
    /// New zone shares for this stream's zone with the version unchanged
    /// (see [`crate::api::zones`]): the last message again with the new
    /// shares, or on an incremental stream an empty diff. Pending when there
    /// are none, or when a newer version, which carries its own, is on its way.
    fn poll_shares(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, Status>> {
        let Some(zones) = &mut self.zones else {
            return Poll::Pending;
        };
        loop {
            let Some(table) = ready!(zones.changes.poll_next_unpin(cx)) else {
                return Poll::Pending;
            };
            if table.version != zones.last.version {
                continue;
            }
            let Some(entry) = zones.membership.entry_in(&table) else {
                continue;
            };
            if zones.sent.as_ref().is_some_and(|s| Arc::ptr_eq(s, &entry)) {
                continue;
            }
            let body = match &self.sent {
                Some(sent) => incremental(&self.key, sent, sent),
                None => framed(&self.key, &zones.last),
            };
            self.shared.record_push(Protocol::Discovery, None);
            return Poll::Ready(body.map(|body| zones.append(body, entry, &self.guard)));
        }
    }
}

/// Checks the client's zone and node as Kubernetes names them (a label
/// value, a DNS subdomain; empty: unknown): a name no endpoint can have is a
/// client's mistake, `INVALID_ARGUMENT`, counted as
/// `rejected_requests_total{api="discovery",reason="bad_zone"|"bad_node"|"too_long"}`.
/// The message quotes the name escaped, and only once it is known to be short.
fn check_topology(shared: &Shared, request: &WatchRequest) -> Result<(), Status> {
    type Check = fn(&str) -> Result<(), TopologyError>;
    let checks: [(Check, &str, &str); 2] = [
        (check_zone, &request.zone, "bad_zone"),
        (check_node, &request.node, "bad_node"),
    ];
    for (check, value, reason) in checks {
        if let Err(error) = check(value) {
            let reason = match error {
                TopologyError::TooLong { .. } => "too_long",
                TopologyError::BadName { .. } => reason,
            };
            shared
                .metrics
                .rejected
                .with_label_values(&["discovery", reason])
                .inc();
            return Err(Status::invalid_argument(format!(
                "invalid WatchRequest: {error}"
            )));
        }
    }
    Ok(())
}

/// Zone shares on one stream: the subscriber counted in its zone, the
/// changes of its service's shares, and what it last sent. A message with
/// shares goes out as three chunks (its gRPC prefix, the shared encoding of
/// the snapshot or diff, the shared encoding of its zone's shares): protobuf
/// reads concatenated messages as one, so nothing is encoded or copied per
/// subscriber but five bytes.
struct ZoneStream {
    membership: Membership,
    changes: WatchStream<Arc<ZoneTable>>,
    /// The shares last sent.
    sent: Option<Arc<ZoneEntry>>,
    /// The snapshot last sent: the body of a shares-only message.
    last: Arc<Snapshot>,
    /// The chunks of a message still to send (at most two).
    queued: VecDeque<Bytes>,
}

impl ZoneStream {
    /// Counts the subscriber in `zone` (recorded for Admin too); `None` if
    /// the client named no zone: it gets no shares and counts nowhere.
    fn join(
        shared: &Shared,
        key: &ServiceKey,
        zone: &str,
        guard: &SubscriberGuard,
        current: &Arc<Snapshot>,
    ) -> Option<Self> {
        if zone.is_empty() {
            return None;
        }
        guard.info().set_zone(zone);
        let membership = shared.subscribers.zones().join(key, zone);
        Some(Self {
            changes: membership.changes(),
            membership,
            sent: None,
            last: Arc::clone(current),
            queued: VecDeque::new(),
        })
    }

    /// `message`, the framed message for `snapshot`, with this zone's shares.
    fn wrap(
        &mut self,
        message: Result<Bytes, Status>,
        snapshot: &Arc<Snapshot>,
        guard: &SubscriberGuard,
    ) -> Result<Bytes, Status> {
        self.last = Arc::clone(snapshot);
        let entry = self.membership.entry_for(snapshot);
        message.map(|framed| self.append(framed, entry, guard))
    }

    /// The first chunk of `framed` with `entry`'s shares appended; the rest
    /// is queued. Without shares, or if they would take the message over
    /// [`MAX_WATCH_RESPONSE_BYTES`], `framed` as it is.
    fn append(&mut self, framed: Bytes, entry: Arc<ZoneEntry>, guard: &SubscriberGuard) -> Bytes {
        let len = framed.len() - 5 + entry.encoded.len();
        let fits = len <= MAX_WATCH_RESPONSE_BYTES;
        if !self.sent.as_ref().is_some_and(|s| Arc::ptr_eq(s, &entry)) {
            let none: Shares = Arc::from([]);
            guard.sent_shares(if fits { &entry.shares } else { &none });
        }
        self.sent = Some(Arc::clone(&entry));
        if entry.encoded.is_empty() || !fits {
            return framed;
        }
        let mut prefix = BytesMut::with_capacity(5);
        prefix.put_u8(0);
        prefix.put_u32(u32::try_from(len).expect("under the limit"));
        self.queued.push_back(framed.slice(5..));
        self.queued.push_back(entry.encoded.clone());
        prefix.freeze()
    }
}

impl NamedService for DiscoveryApi {
    const NAME: &'static str = "lookaside.v1.Discovery";
}

impl RawService for DiscoveryApi {
    fn respond(self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>> {
        Box::pin(async move {
            if request.uri().path() != WATCH_PATH {
                return Status::unimplemented("no such method in lookaside.v1.Discovery")
                    .into_http();
            }
            self.watch(request)
                .await
                .unwrap_or_else(|status| status.into_http())
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use lookaside_proto::lookaside::v1::WatchResponse;

    use crate::model::{Endpoint, parse_target};

    /// An endpoint with the longest names Kubernetes allows.
    fn longest(i: u16) -> Endpoint {
        let address = format!("ffff:ffff:ffff:ffff:ffff:ffff:ffff:{i:x}");
        Endpoint::new(address.parse().unwrap(), u16::MAX)
            .weight(u32::MAX)
            .pod("p".repeat(253))
            .node("n".repeat(253))
            .zone("z".repeat(63))
            .draining()
    }

    fn snapshot(endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            version: 7,
            exists: true,
            endpoints: endpoints.into(),
            ..Snapshot::unknown()
        }
    }

    #[test]
    fn the_limit_holds_26_000_endpoints_with_the_longest_kubernetes_names() {
        let key = parse_target("a-service.a-namespace:grpc").unwrap();
        let one = convert::watch_response(&key, &snapshot(vec![longest(1)])).encoded_len();
        let none = convert::watch_response(&key, &snapshot(Vec::new())).encoded_len();
        // The canonical IPv6 text is 39 characters; the documented bound
        // allows the 45 of the mixed IPv4 form too.
        assert!(one - none + 6 < 640, "{} bytes per endpoint", one - none);
        const { assert!(MAX_WATCH_RESPONSE_BYTES / 640 > 26_000) };
        // With a zone hint and a node hint of the longest names.
        let hinted = longest(1)
            .for_zones(["z".repeat(63)])
            .for_nodes(["n".repeat(253)]);
        let one = convert::watch_response(&key, &snapshot(vec![hinted])).encoded_len();
        assert!(one - none + 6 < 1_000, "{} bytes per endpoint", one - none);
        const { assert!(MAX_WATCH_RESPONSE_BYTES / 1_000 > 16_000) };
    }

    #[test]
    fn a_snapshot_over_the_limit_is_sent_without_names_or_not_at_all() {
        let key = parse_target("a-service.a-namespace:grpc").unwrap();
        let endpoints: Vec<_> = (0..10).map(longest).collect();
        let s = snapshot(endpoints);
        let full = convert::watch_response(&key, &s).encoded_len();

        // Within the limit: every name is sent.
        let framed = frame_within(&key, &s, full);
        let sent = WatchResponse::decode(&framed[5..]).unwrap();
        assert_eq!(sent, convert::watch_response(&key, &s));

        // Over it by little: without pod and node, with zone and hints.
        let hinted: Vec<_> = (0..10)
            .map(|i| longest(i).for_zones(["z".repeat(63)]))
            .collect();
        let h = snapshot(hinted);
        let h_full = convert::watch_response(&key, &h).encoded_len();
        let sent = WatchResponse::decode(&frame_within(&key, &h, h_full - 1)[5..]).unwrap();
        assert!(sent.endpoints.iter().all(|e| e.pod.is_empty()
            && e.node.is_empty()
            && e.zone.len() == 63
            && e.for_zones == ["z".repeat(63)]));

        // Over it: the same endpoints, without names, within the limit.
        let framed = frame_within(&key, &s, 100 * 10);
        assert!(framed.len() - 5 < full);
        let sent = WatchResponse::decode(&framed[5..]).unwrap();
        assert_eq!(sent.version, 7);
        assert_eq!(sent.endpoints.len(), 10);
        for (sent, listed) in sent.endpoints.iter().zip(s.endpoints.iter()) {
            assert_eq!(sent.address, listed.address.to_string());
            assert_eq!(
                (sent.port, sent.weight, sent.draining),
                (u32::from(listed.port), listed.weight, true)
            );
            assert!(sent.pod.is_empty() && sent.node.is_empty() && sent.zone.is_empty());
        }

        // Over it even so: nothing (and `framed` says why).
        assert!(frame_within(&key, &s, 100).is_empty());
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint::new(format!("10.0.0.{last}").parse().unwrap(), 8080).pod(format!("pod-{last}"))
    }

    fn at(version: u64, endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            version,
            ..snapshot(endpoints)
        }
    }

    fn decode(framed: &Bytes) -> WatchResponse {
        WatchResponse::decode(&framed[5..]).unwrap()
    }

    #[test]
    fn a_diff_carries_what_changed_and_only_that() {
        let key = parse_target("a.ns:grpc").unwrap();
        let base = at(3, (1..=20).map(ep).collect());
        let mut endpoints: Vec<_> = (2..=20).map(ep).collect();
        endpoints[4] = ep(6).weight(9);
        endpoints.push(ep(30));
        let new = at(8, endpoints);

        let sent = decode(&incremental(&key, &base, &new).unwrap());
        assert!(sent.incremental && sent.exists);
        assert_eq!((sent.base_version, sent.version), (3, 8));
        assert_eq!(sent.target, "a.ns:grpc");
        let changed: Vec<_> = sent
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.weight))
            .collect();
        assert_eq!(changed, [("10.0.0.6", 9), ("10.0.0.30", 1)]);
        assert_eq!(
            sent.endpoints[1],
            convert::endpoint(&ep(30)),
            "whole records"
        );
        let removed: Vec<_> = sent
            .removed
            .iter()
            .map(|k| (k.address.as_str(), k.port))
            .collect();
        assert_eq!(removed, [("10.0.0.1", 8080)]);

        // Made once: the next stream going from 3 to 8 gets the same bytes.
        let again = incremental(&key, &base, &new).unwrap();
        assert_eq!(
            again.as_ptr(),
            incremental(&key, &base, &new).unwrap().as_ptr()
        );
        // No change at all (a shares-only update) is an empty diff.
        let same = decode(&incremental(&key, &new, &new).unwrap());
        assert!(same.incremental && same.endpoints.is_empty() && same.removed.is_empty());
        assert_eq!((same.base_version, same.version), (8, 8));
    }

    #[test]
    fn a_full_snapshot_goes_when_a_diff_cannot_or_should_not() {
        let key = parse_target("a.ns:grpc").unwrap();
        let full = |s: &Snapshot| framed(&key, s).unwrap();
        let base = at(3, (1..=10).map(ep).collect());

        // Everything replaced: the diff would be larger than the list.
        let replaced = at(4, (11..=20).map(ep).collect());
        assert_eq!(
            incremental(&key, &base, &replaced).unwrap(),
            full(&replaced)
        );
        // Nine of ten removed: the removed keys outweigh what is kept.
        let shrunk = at(5, vec![ep(1)]);
        assert_eq!(incremental(&key, &base, &shrunk).unwrap(), full(&shrunk));
        // One of ten removed: a diff.
        let one_less = at(6, (2..=10).map(ep).collect());
        assert!(decode(&incremental(&key, &base, &one_less).unwrap()).incremental);

        // The service stopped, or started, existing.
        let gone = Snapshot {
            version: 7,
            ..Snapshot::unknown()
        };
        assert_eq!(incremental(&key, &base, &gone).unwrap(), full(&gone));
        assert_eq!(incremental(&key, &gone, &base).unwrap(), full(&base));

        // Over the limit: none (the full snapshot's own limit applies).
        let just = diff_within(&key, &base, &one_less, usize::MAX).unwrap();
        assert!(diff_within(&key, &base, &one_less, just.len() - 5).is_some());
        assert!(diff_within(&key, &base, &one_less, just.len() - 6).is_none());
    }

    #[test]
    fn the_length_of_an_endpoint_is_what_it_takes_in_a_response() {
        for endpoint in [
            ep(1),
            longest(7),
            Endpoint::new("::".parse().unwrap(), 1),
            ep(200).zone("z").node("n").draining(),
            ep(3)
                .zone("z")
                .for_zones(["z", "zone-b"])
                .for_nodes(["node-1"]),
            ep(4).for_zones([""; 0]).for_nodes(["n".repeat(200)]),
        ] {
            let one = WatchResponse {
                endpoints: vec![convert::endpoint(&endpoint)],
                ..Default::default()
            };
            assert_eq!(
                convert::endpoint_len_in_response(&endpoint),
                one.encoded_len(),
                "{endpoint:?}"
            );
        }
    }
}
