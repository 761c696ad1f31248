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

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lookaside_proto::lookaside::v1::{MAX_WATCH_RESPONSE_BYTES, WatchRequest};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, body::Body, codec::Streaming, server::NamedService};

use super::{
    BoxFuture, MAX_REQUEST_BYTES, Protocol, RawServer, RawService, Shared, convert, grpc_frame,
    streaming_response, subscribers::SubscriberGuard,
};
use crate::{
    model::{ServiceKey, Snapshot},
    store::SnapshotStream,
};

const WATCH_PATH: &str = "/lookaside.v1.Discovery/Watch";

/// A snapshot as one gRPC message of the Watch response, framed once per
/// snapshot and shared by every subscriber of its service (see
/// [`Snapshot::encoded`]). A snapshot whose message would be over
/// [`MAX_WATCH_RESPONSE_BYTES`] is sent without the endpoints' `pod`, `node`
/// and `zone` (lb-client routes by address, port, weight and draining
/// alone); one still over it is an error, `RESOURCE_EXHAUSTED`, that ends
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
    for endpoint in &mut response.endpoints {
        endpoint.pod = String::new();
        endpoint.node = String::new();
        endpoint.zone = String::new();
    }
    let stripped = prost::Message::encoded_len(&response);
    let endpoints = snapshot.endpoints.len();
    if stripped <= limit {
        tracing::warn!(
            target_key = %key, version = snapshot.version, endpoints, bytes = full, limit,
            "Watch response over the limit: sent without pod, node and zone names"
        );
        return grpc_frame(&response);
    }
    tracing::error!(
        target_key = %key, version = snapshot.version, endpoints, bytes = stripped, limit,
        "Watch response over the limit even without names: not sent"
    );
    Bytes::new()
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
        let mut subscription = self.shared.store.subscribe(&key);
        let guard = self
            .shared
            .subscribers
            .register(peer, key.to_string(), Protocol::Discovery);
        tracing::debug!(target_key = %key, "discovery watch started");
        let current = subscription.current();
        guard.sent(current.version);
        let messages = WatchMessages {
            first: Some(framed(&key, &current)),
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
/// every newer one, each as the shared bytes [`framed`] made (no
/// per-subscriber encoding or copy); they end at shutdown.
struct WatchMessages {
    first: Option<Result<Bytes, Status>>,
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
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match ready!(this.updates.poll_next_unpin(cx)) {
            Some(snapshot) => {
                this.shared
                    .record_push(Protocol::Discovery, Some(snapshot.event_at));
                this.guard.sent(snapshot.version);
                Poll::Ready(Some(framed(&this.key, &snapshot)))
            }
            None => Poll::Ready(None),
        }
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
            endpoints,
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

        // Over it: the same endpoints, without names, within the limit.
        let framed = frame_within(&key, &s, full - 1);
        assert!(framed.len() - 5 < full);
        let sent = WatchResponse::decode(&framed[5..]).unwrap();
        assert_eq!(sent.version, 7);
        assert_eq!(sent.endpoints.len(), 10);
        for (sent, listed) in sent.endpoints.iter().zip(&s.endpoints) {
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
}
