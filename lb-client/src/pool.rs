//! The connection pool: one HTTP/2 connection per backend, opened and closed
//! as the endpoint list changes, and the picker over them.
//!
//! Updates (a new list, new zone shares, a connection up or down) happen off
//! the hot path and swap in a new [`ZonePicker`]; calls only load it. A removed endpoint's sender
//! is dropped at once, but its connection task lives on until the calls in
//! flight on it finish.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::uri::Authority;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lookaside_backoff::Backoff;
use tokio::sync::watch;
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug_span};

use crate::{
    endpoint::{Conn, EndpointState, Outcome, now_nanos},
    stats::Counters,
    zones::{Hints, Locality, ZonePicker, ZoneShare},
};

/// An endpoint as the LB server (or the fallback) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) zone: String,
    pub(crate) pod: String,
    pub(crate) draining: bool,
    /// EndpointSlice hints, for zone-aware picks.
    pub(crate) hints: Hints,
}

/// Where the current list came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListState {
    /// No LB server has answered yet.
    Waiting { last_error: Option<String> },
    /// The LB server's list.
    Lb { version: u64 },
    /// The LB server does not know the service, and there is no fallback.
    Unknown,
    /// The fallback addresses, and why they are in use.
    Fallback { reason: String },
    /// The LB server rejected the target as malformed.
    Rejected { message: String },
}

/// Connection and ejection settings.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// TLS to the backends, if they serve it.
    pub(crate) tls: Option<BackendTls>,
    /// The `:authority` of calls.
    pub(crate) authority: AuthorityRule,
    pub(crate) connect_timeout: Duration,
    pub(crate) ejection_base: Duration,
    pub(crate) ejection_max: Duration,
    /// Server errors or timeouts in a row that eject an endpoint.
    pub(crate) consecutive_errors: u32,
    /// This client's zone and node, for zone-aware picks.
    pub(crate) locality: Locality,
    /// Weighted round robin's settings, when that is the policy: load
    /// reports are read only then.
    pub(crate) wrr: Option<crate::wrr::WrrConfig>,
}

/// TLS to the backends: the configuration in use and the name their
/// certificates must carry (`None`: each endpoint's IP address).
#[derive(Debug, Clone)]
pub(crate) struct BackendTls {
    pub(crate) loaded: crate::tls::Loaded,
    pub(crate) server_name: Option<ServerName<'static>>,
}

/// What a call's `:authority` is.
#[derive(Debug, Clone)]
pub(crate) enum AuthorityRule {
    /// The same for every endpoint (the user's override).
    Fixed(Authority),
    /// This host (the service's DNS name) and the endpoint's port.
    Host(String),
    /// The endpoint's `IP:PORT` (a target that names no service).
    Address,
}

impl AuthorityRule {
    fn for_endpoint(&self, addr: SocketAddr) -> Option<Authority> {
        match self {
            AuthorityRule::Fixed(authority) => Some(authority.clone()),
            AuthorityRule::Host(host) => {
                Authority::try_from(format!("{host}:{}", addr.port()).as_str()).ok()
            }
            AuthorityRule::Address => None,
        }
    }
}

struct Managed {
    state: Arc<EndpointState>,
    stop: CancellationToken,
    hints: Hints,
}

