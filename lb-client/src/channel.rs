//! The channel: a `tower::Service` that tonic-generated clients accept, which
//! picks a backend for every call.
//!
//! The hot path loads the current picker (an `ArcSwap`), picks with atomics,
//! and hands the request to that backend's own HTTP/2 connection: no global
//! lock, no shared queue, no worker task in between.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Status;
use tracing::{Instrument, field};

use crate::{
    body::{CallGuard, ResponseBody, outcome_of},
    endpoint::{Outcome, now_nanos},
    picker::{NoPick, Policy},
    pool::{AuthorityRule, BackendTls},
    pool::{ListState, Pool, PoolSettings},
    resolver::{Fallback, LbServer, Subscription},
    stats::{ChannelStats, EndpointStats},
    tls::ClientTls,
    zones::Locality,
};

/// The environment variable [`Builder::zone`] defaults to.
pub const ZONE_ENV: &str = "LB_ZONE";

/// The environment variable [`Builder::node`] defaults to.
pub const NODE_ENV: &str = "LB_NODE";

/// Errors building a channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `.lb(URL)` was given.
    #[error("no LB server: call .lb(\"http://HOST:PORT\") at least once")]
    NoLbServer,
    /// An LB server URL that does not parse.
    #[error("bad LB server URL {url:?}: {reason}")]
    BadLbUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A fallback address that is neither `IP:PORT` nor `dns:///HOST:PORT`.
    #[error("bad fallback address {0:?}: expected IP:PORT or dns:///HOST:PORT")]
    BadFallback(String),
    /// A TLS file is missing or unusable (the message names it).
    #[error("TLS: {0}")]
    Tls(#[from] lookaside_tls::TlsError),
    /// A TLS server name or `:authority` override that is not a valid name.
    #[error("bad {what} {value:?}")]
    BadName {
        /// Which setting.
        what: &'static str,
        /// The value as given.
        value: String,
    },
    /// The LB server rejected the target.
    #[error("the LB server rejected target {target:?}: {message}")]
    Rejected {
        /// The target.
        target: String,
        /// The LB server's reason.
        message: String,
    },
}

/// Builds a [`Channel`].
#[derive(Debug, Clone)]
pub struct Builder {
    target: String,
    lbs: Vec<String>,
    fallback: Vec<String>,
    policy: Policy,
    connect_timeout: Duration,
    ready_timeout: Duration,
    wait_timeout: Duration,
    ejection_base: Duration,
    ejection_max: Duration,
    consecutive_errors: u32,
    lb_tls: Option<ClientTls>,
    backend_tls: Option<ClientTls>,
    tls_server_name: Option<String>,
    authority: Option<String>,
    zone: String,
    node: String,
    wrr: crate::wrr::WrrConfig,
}

