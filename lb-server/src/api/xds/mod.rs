//! xDS: `envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`
//! (state of the world), for Envoy and proxyless gRPC clients.
//!
//! One ADS stream carries LDS, RDS, CDS and EDS for any number of services.
//! Every resource of a service is named by its target (`greeter.default:grpc`),
//! so a proxyless gRPC client needs only `xds:///greeter.default:grpc`; see
//! [`resources`] for what each resource holds and [`session`] for the protocol
//! rules (versions, nonces, ACK/NACK, wildcards, removal).
//!
//! A stream watches the store the way the other APIs do: one subscription per
//! service it names, plus the store's service-set watch while it has a
//! wildcard subscription. It builds each response from the newest state when
//! it is about to send, so a slow client skips intermediate versions. A NACK is
//! logged, counted (`lookaside_xds_nacks_total`) and shown in Admin; it changes
//! nothing for other types or other streams. Delta xDS is not served.

pub mod resources;
pub mod session;

use std::{collections::BTreeSet, pin::Pin, sync::Arc};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::StreamMap;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Request, Status, Streaming, body::Body, codec::BufferSettings, server::NamedService};
use tonic_prost::ProstDecoder;
use tracing::Instrument;

use self::{
    resources::Resources,
    session::{Handled, Outgoing, Reply, Session, View},
};
use super::{
    Answer, BoxFuture, HandWritten, Protocol, Shared, grpc_frame, streaming_response,
    subscribers::SubscriberGuard,
};
use crate::{
    config::XdsLbPolicy,
    model::{ServiceKey, Snapshot},
    store::SnapshotStream,
};

/// The largest xDS request accepted. Larger than for the other APIs: Envoy's
/// EDS request names every cluster it knows (about 40 bytes each).
pub const MAX_XDS_REQUEST_BYTES: usize = 1024 * 1024;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// The ADS service, as a tonic-compatible tower service.
///
/// Written by hand rather than taken from the generated server so that an
/// idle stream keeps no encode buffer and a 512-byte decode buffer, not
/// tonic's 8 KiB each: an ADS stream is mostly idle, and there is one per client.
#[derive(Debug, Clone)]
pub struct XdsApi {
    shared: Shared,
    resources: Resources,
}

impl XdsApi {
    /// The service, ready for `Server::add_service`.
    pub fn server(shared: Shared, lb_policy: XdsLbPolicy) -> HandWritten<Self> {
        HandWritten(Self {
            shared,
            resources: Resources::new(lb_policy),
        })
    }

    /// One `StreamAggregatedResources` stream.
    fn stream(&self, request: Request<Streaming<DiscoveryRequest>>) -> AdsStream {
        let peer = super::peer(&request);
        // A debug span: enabled, it would cost every stream memory and every
        // wake-up an enter and exit. Warnings carry the peer and node themselves.
        let span = tracing::debug_span!("xds", %peer, node = tracing::field::Empty);
        span.in_scope(|| tracing::debug!("ADS stream started"));
        let guard = self
            .shared
            .subscribers
            .register(peer, String::new(), Protocol::Xds);
        guard.record_xds(|_| {});
        let state = StreamState {
            session: Session::new(),
            view: View::default(),
            watches: StreamMap::with_capacity(1),
            service_set: self.shared.store.watch_service_set(),
            watching_set: false,
            inbound: request.into_inner(),
            inbound_open: true,
            guard,
            resources: self.resources.clone(),
            stopped: self.shared.stream_stopped(),
            shared: self.shared.clone(),
            span,
        };
        // Boxed: `unfold` holds the state and the future that owns it side
        // by side, so an inline state would take its room twice.
        Box::pin(futures::stream::unfold(Box::new(state), |state| {
            let span = state.span.clone();
            next_response(state).instrument(span)
        }))
    }
}

impl NamedService for XdsApi {
    const NAME: &'static str = SERVICE;
}

impl Answer for XdsApi {
    fn answer(self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>> {
        Box::pin(async move {
            let path = request.uri().path();
            match path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE)) {
                Some("/StreamAggregatedResources") => {
                    let (parts, body) = request.into_parts();
                    // A small first decode buffer: ACKs are small, and it
                    // grows for an Envoy's long list of names.
                    let decoder =
                        ProstDecoder::<DiscoveryRequest>::new(BufferSettings::new(512, 32 * 1024));
                    let inbound =
                        Streaming::new_request(decoder, body, None, Some(MAX_XDS_REQUEST_BYTES));
                    let request = Request::from_http(http::Request::from_parts(parts, inbound));
                    // Each response encoded into a buffer of its own size,
                    // freed once written: nothing stays with an idle stream.
                    let responses = self
                        .stream(request)
                        .map(|response| response.map(|response| grpc_frame(&response)));
                    streaming_response(responses)
                }
                Some("/DeltaAggregatedResources") => Status::unimplemented(
                    "lb-server serves state-of-the-world ADS only (StreamAggregatedResources)",
                )
                .into_http(),
                _ => Status::unimplemented(format!("no such method in {SERVICE}")).into_http(),
            }
        })
    }
}

type AdsStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// Everything one ADS stream owns.
struct StreamState {
    session: Session,
    view: View,
    /// One store subscription per service the client names.
    watches: StreamMap<ServiceKey, SnapshotStream>,
    /// The store's service-set changes, polled while a wildcard subscription exists.
    service_set: watch::Receiver<u64>,
    watching_set: bool,
    inbound: Streaming<DiscoveryRequest>,
    inbound_open: bool,
    guard: SubscriberGuard,
    resources: Resources,
    /// Shutdown, for this stream.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Shared,
    span: tracing::Span,
}

