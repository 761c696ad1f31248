//! xDS: `envoy.service.discovery.v3.AggregatedDiscoveryService`, both
//! `StreamAggregatedResources` (state of the world, for proxyless gRPC and
//! Envoy) and `DeltaAggregatedResources` (incremental, for Envoy's
//! `DELTA_GRPC`).
//!
//! One ADS stream carries LDS, RDS, CDS and EDS for any number of services.
//! Every resource of a service is named by its target (`greeter.default:grpc`),
//! so a proxyless gRPC client needs only `xds:///greeter.default:grpc`; see
//! [`resources`] for what each resource holds, [`session`] for the protocol
//! rules of state of the world (versions, nonces, ACK/NACK, wildcards,
//! removal) and [`delta`] for those of delta xDS (per-resource versions that
//! never match across a restart, subscribe/unsubscribe, `removed_resources`,
//! `initial_resource_versions`).
//!
//! Both kinds of stream run the one loop below, generic over the session
//! ([`XdsSession`]): the same store watches, limits and NACK accounting. Both
//! sessions are an [`ads::Ads`], which keeps the per-type bookkeeping once
//! (subscriptions, versions, nonces, ACK and NACK, what is owed) and builds
//! responses; each protocol's module says only where its rules differ.
//!
//! A stream watches the store the way the other APIs do: one subscription per
//! service it names, plus the store's service-set watch while it has a
//! wildcard subscription. It builds each response from the newest state when
//! it is about to send, so a slow client skips intermediate versions. A NACK is
//! counted (`lookaside_xds_nacks_total`), shown in Admin and logged, the log
//! rate-limited; it changes nothing for other types or other streams.
//!
//! # Limits
//! One stream's work is bounded per request and over time, so a client
//! cannot keep a core busy or flood the log (each hit is counted):
//! - a request is at most [`MAX_XDS_REQUEST_BYTES`] and names at most
//!   [`MAX_XDS_NAMES_PER_REQUEST`] resources (for delta: subscribed,
//!   unsubscribed and initial versions together); a larger one ends the stream
//!   with `RESOURCE_EXHAUSTED` (`rejected_requests_total{reason="too_many_names"}`);
//! - requests are read at most [`XDS_REQUEST_BURST`] at once, then
//!   [`XDS_REQUESTS_PER_SECOND`] (one that changes the subscription counts
//!   one more per [`XDS_NAMES_PER_EXTRA_REQUEST`] names it carries); beyond that the stream's next request is
//!   left unread until the budget refills, so HTTP/2 flow control holds the
//!   client back (`rejected_requests_total{reason="rate_limited"}` counts the
//!   requests that waited); responses keep flowing meanwhile;
//! - a NACK is logged at most once per [`NACK_LOG_PERIOD`] per stream and
//!   [`NACK_LOG_BURST`] then [`NACK_LOGS_PER_SECOND`] over the process; each
//!   logged line says how many of its stream's NACKs were not logged since
//!   the last one (`lookaside_suppressed_logs_total{event="xds_nack"}` counts
//!   them). Client text in a log line is cut and escaped ([`client_text`](super::client_text)).
//!
//! Handling a request costs time linear in its names: each name is a
//! binary search or a hash lookup, and a store subscription only when it
//! is new; a store change wakes only the watch of its service.

pub mod ads;
pub mod delta;
pub mod resources;
pub mod session;
mod sorted_map;
#[cfg(test)]
mod test_support;

use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::{
    FutureExt, Stream, StreamExt,
    future::OptionFuture,
    stream::{AbortHandle, Abortable, SelectAll},
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Request, Status, Streaming, body::Body, codec::BufferSettings, server::NamedService};
use tonic_prost::ProstDecoder;
use tracing::Instrument;

