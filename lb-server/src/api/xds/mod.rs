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

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::StreamMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use self::{
    resources::Resources,
    session::{Handled, Outgoing, Reply, Session, View},
};
use super::{Protocol, Shared, subscribers::SubscriberGuard};
use crate::{
    config::XdsLbPolicy,
    model::{ServiceKey, Snapshot},
    store::Subscription,
};

/// The largest xDS request accepted. Larger than for the other APIs: Envoy's
/// EDS request names every cluster it knows (about 40 bytes each).
pub const MAX_XDS_REQUEST_BYTES: usize = 1024 * 1024;

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsApi {
    shared: Shared,
    resources: Resources,
}

impl XdsApi {
    /// Wraps the service for tonic, with the request size limit.
    pub fn server(
        shared: Shared,
        lb_policy: XdsLbPolicy,
    ) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(Self {
            shared,
            resources: Resources::new(lb_policy),
        })
        .max_decoding_message_size(MAX_XDS_REQUEST_BYTES)
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Arc<Snapshot>> + Send>>;
type AdsStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

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
    shared: Shared,
    span: tracing::Span,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsApi {
    type StreamAggregatedResourcesStream = AdsStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<AdsStream>, Status> {
        let peer = super::peer(&request);
        let span = tracing::info_span!("xds", %peer, node = tracing::field::Empty);
        span.in_scope(|| tracing::debug!("ADS stream started"));
        let guard = self
            .shared
            .subscribers
            .register(peer, String::new(), Protocol::Xds);
        guard.record_xds(|_| {});
        let state = StreamState {
            session: Session::new(),
            view: View::default(),
            watches: StreamMap::new(),
            service_set: self.shared.store.watch_service_set(),
            watching_set: false,
            inbound: request.into_inner(),
            inbound_open: true,
            guard,
            resources: self.resources.clone(),
            shared: self.shared.clone(),
            span,
        };
        let stream = futures::stream::unfold(state, |state| {
            let span = state.span.clone();
            next_response(state).instrument(span)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "lb-server serves state-of-the-world ADS only (StreamAggregatedResources)",
        ))
    }
}

/// Sends what is owed or changed; otherwise waits for a request, a store
/// change or shutdown.
async fn next_response(
    mut s: StreamState,
) -> Option<(Result<DiscoveryResponse, Status>, StreamState)> {
    loop {
        if let Some(outgoing) = s.session.next_response(&s.view, &s.resources) {
            s.sent(&outgoing);
            return Some((Ok(outgoing.response), s));
        }
        tokio::select! {
            biased;
            _ = s.shared.shutdown.cancelled() => return None,
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
            self.watches.insert(key, watch_stream(subscription));
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

/// A subscription as a stream of newer snapshots.
fn watch_stream(subscription: Subscription) -> SnapshotStream {
    Box::pin(futures::stream::unfold(
        subscription,
        |mut subscription| async move {
            let snapshot = subscription.next().await;
            Some((snapshot, subscription))
        },
    ))
}