impl Builder {
    fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            lbs: Vec::new(),
            fallback: Vec::new(),
            policy: Policy::default(),
            connect_timeout: Duration::from_secs(2),
            ready_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(1),
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(30),
            consecutive_errors: 5,
            lb_tls: None,
            backend_tls: None,
            tls_server_name: None,
            authority: None,
            zone: std::env::var(ZONE_ENV).unwrap_or_default(),
            node: std::env::var(NODE_ENV).unwrap_or_default(),
            wrr: crate::wrr::WrrConfig::default(),
        }
    }

    /// Weighted round robin's settings (see [`WrrConfig`](crate::WrrConfig)
    /// for each and its default); they apply when the policy is
    /// [`Policy::WeightedRoundRobin`].
    pub fn wrr(mut self, config: crate::wrr::WrrConfig) -> Self {
        self.wrr = config;
        self
    }

    /// Weighted round robin reads load reports out of band, asking each
    /// backend for one every `interval` on an
    /// `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics` stream over its
    /// connection, instead of from every call's trailers
    /// ([`WrrConfig::out_of_band`](crate::WrrConfig::out_of_band)).
    pub fn orca_out_of_band(mut self, interval: Duration) -> Self {
        self.wrr.out_of_band = Some(interval);
        self
    }

    /// The zone this client runs in (its node's
    /// `topology.kubernetes.io/zone`), sent to the LB server on the Watch.
    /// Default: the `LB_ZONE` environment variable; empty means unknown.
    ///
    /// With a zone, the LB server sends the share of this client's calls
    /// each zone should take, computed from the zones of every client and
    /// every endpoint, and the channel keeps calls in its own zone while that
    /// zone has the capacity, spilling the rest over to the other zones in
    /// proportion. A zone with no usable endpoint (all ejected, draining or
    /// gone) gets no calls: its share goes to the others at once, with no
    /// failed call. EndpointSlice hints (topology-aware routing), when every
    /// endpoint has them and some are for this zone, decide instead of the
    /// shares. Without a zone, or when the LB server sends no shares, calls
    /// go to every endpoint as the policy picks.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// The node this client runs on (`spec.nodeName`), sent to the LB server
    /// on the Watch and matched against EndpointSlice node hints
    /// (`trafficDistribution: PreferSameNode`). Default: the `LB_NODE`
    /// environment variable; empty means unknown.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = node.into();
        self
    }

    /// TLS for both the LB connection (`https://` LB URLs) and the backend
    /// connections: [`lb_tls`](Self::lb_tls) and
    /// [`backend_tls`](Self::backend_tls) in one call.
    pub fn tls(self, tls: ClientTls) -> Self {
        self.lb_tls(tls.clone()).backend_tls(tls)
    }

    /// TLS for `https://` LB servers, whose certificate must carry the URL's
    /// host. Without it, `https://` URLs trust the system's CAs and present
    /// no client certificate; `http://` URLs are always plaintext.
    pub fn lb_tls(mut self, tls: ClientTls) -> Self {
        self.lb_tls = Some(tls);
        self
    }

    /// TLS for the backend connections (without it they are plaintext). A
    /// backend's certificate must carry the service's DNS name,
    /// `NAME.NAMESPACE.svc` for target `NAME.NAMESPACE:PORT` (as pods'
    /// certificates do, not their IPs), unless
    /// [`tls_server_name`](Self::tls_server_name) says otherwise.
    pub fn backend_tls(mut self, tls: ClientTls) -> Self {
        self.backend_tls = Some(tls);
        self
    }

    /// The name a backend's certificate must carry, instead of
    /// `NAME.NAMESPACE.svc`.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// The `:authority` of every call (`HOST` or `HOST:PORT`), instead of
    /// the service's DNS name and the backend's port
    /// (`NAME.NAMESPACE.svc:PORT`; a backend's `IP:PORT` when the target
    /// names no service).
    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = Some(authority.into());
        self
    }

    /// Adds an LB server (`http://HOST:PORT`). With several, the channel uses
    /// one at a time and fails over to the next.
    pub fn lb(mut self, url: impl Into<String>) -> Self {
        self.lbs.push(url.into());
        self
    }

    /// Adds a fallback address, `IP:PORT` or `dns:///HOST:PORT`, used while no
    /// LB server has answered or when the LB server does not know the service.
    pub fn fallback(mut self, addr: impl Into<String>) -> Self {
        self.fallback.push(addr.into());
        self
    }

    /// The balancing policy (default round-robin).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Timeout for a TCP + HTTP/2 connection to a backend or LB server (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long [`connect`](Self::connect) waits for a first list and a first
    /// connection (default 5 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long a call waits for an endpoint that is still connecting
    /// (default 1 s). Calls never wait on endpoints that failed.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// First ejection period; it doubles with each ejection in a row up to
    /// `max` (defaults 1 s and 30 s). Each period is drawn between half its
    /// step and the whole step, so endpoints ejected together return apart.
    pub fn ejection(mut self, base: Duration, max: Duration) -> Self {
        self.ejection_base = base;
        self.ejection_max = max;
        self
    }

    /// How many server errors (`UNKNOWN`, `INTERNAL`, `DATA_LOSS`) or calls
    /// whose deadline passed before the endpoint answered eject it when they
    /// come in a row, with no success between (default 5, as Envoy's
    /// `consecutive_5xx` and `consecutive_gateway_failure`; at least 1). So
    /// one slow call with a tight deadline does not eject a healthy backend,
    /// and a backend that stopped answering is ejected after this many
    /// calls. `UNAVAILABLE` and broken connections eject at once.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_errors = n.max(1);
        self
    }

    /// Subscribes and waits (up to the ready timeout) until the first list has
    /// arrived and every backend's first connection attempt has ended, or
    /// every LB server has been tried once without an answer. Returns an
    /// error if the LB server rejects the target; otherwise returns the
    /// channel even if no LB server has answered: it keeps trying, and calls
    /// say why they fail meanwhile.
    pub async fn connect(self) -> Result<Channel, Error> {
        let ready_timeout = self.ready_timeout;
        let target = self.target.clone();
        let lb_servers = self.lbs.len() as u64;
        let channel = self.connect_lazy()?;
        let pool = &channel.inner.pool;
        let mut changes = pool.changes();
        let deadline = tokio::time::Instant::now() + ready_timeout;
        loop {
            let ready = match &**pool.list.load() {
                ListState::Rejected { message } => {
                    return Err(Error::Rejected {
                        target,
                        message: message.clone(),
                    });
                }
                // Every LB server has been tried once and none answered:
                // return now; calls will say why until one answers.
                ListState::Waiting { last_error } => {
                    last_error.is_some() && pool.counters.lb_errors.get() >= lb_servers
                }
                ListState::Unknown => true,
                // Every connection attempted (so the first calls spread over
                // all backends), or nothing to connect to.
                ListState::Lb { .. } | ListState::Fallback { .. } => pool
                    .picker
                    .load()
                    .endpoints()
                    .iter()
                    .all(|e| e.conn() != crate::endpoint::Conn::Connecting),
            };
            if ready {
                return Ok(channel);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                tracing::warn!(target = %target, "not ready within the ready timeout; calls will say why");
                return Ok(channel);
            }
        }
    }

    /// Builds the channel and subscribes in the background without waiting.
    /// Needs a Tokio runtime.
    pub fn connect_lazy(self) -> Result<Channel, Error> {
        if self.lbs.is_empty() {
            return Err(Error::NoLbServer);
        }
        // One load and one watch per distinct set of files.
        let backend_tls = self
            .backend_tls
            .as_ref()
            .map(ClientTls::start)
            .transpose()?;
        let lb_tls = match (&self.lb_tls, &backend_tls) {
            (Some(lb), Some(loaded)) if Some(lb) == self.backend_tls.as_ref() => {
                Some(loaded.clone())
            }
            (Some(lb), _) => Some(lb.start()?),
            (None, _) => None,
        };
        let mut system_tls = None;
        let mut lbs = Vec::with_capacity(self.lbs.len());
        for url in &self.lbs {
            let bad = |reason: String| Error::BadLbUrl {
                url: url.clone(),
                reason,
            };
            let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| bad(e.to_string()))?;
            let tls = if endpoint.uri().scheme() == Some(&Scheme::HTTPS) {
                let host = endpoint
                    .uri()
                    .host()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| bad(format!("host {host:?} is not a TLS name: {e}")))?;
                let loaded = match &lb_tls {
                    Some(loaded) => loaded.clone(),
                    None => match &system_tls {
                        Some(loaded) => Clone::clone(loaded),
                        None => system_tls
                            .insert(ClientTls::system_roots().start()?)
                            .clone(),
                    },
                };
                Some((loaded, name))
            } else {
                None
            };
            lbs.push(LbServer {
                endpoint: endpoint
                    .connect_timeout(self.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10)),
                tls,
            });
        }
        let service_host = service_host(&self.target);
        let authority = match &self.authority {
            Some(value) => {
                AuthorityRule::Fixed(Authority::try_from(value.as_str()).map_err(|_| {
                    Error::BadName {
                        what: "authority",
                        value: value.clone(),
                    }
                })?)
            }
            None => match &service_host {
                Some(host) => AuthorityRule::Host(host.clone()),
                None => AuthorityRule::Address,
            },
        };
        let tls = match backend_tls {
            Some(loaded) => {
                let name =
                    match self.tls_server_name.as_ref().or(service_host.as_ref()) {
                        Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                            Error::BadName {
                                what: "TLS server name",
                                value: name.clone(),
                            }
                        })?),
                        None => None,
                    };
                Some(BackendTls {
                    loaded,
                    server_name: name,
                })
            }
            None => None,
        };
        let scheme = if tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let fallback = self
            .fallback
            .iter()
            .map(|f| Fallback::parse(f).ok_or_else(|| Error::BadFallback(f.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let shutdown = CancellationToken::new();
        let pool = Pool::new(
            self.target.clone(),
            PoolSettings {
                tls,
                authority,
                connect_timeout: self.connect_timeout,
                ejection_base: self.ejection_base,
                ejection_max: self.ejection_max,
                consecutive_errors: self.consecutive_errors,
                locality: Locality {
                    zone: self.zone.clone(),
                    node: self.node.clone(),
                },
                wrr: (self.policy == Policy::WeightedRoundRobin).then(|| self.wrr.clone()),
            },
            shutdown.clone(),
        );
        if let Some(wrr) = pool.wrr() {
            // Weights are recomputed off the hot path, every update period.
            tokio::spawn(
                crate::wrr::run(pool.clone(), wrr.clone(), scheme.clone(), shutdown.clone())
                    .instrument(tracing::info_span!("wrr_weights", target = %self.target)),
            );
        }
        let subscription = Subscription {
            pool: pool.clone(),
            lbs,
            fallback,
        };
        tokio::spawn(
            subscription
                .run(shutdown.clone())
                .instrument(tracing::info_span!("lb_subscription", target = %self.target)),
        );
        Ok(Channel {
            inner: Arc::new(Inner {
                pool,
                scheme,
                policy: self.policy,
                wait_timeout: self.wait_timeout,
                _stop: shutdown.drop_guard(),
            }),
        })
    }
}

struct Inner {
    pool: Arc<Pool>,
    /// `https` when the backend connections are TLS.
    scheme: Scheme,
    policy: Policy,
    wait_timeout: Duration,
    /// Stops the subscription and the connections when the last clone goes.
    _stop: DropGuard,
}

/// A gRPC channel that balances every call over the backends an LB server
/// lists. Cheap to clone; clones share connections. Dropping the last clone
/// closes everything.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use lookaside_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
/// let channel = lb_client::Channel::builder("greeter.default:grpc")
///     .lb("http://127.0.0.1:7000")
///     .connect()
///     .await?;
/// let mut client = GreeterClient::new(channel);
/// client.say_hello(HelloRequest { name: "you".into() }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("target", &self.inner.pool.target)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Starts building a channel for `target` (`NAME.NAMESPACE:PORT`).
    pub fn builder(target: impl Into<String>) -> Builder {
        Builder::new(target)
    }

    /// Channel-wide counters.
    pub fn stats(&self) -> ChannelStats {
        let c = &self.inner.pool.counters;
        ChannelStats {
            picks: c.picks.get(),
            no_endpoint: c.no_endpoint.get(),
            retries: c.retries.get(),
            ejections: c.ejections.get(),
            connect_failures: c.connect_failures.get(),
            lb_updates: c.lb_updates.get(),
            lb_errors: c.lb_errors.get(),
        }
    }

    /// The zone shares in use: the share of this channel's calls each zone
    /// should take, in parts per million, as the LB server last sent them.
    /// Empty: calls go without regard to zones.
    pub fn zone_shares(&self) -> Vec<(String, u32)> {
        self.inner.pool.picker.load().shares()
    }

    /// Calls sent to each zone's endpoints since the channel was created
    /// (endpoints the LB server gives no zone count under `""`), from
    /// [`endpoints`](Self::endpoints): endpoints removed since are not counted.
    pub fn calls_per_zone(&self) -> std::collections::BTreeMap<String, u64> {
        let mut calls = std::collections::BTreeMap::new();
        for e in self.endpoints() {
            *calls.entry(e.zone).or_default() += e.calls;
        }
        calls
    }

    /// Every endpoint the channel knows, draining ones included.
    pub fn endpoints(&self) -> Vec<EndpointStats> {
        let now = now_nanos();
        self.inner
            .pool
            .all_endpoints()
            .iter()
            .map(|e| EndpointStats {
                addr: e.addr,
                zone: e.zone.clone(),
                pod: e.pod.clone(),
                weight: e.weight(),
                draining: e.draining(),
                connected: e.conn() == crate::endpoint::Conn::Ready,
                ejected: e.ejected(now),
                in_flight: e.in_flight(),
                calls: e.calls(),
                failures: e.failures(),
                latency: Duration::from_nanos(e.latency(now) as u64),
                load_weight: e.load_weight().current(),
            })
            .collect()
    }
}