/// Shared by the channel, the subscription task and the connection tasks.
pub(crate) struct Pool {
    pub(crate) target: String,
    pub(crate) picker: ArcSwap<ZonePicker>,
    pub(crate) list: ArcSwap<ListState>,
    pub(crate) counters: Counters,
    settings: PoolSettings,
    // std Mutex: only list updates take it, never across `.await`, never on the hot path.
    endpoints: Mutex<HashMap<SocketAddr, Managed>>,
    /// The LB server's zone shares, [`normalize`](crate::zones::normalize)d.
    /// std Mutex: taken only inside [`rebuild`](Self::rebuild)'s section and
    /// to replace the shares, never across `.await`.
    shares: Mutex<Vec<ZoneShare>>,
    /// Held to decide and record one ejection, so that two endpoints failing
    /// at once cannot each see the other usable and both be ejected. std
    /// Mutex: only calls that failed take it, briefly, never across `.await`.
    ejecting: Mutex<()>,
    /// Bumped on every change a waiting call or `connect()` may care about.
    changed: watch::Sender<u64>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(
        target: String,
        settings: PoolSettings,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            target,
            picker: ArcSwap::from_pointee(ZonePicker::default()),
            list: ArcSwap::from_pointee(ListState::Waiting { last_error: None }),
            counters: Counters::default(),
            settings,
            endpoints: Mutex::new(HashMap::new()),
            shares: Mutex::new(Vec::new()),
            ejecting: Mutex::new(()),
            changed: watch::Sender::new(0),
            shutdown,
        })
    }

    /// A receiver that wakes on every change.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn set_list_state(&self, state: ListState) {
        if **self.list.load() != state {
            self.list.store(Arc::new(state));
            self.notify();
        }
    }

    /// Makes `specs` the endpoint list: starts connections to new endpoints,
    /// updates weights, draining and hints, and drops removed ones. An
    /// address that now names another pod (Kubernetes reuses pod IPs) or
    /// another zone is a new endpoint: the old one's connection is dropped
    /// as a removed one's is, and a new one starts, so that calls and the
    /// zone-aware picks never go by what the address used to be.
    pub(crate) fn apply(self: &Arc<Self>, specs: Vec<EndpointSpec>) {
        {
            let mut endpoints = self.endpoints.lock().unwrap();
            let mut keep = HashMap::with_capacity(specs.len());
            for spec in specs {
                let mut managed = match endpoints.remove(&spec.addr) {
                    Some(old) if old.state.pod != spec.pod || old.state.zone != spec.zone => {
                        self.retire(&spec.addr, old, "endpoint replaced");
                        self.start(&spec)
                    }
                    Some(managed) => managed,
                    None => self.start(&spec),
                };
                managed.state.set_weight(spec.weight);
                managed.state.set_draining(spec.draining);
                managed.hints = spec.hints;
                keep.insert(spec.addr, managed);
            }
            for (addr, removed) in endpoints.drain() {
                self.retire(&addr, removed, "endpoint removed");
            }
            *endpoints = keep;
        }
        self.rebuild();
    }

    /// Stops an endpoint that left the list (or was replaced at its address).
    fn retire(&self, addr: &SocketAddr, managed: Managed, why: &'static str) {
        tracing::debug!(%addr, target = %self.target, why);
        managed.stop.cancel();
        // No new calls: drop the sender now; the connection task ends once
        // the calls in flight on it have finished.
        managed.state.set_sender(None, Conn::Connecting);
    }

    /// Weighted round robin's settings, when that is the policy.
    pub(crate) fn wrr(&self) -> Option<&crate::wrr::WrrConfig> {
        self.settings.wrr.as_ref()
    }

    /// This client's zone and node.
    pub(crate) fn locality(&self) -> &Locality {
        &self.settings.locality
    }

    /// Makes `shares` (as the LB server sent them) the zone shares, and
    /// rebuilds the picker if they changed.
    pub(crate) fn set_zone_shares(&self, shares: Vec<ZoneShare>) {
        let shares = crate::zones::normalize(shares);
        {
            let mut current = self.shares.lock().unwrap();
            if *current == shares {
                return;
            }
            tracing::debug!(target = %self.target, ?shares, "zone shares");
            *current = shares;
        }
        self.rebuild();
    }

    /// Rebuilds the picker from the current endpoints and zone shares.
    pub(crate) fn rebuild(&self) {
        // Both locks held while building, so that rebuilds run one at a time
        // and the last one stored saw every change before it.
        let endpoints = self.endpoints.lock().unwrap();
        let shares = self.shares.lock().unwrap();
        let mut all: Vec<(Arc<EndpointState>, Hints)> = endpoints
            .values()
            .map(|m| (m.state.clone(), m.hints.clone()))
            .collect();
        all.sort_by_key(|(e, _)| e.addr);
        let picker = ZonePicker::new(&all, &self.settings.locality, &shares);
        drop(shares);
        self.picker.store(Arc::new(picker));
        drop(endpoints);
        self.notify();
    }

    fn start(self: &Arc<Self>, spec: &EndpointSpec) -> Managed {
        let state = EndpointState::new(
            spec.addr,
            self.settings.authority.for_endpoint(spec.addr),
            spec.weight,
            spec.zone.clone(),
            spec.pod.clone(),
        );
        let stop = self.shutdown.child_token();
        let task = Arc::clone(self).manage(state.clone(), stop.clone());
        tokio::spawn(
            task.instrument(debug_span!("endpoint", addr = %spec.addr, target = %self.target)),
        );
        Managed {
            state,
            stop,
            hints: spec.hints.clone(),
        }
    }

    /// Keeps one HTTP/2 connection to the endpoint open until `stop`.
    async fn manage(self: Arc<Self>, state: Arc<EndpointState>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5)).start();
        loop {
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                connected = tokio::time::timeout(
                    self.settings.connect_timeout,
                    connect(state.addr, self.settings.tls.as_ref()),
                ) => connected,
            };
            match connected {
                Ok(Ok((sender, connection))) => {
                    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
                    // The connection runs on its own, so that calls in flight
                    // finish even after the endpoint is removed.
                    tokio::spawn(async move {
                        let result = connection.await;
                        let _ = closed_tx.send(result);
                    });
                    state.set_last_error(None);
                    state.set_sender(Some(sender), Conn::Ready);
                    self.notify();
                    tracing::debug!("connected");
                    let opened = tokio::time::Instant::now();
                    let result = tokio::select! {
                        _ = stop.cancelled() => return,
                        result = closed_rx => result,
                    };
                    state.set_sender(None, Conn::Connecting);
                    self.notify();
                    let clean = matches!(result, Ok(Ok(())));
                    tracing::debug!(clean, "connection closed");
                    if !clean {
                        self.report(&state, Outcome::Unavailable);
                    }
                    // A connection that lived a while reconnects at once; one that
                    // closes right after opening backs off like a failure.
                    if opened.elapsed() > Duration::from_secs(1) {
                        backoff.reset();
                        continue;
                    }
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "connect failed");
                    state.set_last_error(Some(error));
                    self.connect_failed(&state);
                }
                Err(_) => {
                    tracing::debug!("connect timed out");
                    state.set_last_error(Some(format!(
                        "connect timed out after {:?}",
                        self.settings.connect_timeout
                    )));
                    self.connect_failed(&state);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    fn connect_failed(&self, state: &Arc<EndpointState>) {
        state.set_sender(None, Conn::Failed);
        self.counters.connect_failures.inc();
        self.report(state, Outcome::Unavailable);
        self.notify();
    }

    /// Records a call's outcome and ejects the endpoint if it keeps failing:
    /// at once for `UNAVAILABLE` or a broken connection (the endpoint said so,
    /// or its transport did), after a streak of server errors or deadlines
    /// passed with no success between (Envoy's `consecutive_5xx` and
    /// `consecutive_gateway_failure`): one slow call must not eject a healthy
    /// backend, while one that stopped answering fails every call and soon
    /// completes the streak. Never ejects the last usable endpoint.
    pub(crate) fn report(&self, state: &EndpointState, outcome: Outcome) {
        let consecutive = state.record(outcome);
        let eject = match outcome {
            Outcome::Unavailable => consecutive >= 1,
            Outcome::ServerError | Outcome::Timeout => {
                consecutive >= self.settings.consecutive_errors
            }
            Outcome::Success | Outcome::Cancelled => false,
        };
        if !eject || state.ejected(now_nanos()) {
            return;
        }
        let backoff = {
            // One ejection decided at a time: the check that another endpoint
            // stays usable and the ejection it allows are one step.
            let _one_at_a_time = self
                .ejecting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = now_nanos();
            if state.ejected(now) {
                return;
            }
            let picker = self.picker.load();
            let others_usable = picker
                .endpoints()
                .iter()
                .any(|e| !std::ptr::eq(e.as_ref(), state) && e.available(now));
            if !others_usable {
                return;
            }
            state.eject(self.settings.ejection_base, self.settings.ejection_max, now)
        };
        self.counters.ejections.inc();
        tracing::debug!(addr = %state.addr, ?backoff, ?outcome, "endpoint ejected");
        self.notify();
    }

    /// Every endpoint, draining ones included.
    pub(crate) fn all_endpoints(&self) -> Vec<Arc<EndpointState>> {
        let endpoints = self.endpoints.lock().unwrap();
        let mut all: Vec<_> = endpoints.values().map(|m| m.state.clone()).collect();
        all.sort_by_key(|e| e.addr);
        all
    }
}