use self::{
    delta::DeltaSession,
    resources::{ResourceType, Resources},
    session::{Handled, NodeInfo, Outgoing, Reply, Session, View},
};
use super::{
    BoxFuture, Protocol, RawServer, RawService, Shared,
    client_text::loggable,
    grpc_frame,
    rate::TokenBucket,
    streaming_response,
    subscribers::{SubscriberGuard, XdsNack},
};
use crate::{
    model::{ServiceKey, Snapshot},
    store::SnapshotStream,
};

/// The largest xDS request accepted. Larger than for the other APIs: Envoy's
/// EDS request names every cluster it knows. Room for
/// [`MAX_XDS_NAMES_PER_REQUEST`] names of about 100 bytes each (a target is
/// at most 255 bytes, a typical one under 40).
pub const MAX_XDS_REQUEST_BYTES: usize = 1024 * 1024;

/// The most resource names one xDS request may carry. An Envoy's EDS request
/// names every cluster it knows, and with wildcard CDS that is every service
/// lb-server watches: ten thousand is more than a cluster-wide lb-server
/// serves in practice (scope a larger one with `--namespace`), and bounds
/// what one stream holds (a store subscription per name) and what one
/// request costs.
pub const MAX_XDS_NAMES_PER_REQUEST: usize = 10_000;

/// Requests an ADS stream may send at once before [`XDS_REQUESTS_PER_SECOND`]
/// applies. A client's start-up takes a handful (one per type, then an ACK
/// per response); the rest is room for bursts of changes.
pub const XDS_REQUEST_BURST: u32 = 100;

/// Requests per second an ADS stream may send over time, after its burst. A
/// client sends about one per response it gets (its ACK), and responses
/// follow store changes, coalesced per stream. Requests beyond the rate wait
/// unread; responses do not wait for them.
pub const XDS_REQUESTS_PER_SECOND: f64 = 20.0;

/// A request that changes a stream's subscription costs one more request
/// of [`XDS_REQUESTS_PER_SECOND`] per this many names it carries: a change
/// re-reads every name (parsing, one store subscription per new one), so
/// its cost grows with them, while an ACK of the same names is cheap.
pub const XDS_NAMES_PER_EXTRA_REQUEST: usize = 1_000;

/// At most one NACK warning per stream in this period.
pub const NACK_LOG_PERIOD: Duration = Duration::from_secs(10);

/// NACK warnings the whole process may write at once (many clients
/// rejecting one bad update), before [`NACK_LOGS_PER_SECOND`] applies.
pub const NACK_LOG_BURST: u32 = 20;

/// NACK warnings per second over the whole process, after its burst.
pub const NACK_LOGS_PER_SECOND: f64 = 2.0;

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
    /// NACK warnings over all streams.
    nack_logs: Arc<Mutex<TokenBucket>>,
}

impl XdsApi {
    /// The service, ready for `Server::add_service`, serving what `resources` builds.
    pub fn server(shared: Shared, resources: Resources) -> RawServer<Self> {
        RawServer(Self {
            shared,
            resources,
            nack_logs: Arc::new(Mutex::new(TokenBucket::new(
                NACK_LOG_BURST,
                NACK_LOGS_PER_SECOND,
                Instant::now(),
            ))),
        })
    }