/// The future of one call.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, BoxError>> + Send>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Nothing to wait for: each call picks when it is made.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = &self.inner;
        Box::pin(send(
            inner.pool.clone(),
            inner.scheme.clone(),
            inner.policy,
            inner.wait_timeout,
            request,
        ))
    }
}

/// How many times a call is re-picked when its connection closed before the
/// request left the client.
const MAX_RETRIES: u32 = 3;

/// One call: pick, send on that backend's connection, track the response.
/// The pool handle moves into the call's guard (one reference count change
/// per call, not two).
async fn send(
    mut pool: Arc<Pool>,
    scheme: Scheme,
    policy: Policy,
    wait_timeout: Duration,
    mut request: http::Request<tonic::body::Body>,
) -> Result<http::Response<ResponseBody>, BoxError> {
    let mut retries = 0;
    // The caller's deadline (tonic sets `grpc-timeout` from a request's
    // timeout): enforced here, as tonic's own channel does, so that a call
    // to a backend that stopped answering ends at its deadline.
    let deadline = grpc_timeout(request.headers()).map(|t| (t, tokio::time::Instant::now() + t));
    let mut wait_until: Option<tokio::time::Instant> = None;
    let mut changes = None;
    loop {
        // Build the span only when someone listens: even a disabled span costs
        // something per call when tracing forwards to `log`.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!(
                "pick",
                target = %pool.target,
                policy = %policy,
                endpoint = field::Empty
            )
        } else {
            tracing::Span::none()
        };
        let picked_at = now_nanos();
        let picked = pool.picker.load().pick(policy, picked_at).map(Arc::clone);
        let endpoint = match picked {
            Ok(endpoint) => endpoint,
            Err(why) => {
                // Wait a little for endpoints that are still connecting; fail
                // fast on everything else.
                let connecting =
                    matches!(why, NoPick::Unavailable { connecting, .. } if connecting > 0);
                let mut until =
                    *wait_until.get_or_insert_with(|| tokio::time::Instant::now() + wait_timeout);
                if let Some((_, call_deadline)) = deadline {
                    until = until.min(call_deadline);
                }
                if connecting && tokio::time::Instant::now() < until {
                    let rx = changes.get_or_insert_with(|| pool.changes());
                    let _ = tokio::time::timeout_at(until, rx.changed()).await;
                    continue;
                }
                pool.counters.no_endpoint.inc();
                return Err(Box::new(Status::unavailable(explain(&pool, why))));
            }
        };
        span.record("endpoint", field::display(endpoint.addr));
        let _entered = span.enter();
        let Some(mut sender) = endpoint.sender() else {
            endpoint.mark_closed();
            continue;
        };
        set_uri(&mut request, &scheme, &endpoint.authority);
        pool.counters.picks.inc();
        let guard = CallGuard::start(endpoint, pool);
        drop(_entered);
        let sent = sender.try_send_request(request);
        let sent = match deadline {
            None => sent.await,
            Some((timeout, at)) => match tokio::time::timeout_at(at, sent).await {
                Ok(sent) => sent,
                Err(_) => {
                    // Dropping the request future resets the HTTP/2 stream.
                    // A deadline passed counts toward the endpoint's streak
                    // of failures: one slow call does not eject a healthy
                    // backend, a backend that stopped answering fails every
                    // call and is ejected once the streak is complete.
                    guard.endpoint().observe(timeout, now_nanos());
                    let message = format!(
                        "lb-client: deadline of {timeout:?} exceeded waiting for backend {} of {}",
                        guard.endpoint().addr,
                        guard.pool().target,
                    );
                    guard.finish(Outcome::Timeout);
                    return Err(Box::new(Status::deadline_exceeded(message)));
                }
            },
        };
        match sent {
            Ok(response) => {
                let answered_at = now_nanos();
                guard.endpoint().observe(
                    Duration::from_nanos(answered_at.saturating_sub(picked_at)),
                    answered_at,
                );
                let outcome = if response.status() == http::StatusCode::OK {
                    // A trailers-only response carries its load report in
                    // its headers.
                    if response.headers().contains_key("grpc-status") {
                        guard.record_load(response.headers());
                    }
                    outcome_of(response.headers())
                } else {
                    Some(Outcome::Unavailable)
                };
                return Ok(response.map(|body| ResponseBody::new(body, guard, outcome)));
            }
            Err(mut error) => match error.take_message() {
                // Never left the client: safe to send elsewhere.
                Some(unsent) if retries < MAX_RETRIES => {
                    retries += 1;
                    pool = guard.pool().clone();
                    pool.counters.retries.inc();
                    guard.endpoint().mark_closed();
                    guard.finish(Outcome::Cancelled);
                    request = unsent;
                }
                _ => {
                    let message = format!(
                        "lb-client: backend {} of {}: {}",
                        guard.endpoint().addr,
                        guard.pool().target,
                        error.error()
                    );
                    guard.finish(Outcome::Unavailable);
                    return Err(Box::new(Status::unavailable(message)));
                }
            },
        }
    }
}