/// Sends what is owed or changed; otherwise waits for a request, a store
/// change or shutdown.
async fn next_response(
    mut s: Box<StreamState>,
) -> Option<(Result<DiscoveryResponse, Status>, Box<StreamState>)> {
    loop {
        if let Some(outgoing) = s.session.next_response(&s.view, &s.resources) {
            s.sent(&outgoing);
            return Some((Ok(outgoing.response), s));
        }
        tokio::select! {
            biased;
            _ = &mut s.stopped => return None,
            message = s.inbound.message(), if s.inbound_open => match message {
                Ok(Some(request)) => s.handle(&request),
                Ok(None) => s.inbound_open = false,
                Err(status) => {
                    tracing::debug!(%status, "xDS client went away");
                    return None;
                }
            },
            Some((key, snapshot)) = s.watches.next(), if !s.watches.is_empty() => {
                let existence = s.take_snapshot(key, snapshot);
                let more = s.catch_up();
                s.session.view_changed(existence || more);
            }
            changed = s.service_set.changed(), if s.watching_set => {
                if changed.is_ok() {
                    s.refresh_existing();
                    s.catch_up();
                    s.session.view_changed(true);
                }
            }
        }
    }
}

impl StreamState {
    fn handle(&mut self, request: &DiscoveryRequest) {
        let had_node = self.session.node().is_some();
        let handled = self.session.handle(request);
        if !had_node && let Some(node) = self.session.node() {
            self.span.record("node", node.id.as_str());
        }
        match &handled {
            Handled::UnknownType => {
                tracing::debug!(type_url = %request.type_url, "ignoring a type lb-server does not serve");
                self.shared
                    .metrics
                    .rejected
                    .with_label_values(&["xds", "unknown_type"])
                    .inc();
            }
            Handled::Stale { ty } => {
                tracing::debug!(
                    r#type = ty.short(),
                    nonce = %request.response_nonce,
                    "ignoring a request with a stale nonce"
                );
            }
            Handled::Request {
                ty,
                reply,
                names_changed,
            } => {
                if let Reply::Nack(nack) = reply {
                    let node = self.session.node().map(|n| n.id.as_str()).unwrap_or("");
                    tracing::warn!(
                        peer = self.guard.peer(),
                        node,
                        type_url = ty.type_url(),
                        version = %nack.version,
                        nonce = %nack.nonce,
                        code = nack.code,
                        error = %nack.message,
                        "xDS client rejected a response (NACK)"
                    );
                    self.shared
                        .metrics
                        .xds_nacks
                        .with_label_values(&[ty.type_url()])
                        .inc();
                }
                let session = &self.session;
                self.guard.record_xds(|status| {
                    session.record(*ty, Some(reply), *names_changed, status);
                });
                if *names_changed {
                    tracing::debug!(
                        r#type = ty.short(),
                        names = ?self.session.subscribed(*ty),
                        "subscription changed"
                    );
                    self.sync_watches();
                }
            }
        }
    }

    /// Subscribes to every service the client names and drops the rest;
    /// starts or stops following the service set for wildcards.
    fn sync_watches(&mut self) {
        let wanted: BTreeSet<ServiceKey> = self.session.named_services();
        let unwanted: Vec<ServiceKey> = self
            .watches
            .keys()
            .filter(|key| !wanted.contains(*key))
            .cloned()
            .collect();
        for key in unwanted {
            self.watches.remove(&key);
            self.view.snapshots.remove(&key);
        }
        for key in wanted {
            if self.watches.contains_key(&key) {
                continue;
            }
            let mut subscription = self.shared.store.subscribe(&key);
            self.view
                .snapshots
                .insert(key.clone(), subscription.current());
            self.watches.insert(key, subscription.into_stream());
        }
        let wildcard = self.session.has_wildcard();
        if wildcard && !self.watching_set {
            self.refresh_existing();
        } else if !wildcard {
            self.view.existing.clear();
        }
        self.watching_set = wildcard;
    }

    /// Takes in every store change already there, per service and to the
    /// set, so one response covers them all and the set and the services
    /// agree (the store moves both under one lock): CDS then goes out before
    /// the LDS that needs it.
    /// Returns whether a service appeared or disappeared.
    fn catch_up(&mut self) -> bool {
        let mut existence = false;
        while let Some(Some((key, snapshot))) = self.watches.next().now_or_never() {
            existence |= self.take_snapshot(key, snapshot);
        }
        if self.watching_set && self.service_set.has_changed().unwrap_or(false) {
            self.refresh_existing();
            existence = true;
        }
        existence
    }

    /// Stores a service's new snapshot; returns whether it started or stopped existing.
    fn take_snapshot(&mut self, key: ServiceKey, snapshot: Arc<Snapshot>) -> bool {
        let exists = snapshot.exists;
        let before = self.view.snapshots.insert(key, snapshot);
        before.is_none_or(|before| before.exists != exists)
    }

    fn refresh_existing(&mut self) {
        self.service_set.borrow_and_update();
        self.view.existing = self
            .shared
            .store
            .services()
            .into_iter()
            .map(|view| view.key)
            .collect();
    }

    /// Accounts for a response about to be written.
    fn sent(&self, outgoing: &Outgoing) {
        let ty = outgoing.ty;
        tracing::debug!(
            r#type = ty.short(),
            version = %outgoing.response.version_info,
            nonce = %outgoing.response.nonce,
            resources = outgoing.response.resources.len(),
            "sending"
        );
        if outgoing.push {
            self.shared
                .record_push(Protocol::Xds, outgoing.oldest_event);
        }
        if outgoing.store_version > 0 {
            self.guard.sent(outgoing.store_version);
        }
        let session = &self.session;
        self.guard
            .record_xds(|status| session.record(ty, None, false, status));
    }
}