    /// One ADS stream, of state of the world or delta.
    fn stream<S: XdsSession>(&self, request: Request<Streaming<S::Request>>) -> AdsStream<S> {
        let peer = super::peer(&request);
        // A debug span: enabled, it would cost every stream memory and every
        // wake-up an enter and exit. Warnings carry the peer and node themselves.
        let span = tracing::debug_span!("xds", %peer, node = tracing::field::Empty);
        span.in_scope(|| tracing::debug!(method = S::METHOD, "ADS stream started"));
        let guard = self
            .shared
            .subscribers
            .register(peer, String::new(), Protocol::Xds);
        guard.record_xds(|_| {});
        let now = Instant::now();
        let state = StreamState {
            session: S::default(),
            view: View::default(),
            watches: Watches::default(),
            service_set: self.shared.store.watch_service_set(),
            watching_set: false,
            synced: self.shared.is_synced(),
            inbound: request.into_inner(),
            inbound_open: true,
            requests: TokenBucket::new(XDS_REQUEST_BURST, XDS_REQUESTS_PER_SECOND, now),
            nack_log: TokenBucket::every(1, NACK_LOG_PERIOD, now),
            nack_logs: self.nack_logs.clone(),
            nacks_not_logged: 0,
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

impl XdsApi {
    fn serve<S: XdsSession>(&self, request: http::Request<Body>) -> http::Response<Body> {
        let (parts, body) = request.into_parts();
        // A small first decode buffer: ACKs are small, and it
        // grows for an Envoy's long list of names.
        let decoder = ProstDecoder::<S::Request>::new(BufferSettings::new(512, 32 * 1024));
        let inbound = Streaming::new_request(decoder, body, None, Some(MAX_XDS_REQUEST_BYTES));
        let request = Request::from_http(http::Request::from_parts(parts, inbound));
        // Each response encoded into a buffer of its own size,
        // freed once written: nothing stays with an idle stream.
        let responses = self
            .stream::<S>(request)
            .map(|response| response.map(|response| grpc_frame(&response)));
        streaming_response(responses)
    }
}

/// What the stream loop needs of a protocol session: [`Session`] (state of
/// the world) or [`DeltaSession`]. One loop, one set of limits, one NACK
/// accounting for both.
pub(crate) trait XdsSession: Default + Send + 'static {
    /// What the client sends.
    type Request: prost::Message + Default + Send + 'static;
    /// What the server sends.
    type Response: prost::Message + Send + 'static;
    /// The RPC's name, for logs.
    const METHOD: &'static str;
    /// How many resource names a request carries.
    fn names_in(request: &Self::Request) -> usize;
    /// A request's type URL.
    fn type_url(request: &Self::Request) -> &str;
    /// A request's response nonce.
    fn response_nonce(request: &Self::Request) -> &str;
    /// A response's version, nonce and number of resources, for logs.
    fn summary(response: &Self::Response) -> (&str, &str, usize);
    /// Applies one request.
    fn handle(&mut self, request: &Self::Request) -> Handled;
    /// The node of the client's first request that had one.
    fn node(&self) -> Option<&NodeInfo>;
    /// See [`Session::view_changed`].
    fn view_changed(&mut self, existence: bool);
    /// See [`Session::next_response`].
    fn next_response(
        &mut self,
        view: &View,
        resources: &Resources,
    ) -> Option<Outgoing<Self::Response>>;
    /// See [`Session::named_services`].
    fn named_services(&self) -> BTreeSet<ServiceKey>;
    /// See [`Session::has_wildcard`].
    fn has_wildcard(&self) -> bool;
    /// See [`Session::subscribed`].
    fn subscribed(&self, ty: ResourceType) -> Vec<String>;
    /// See [`Session::record`].
    fn record(
        &self,
        ty: ResourceType,
        handled: Option<&Reply>,
        names_changed: bool,
        status: &mut crate::api::subscribers::XdsStatus,
    );
}

/// Implements [`XdsSession`] by the session's inherent methods of the same names.
macro_rules! xds_session {
    ($session:ty, $request:ty, $response:ty, $method:literal,
     names_in: |$request_:ident| $names_in:expr,
     summary: |$response_:ident| $summary:expr) => {
        impl XdsSession for $session {
            type Request = $request;
            type Response = $response;
            const METHOD: &'static str = $method;
            fn names_in($request_: &Self::Request) -> usize {
                $names_in
            }
            fn type_url(request: &Self::Request) -> &str {
                &request.type_url
            }
            fn response_nonce(request: &Self::Request) -> &str {
                &request.response_nonce
            }
            fn summary($response_: &Self::Response) -> (&str, &str, usize) {
                $summary
            }
            fn handle(&mut self, request: &Self::Request) -> Handled {
                <$session>::handle(self, request)
            }
            fn node(&self) -> Option<&NodeInfo> {
                <$session>::node(self)
            }
            fn view_changed(&mut self, existence: bool) {
                <$session>::view_changed(self, existence)
            }
            fn next_response(
                &mut self,
                view: &View,
                resources: &Resources,
            ) -> Option<Outgoing<Self::Response>> {
                <$session>::next_response(self, view, resources)
            }
            fn named_services(&self) -> BTreeSet<ServiceKey> {
                <$session>::named_services(self)
            }
            fn has_wildcard(&self) -> bool {
                <$session>::has_wildcard(self)
            }
            fn subscribed(&self, ty: ResourceType) -> Vec<String> {
                <$session>::subscribed(self, ty)
            }
            fn record(
                &self,
                ty: ResourceType,
                handled: Option<&Reply>,
                names_changed: bool,
                status: &mut crate::api::subscribers::XdsStatus,
            ) {
                <$session>::record(self, ty, handled, names_changed, status)
            }
        }
    };
}

xds_session!(
    Session,
    DiscoveryRequest,
    DiscoveryResponse,
    "StreamAggregatedResources",
    names_in: |request| request.resource_names.len(),
    summary: |response| (
        response.version_info.as_str(),
        response.nonce.as_str(),
        response.resources.len()
    )
);

xds_session!(
    DeltaSession,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    "DeltaAggregatedResources",
    names_in: |request| DeltaSession::names_in(request),
    summary: |response| (
        response.system_version_info.as_str(),
        response.nonce.as_str(),
        response.resources.len() + response.removed_resources.len()
    )
);

impl NamedService for XdsApi {
    const NAME: &'static str = SERVICE;
}

impl RawService for XdsApi {
    fn respond(self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>> {
        Box::pin(async move {
            let path = request.uri().path();
            match path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE)) {
                Some("/StreamAggregatedResources") => self.serve::<Session>(request),
                Some("/DeltaAggregatedResources") => self.serve::<DeltaSession>(request),
                _ => Status::unimplemented(format!("no such method in {SERVICE}")).into_http(),
            }
        })
    }
}

type AdsStream<S> = Pin<Box<dyn Stream<Item = Result<<S as XdsSession>::Response, Status>> + Send>>;

/// Everything one ADS stream owns.
struct StreamState<S: XdsSession> {
    session: S,
    view: View,
    /// One store subscription per service the client names.
    watches: Watches,
    /// The store's service-set changes, polled while a wildcard subscription exists.
    service_set: watch::Receiver<u64>,
    watching_set: bool,
    /// Whether the source had synced when last looked at: until it has, the
    /// stream reads requests and follows the store but sends nothing (see
    /// [`Shared::synced`]).
    synced: bool,
    inbound: Streaming<S::Request>,
    inbound_open: bool,
    /// Requests read, against [`XDS_REQUESTS_PER_SECOND`].
    requests: TokenBucket,
    /// This stream's NACK warnings, against [`NACK_LOG_PERIOD`].
    nack_log: TokenBucket,
    /// Every stream's NACK warnings.
    nack_logs: Arc<Mutex<TokenBucket>>,
    /// NACKs since the last one logged.
    nacks_not_logged: u64,
    guard: SubscriberGuard,
    resources: Resources,
    /// Shutdown, for this stream.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Shared,
    span: tracing::Span,
}

/// Sends what is owed or changed; otherwise waits for a request, a store
/// change or shutdown.
async fn next_response<S: XdsSession>(
    mut s: Box<StreamState<S>>,
) -> Option<(Result<S::Response, Status>, Box<StreamState<S>>)> {
    loop {
        if s.synced
            && let Some(outgoing) = s.session.next_response(&s.view, &s.resources)
        {
            s.sent(&outgoing);
            return Some((Ok(outgoing.response), s));
        }
        // While the request budget is spent, requests stay unread: HTTP/2
        // flow control then holds the client back, and nothing queues here.
        let budget_back = if s.inbound_open {
            s.requests.next_token(Instant::now())
        } else {
            None
        };
        let syncing = (!s.synced).then(|| {
            let shared = s.shared.clone();
            async move { shared.synced().await }
        });
        tokio::select! {
            biased;
            _ = &mut s.stopped => return None,
            Some(synced) = OptionFuture::from(syncing) => {
                if !synced {
                    return None;
                }
                // What the stream saw before is the store before its first
                // list: read it all again.
                s.synced = true;
                s.refresh_existing();
                s.catch_up();
                s.session.view_changed(true);
            }
            message = s.inbound.message(), if s.inbound_open && budget_back.is_none() => {
                if let Err(end) = s.received(message) {
                    return end.map(|status| (Err(status), s));
                }
            }
            Some(()) = OptionFuture::from(budget_back.map(tokio::time::sleep_until)) => {
                // A request already waiting when the budget refilled was held
                // back by it; one that comes later was not.
                if let Some(message) = s.inbound.message().now_or_never() {
                    s.shared
                        .metrics
                        .rejected
                        .with_label_values(&["xds", "rate_limited"])
                        .inc();
                    if let Err(end) = s.received(message) {
                        return end.map(|status| (Err(status), s));
                    }
                }
            }
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

impl<S: XdsSession> StreamState<S> {
    /// Acts on what reading the next request gave; `Err` ends the stream,
    /// with a status to send or none.
    fn received(
        &mut self,
        message: Result<Option<S::Request>, Status>,
    ) -> Result<(), Option<Status>> {
        match message {
            Ok(Some(request)) => {
                self.requests.try_take(Instant::now());
                self.handle(&request).map_err(Some)
            }
            Ok(None) => {
                self.inbound_open = false;
                Ok(())
            }
            Err(status) => {
                // A client that went away reads nothing; one that broke a
                // request limit (crate::limits) learns which.
                tracing::debug!(%status, "xDS stream ended by its client");
                Err(Some(self.shared.request_error("xds", status)))
            }
        }
    }

    fn handle(&mut self, request: &S::Request) -> Result<(), Status> {
        // Checked before any work: the cost of a request grows with its names.
        let names = S::names_in(request);
        if names > MAX_XDS_NAMES_PER_REQUEST {
            self.shared
                .metrics
                .rejected
                .with_label_values(&["xds", "too_many_names"])
                .inc();
            tracing::debug!(
                names,
                type_url = %loggable(S::type_url(request)),
                "xDS request with too many names; ending the stream"
            );
            return Err(Status::resource_exhausted(format!(
                "an xDS request may name at most {MAX_XDS_NAMES_PER_REQUEST} resources; \
                 this one named {names}"
            )));
        }
        let had_node = self.session.node().is_some();
        let handled = self.session.handle(request);
        if !had_node && let Some(node) = self.session.node() {
            self.span
                .record("node", tracing::field::display(loggable(&node.id)));
            // Admin shows it; zone shares count only Discovery subscribers.
            self.guard.info().set_zone(&node.zone);
        }
        match &handled {
            Handled::UnknownType => {
                tracing::debug!(
                    type_url = %loggable(S::type_url(request)),
                    "ignoring a type lb-server does not serve"
                );
                self.shared
                    .metrics
                    .rejected
                    .with_label_values(&["xds", "unknown_type"])
                    .inc();
            }
            Handled::Stale { ty } => {
                tracing::debug!(
                    r#type = ty.short(),
                    nonce = %loggable(S::response_nonce(request)),
                    "ignoring a request with a stale nonce"
                );
            }
            Handled::Request {
                ty,
                reply,
                names_changed,
            } => {
                if let Reply::Nack(nack) = reply {
                    self.nacked(*ty, nack);
                }
                let session = &self.session;
                self.guard.record_xds(|status| {
                    session.record(*ty, Some(reply), *names_changed, status);
                });
                if *names_changed {
                    self.requests
                        .charge((names / XDS_NAMES_PER_EXTRA_REQUEST) as f64, Instant::now());
                    tracing::debug!(
                        r#type = ty.short(),
                        names = self.session.subscribed(*ty).len(),
                        "subscription changed"
                    );
                    self.sync_watches();
                }
            }
        }
        Ok(())
    }

    /// Counts a NACK, and logs it unless this stream or the process has
    /// logged too many lately.
    fn nacked(&mut self, ty: ResourceType, nack: &XdsNack) {
        self.shared
            .metrics
            .xds_nacks
            .with_label_values(&[ty.type_url()])
            .inc();
        // The stream's own limit first: a looping client spends its own
        // budget, not the process's. The lock is held for one refill.
        let now = Instant::now();
        let log = self.nack_log.next_token(now).is_none()
            && self.nack_logs.lock().unwrap().try_take(now)
            && self.nack_log.try_take(now);
        if !log {
            self.nacks_not_logged += 1;
            self.shared
                .metrics
                .suppressed_logs
                .with_label_values(&["xds_nack"])
                .inc();
            return;
        }
        let node = self.session.node().map_or("", |n| n.id.as_str());
        tracing::warn!(
            peer = self.guard.peer(),
            node = %loggable(node),
            type_url = ty.type_url(),
            version = %nack.version,
            nonce = %nack.nonce,
            code = nack.code,
            error = %loggable(&nack.message),
            not_logged = std::mem::take(&mut self.nacks_not_logged),
            "xDS client rejected a response (NACK)"
        );
    }

    /// Subscribes to every service the client names and drops the rest;
    /// starts or stops following the service set for wildcards.
    fn sync_watches(&mut self) {
        let wanted: BTreeSet<ServiceKey> = self.session.named_services();
        self.watches.handles.retain(|key, handle| {
            let keep = wanted.contains(key);
            if !keep {
                handle.abort();
                self.view.snapshots.remove(key);
            }
            keep
        });
        for key in wanted {
            if self.watches.handles.contains_key(&key) {
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
    /// agree: the store moves the set before it wakes the subscribers of a
    /// service that appeared or went away, so a snapshot taken here is never
    /// newer than the set read next. A wildcard CDS then goes out with a
    /// cluster before a named LDS sends the Listener that routes to it.
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
    fn sent(&self, outgoing: &Outgoing<S::Response>) {
        let ty = outgoing.ty;
        let (version, nonce, resources) = S::summary(&outgoing.response);
        tracing::debug!(
            r#type = ty.short(),
            %version,
            %nonce,
            resources,
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

/// The store subscriptions of one stream, by service. A change wakes only
/// the subscription of its service, and adding or dropping one costs the
/// same however many there are: an Envoy names thousands.
#[derive(Default)]
struct Watches {
    streams: SelectAll<Abortable<Keyed>>,
    /// Dropping a service aborts its stream; it is dropped, and its store
    /// subscription released, when next polled (at once: the abort wakes it).
    handles: HashMap<ServiceKey, AbortHandle>,
}

impl Watches {
    fn insert(&mut self, key: ServiceKey, stream: SnapshotStream) {
        let (stream, handle) = futures::stream::abortable(Keyed {
            key: key.clone(),
            stream,
        });
        if let Some(old) = self.handles.insert(key, handle) {
            old.abort();
        }
        self.streams.push(stream);
    }

    fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

impl Stream for Watches {
    type Item = (ServiceKey, Arc<Snapshot>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.streams.poll_next_unpin(cx)
    }
}

/// A service's snapshots, each with the service's key.
struct Keyed {
    key: ServiceKey,
    stream: SnapshotStream,
}

impl Stream for Keyed {
    type Item = (ServiceKey, Arc<Snapshot>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.stream
            .poll_next_unpin(cx)
            .map(|snapshot| snapshot.map(|snapshot| (this.key.clone(), snapshot)))
    }
}