/// Points `request` at one backend (also the out-of-band report streams).
pub(crate) fn set_uri(
    request: &mut http::Request<tonic::body::Body>,
    scheme: &Scheme,
    authority: &http::uri::Authority,
) {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path);
    *request.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
}

/// Why a call found no endpoint, in words an operator can act on.
fn explain(pool: &Pool, why: NoPick) -> String {
    let target = &pool.target;
    match (&**pool.list.load(), why) {
        (ListState::Waiting { last_error: None }, _) => {
            format!("lb-client: no answer from an LB server yet for {target}")
        }
        (
            ListState::Waiting {
                last_error: Some(e),
            },
            _,
        ) => {
            format!("lb-client: no answer from an LB server yet for {target} (last error: {e})")
        }
        (ListState::Unknown, _) => {
            format!(
                "lb-client: the LB server does not know service {target} (and no fallback is set)"
            )
        }
        (ListState::Rejected { message }, _) => {
            format!("lb-client: the LB server rejected target {target}: {message}")
        }
        (state, NoPick::Empty { draining }) => {
            let from = if matches!(state, ListState::Fallback { .. }) {
                " (fallback)"
            } else {
                ""
            };
            if draining > 0 {
                format!("lb-client: all {draining} endpoints of {target}{from} are draining")
            } else {
                format!("lb-client: service {target}{from} has no ready endpoints")
            }
        }
        (
            _,
            NoPick::Unavailable {
                total,
                ejected,
                connecting,
                failed,
            },
        ) => {
            let mut message = format!(
                "lb-client: all {total} endpoints of {target} are unavailable ({failed} unreachable, {ejected} ejected after failures, {connecting} connecting)"
            );
            // Say why connecting failed (a TLS handshake's reason, a refused
            // connection), for the first few endpoints that failed.
            let reasons: Vec<String> = pool
                .picker
                .load()
                .endpoints()
                .iter()
                .filter(|e| e.conn() == crate::endpoint::Conn::Failed)
                .filter_map(|e| Some(format!("{}: {}", e.addr, e.last_error()?)))
                .take(MAX_REASONS)
                .collect();
            if !reasons.is_empty() {
                message.push_str("; ");
                message.push_str(&reasons.join("; "));
            }
            message
        }
    }
}

/// A request's `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How many endpoints' connect errors a call's error message lists.
const MAX_REASONS: usize = 3;

/// The service's DNS name, `NAME.NAMESPACE.svc`, of a target
/// `NAME.NAMESPACE:PORT`; `None` for a target of another form.
fn service_host(target: &str) -> Option<String> {
    let (host, _port) = target.rsplit_once(':')?;
    let (name, namespace) = host.split_once('.')?;
    let label = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (label(name) && label(namespace)).then(|| format!("{name}.{namespace}.svc"))
}