/// A backend connection's HTTP/2 session, run by its own task.
type Connection = std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>;

/// Opens a TCP connection, a TLS session over it if `tls`, and an HTTP/2
/// session over that. The error says which step failed and why.
async fn connect(
    addr: SocketAddr,
    tls: Option<&BackendTls>,
) -> Result<(crate::endpoint::Sender, Connection), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("connect: {e}"))?;
    match tls {
        None => handshake(stream).await,
        Some(tls) => {
            // The configuration in use now: a rotation applies from the next
            // connection on.
            let connector = TlsConnector::from(tls.loaded.config.current());
            let name = tls
                .server_name
                .clone()
                .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
            let stream = connector
                .connect(name, stream)
                .await
                .map_err(|e| crate::tls::handshake_error(&e))?;
            handshake(stream).await
        }
    }
}

/// The HTTP/2 handshake over `io`.
async fn handshake<IO>(io: IO) -> Result<(crate::endpoint::Sender, Connection), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    Ok((sender, Box::pin(connection)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<Pool> {
        Pool::new(
            "svc.ns:grpc".into(),
            PoolSettings {
                tls: None,
                authority: AuthorityRule::Address,
                connect_timeout: Duration::from_secs(1),
                ejection_base: Duration::from_secs(10),
                ejection_max: Duration::from_secs(60),
                consecutive_errors: 3,
                locality: Locality::default(),
                wrr: None,
            },
            CancellationToken::new(),
        )
    }

    fn ready(port: u16) -> Arc<EndpointState> {
        EndpointState::ready_for_test(port, 1, "")
    }

    fn spec(port: u16, pod: &str, zone: &str, weight: u32) -> EndpointSpec {
        EndpointSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            zone: zone.into(),
            pod: pod.into(),
            draining: false,
            hints: Hints::default(),
        }
    }

    /// The state of the endpoint at `port` in the pool's list.
    fn state(pool: &Pool, port: u16) -> Arc<EndpointState> {
        let endpoints = pool.endpoints.lock().unwrap();
        endpoints[&SocketAddr::from(([127, 0, 0, 1], port))]
            .state
            .clone()
    }

    #[tokio::test]
    async fn an_address_that_names_another_pod_or_zone_is_a_new_endpoint() {
        let pool = pool();
        pool.apply(vec![spec(1, "a-1", "z1", 1), spec(2, "b-1", "z1", 1)]);
        let (first, other) = (state(&pool, 1), state(&pool, 2));

        // A new weight for the same pod keeps the endpoint.
        pool.apply(vec![spec(1, "a-1", "z1", 5), spec(2, "b-1", "z1", 1)]);
        assert!(Arc::ptr_eq(&first, &state(&pool, 1)));

        // Another pod at the reused address: a new endpoint with its own
        // name; the old one takes no new calls.
        pool.apply(vec![spec(1, "a-2", "z1", 5), spec(2, "b-1", "z1", 1)]);
        let replaced = state(&pool, 1);
        assert!(!Arc::ptr_eq(&first, &replaced));
        assert_eq!(replaced.pod, "a-2");
        let picker = pool.picker.load();
        assert!(
            picker.endpoints().iter().any(|e| Arc::ptr_eq(e, &replaced))
                && !picker.endpoints().iter().any(|e| Arc::ptr_eq(e, &first)),
            "calls go to the new endpoint only"
        );

        // The same pod in another zone: a new endpoint there too.
        pool.apply(vec![spec(1, "a-2", "z2", 5), spec(2, "b-1", "z1", 1)]);
        assert_eq!(state(&pool, 1).zone, "z2");
        assert!(Arc::ptr_eq(&other, &state(&pool, 2)), "the others stay");
        pool.shutdown.cancel();
    }

    #[test]
    fn unavailable_ejects_at_once_server_errors_after_a_streak_and_never_all() {
        let pool = pool();
        let endpoints = vec![ready(1), ready(2), ready(3)];
        pool.picker.store(Arc::new(ZonePicker::flat(&endpoints)));
        let now = now_nanos;

        // Server errors eject only after the configured streak.
        pool.report(&endpoints[0], Outcome::ServerError);
        pool.report(&endpoints[0], Outcome::ServerError);
        assert!(!endpoints[0].ejected(now()));
        pool.report(&endpoints[0], Outcome::ServerError);
        assert!(endpoints[0].ejected(now()));

        // UNAVAILABLE ejects at once...
        pool.report(&endpoints[1], Outcome::Unavailable);
        assert!(endpoints[1].ejected(now()));
        // ...but never the last usable endpoint.
        for _ in 0..10 {
            pool.report(&endpoints[2], Outcome::Unavailable);
        }
        assert!(!endpoints[2].ejected(now()));
        assert_eq!(pool.counters.ejections.get(), 2);
        // A success in between resets the streak.
        let fresh = vec![ready(4), ready(5)];
        pool.picker.store(Arc::new(ZonePicker::flat(&fresh)));
        pool.report(&fresh[0], Outcome::ServerError);
        pool.report(&fresh[0], Outcome::ServerError);
        pool.report(&fresh[0], Outcome::Success);
        pool.report(&fresh[0], Outcome::ServerError);
        assert!(!fresh[0].ejected(now()));
    }

    #[test]
    fn a_passed_deadline_ejects_only_as_part_of_a_streak() {
        let pool = pool();
        let endpoints = vec![ready(1), ready(2)];
        pool.picker.store(Arc::new(ZonePicker::flat(&endpoints)));
        let slow = &endpoints[0];
        // One slow call, even a few with answers between: not ejected.
        pool.report(slow, Outcome::Timeout);
        assert!(!slow.ejected(now_nanos()));
        pool.report(slow, Outcome::Success);
        for _ in 0..10 {
            pool.report(slow, Outcome::Timeout);
            pool.report(slow, Outcome::Timeout);
            pool.report(slow, Outcome::Success);
        }
        assert!(!slow.ejected(now_nanos()));
        // Stopped answering: the third deadline in a row ejects it.
        pool.report(slow, Outcome::Timeout);
        pool.report(slow, Outcome::Timeout);
        assert!(!slow.ejected(now_nanos()));
        pool.report(slow, Outcome::Timeout);
        assert!(slow.ejected(now_nanos()));
        assert_eq!(pool.counters.ejections.get(), 1);
    }

    /// Endpoints failing at the same moment, on as many threads, never all
    /// get ejected: deciding that another endpoint stays usable and ejecting
    /// this one are one step. The threads spin on a shared round counter
    /// rather than sleep on a barrier, so that their failures land within
    /// nanoseconds of each other, inside the window a check-then-act leaves.
    #[test]
    fn concurrent_failures_never_eject_the_last_usable_endpoint() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        const THREADS: usize = 2;
        const ROUNDS: usize = 10_000;
        let pool = pool();
        let endpoints: Vec<_> = (0..THREADS as u16).map(|i| ready(i + 1)).collect();
        pool.picker.store(Arc::new(ZonePicker::flat(&endpoints)));
        let (round, reported) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut all_ejected = 0;
        std::thread::scope(|scope| {
            for endpoint in &endpoints {
                let (pool, round, reported) = (&pool, &round, &reported);
                scope.spawn(move || {
                    for r in 1..=ROUNDS {
                        let mut spins = 0u32;
                        while round.load(SeqCst) < r {
                            // Spin (to start together), but give the
                            // core up if the round is slow to start.
                            spins += 1;
                            if spins < 1_000 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        pool.report(endpoint, Outcome::Unavailable);
                        reported.fetch_add(1, SeqCst);
                    }
                });
            }
            for r in 1..=ROUNDS {
                // Back in service, then every thread fails its endpoint at once.
                for e in &endpoints {
                    e.readmit();
                }
                round.store(r, SeqCst);
                while reported.load(SeqCst) < r * THREADS {
                    std::thread::yield_now();
                }
                let now = now_nanos();
                if endpoints.iter().all(|e| !e.available(now)) {
                    all_ejected += 1;
                }
            }
        });
        assert_eq!(
            all_ejected, 0,
            "every endpoint was ejected at once in {all_ejected} of {ROUNDS} rounds"
        );
    }
}
