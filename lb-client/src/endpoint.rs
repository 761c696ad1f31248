//! One backend as the client sees it: its connection, load and health.
//!
//! Everything a pick reads is an atomic or an `ArcSwapOption`, so picks take
//! no lock. Times are nanoseconds since a process-wide base instant.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use http::uri::Authority;
use hyper::client::conn::http2::SendRequest;
use lookaside_backoff::Backoff;

use crate::wrr::LoadWeight;

/// How fast the latency estimate forgets: the EWMA time constant. Short, so
/// that an endpoint that looked slow once (a pause, a GC) is tried again soon.
const DECAY: Duration = Duration::from_millis(500);

/// The latency recorded for a failed call, so that fast failures look slow
/// to the latency-aware policy instead of attracting traffic.
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_millis(250);

/// Nanoseconds since the process-wide base instant.
pub(crate) fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Connection state of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Conn {
    /// First attempt (or a reconnect after a clean close) under way.
    Connecting = 0,
    /// Connected and usable.
    Ready = 1,
    /// The last attempt failed; retrying with backoff.
    Failed = 2,
}

/// What a finished call says about the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The server answered (any status that is not the server's fault).
    Success,
    /// `UNKNOWN`, `INTERNAL`, `DATA_LOSS`: the server is misbehaving.
    ServerError,
    /// `UNAVAILABLE`, a reset or a broken connection.
    Unavailable,
    /// The call's deadline passed before the endpoint answered: one slow
    /// call, or a backend that stopped answering. Only a streak of them
    /// tells the two apart.
    Timeout,
    /// The caller gave up; says nothing about the endpoint.
    Cancelled,
}

/// The request body type lb-client sends.
pub(crate) type Sender = SendRequest<tonic::body::Body>;

/// One backend.
#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) addr: SocketAddr,
    pub(crate) authority: Authority,
    pub(crate) zone: String,
    pub(crate) pod: String,
    /// Why the last connection attempt failed, for a call's error message.
    last_error: ArcSwapOption<String>,
    weight: AtomicU32,
    draining: AtomicBool,
    conn: AtomicU8,
    sender: ArcSwapOption<Sender>,
    in_flight: AtomicU32,
    ewma_nanos: AtomicU64,
    ewma_stamp: AtomicU64,
    failure_score: AtomicU32,
    consecutive_failures: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    calls: AtomicU64,
    failures: AtomicU64,
    /// Its weight from load reports, for weighted round robin.
    load: LoadWeight,
}

impl EndpointState {
    /// An endpoint whose calls carry `authority` (`None`: its `IP:PORT`).
    pub(crate) fn new(
        addr: SocketAddr,
        authority: Option<Authority>,
        weight: u32,
        zone: String,
        pod: String,
    ) -> Arc<Self> {
        let authority = authority.unwrap_or_else(|| {
            Authority::try_from(addr.to_string().as_str())
                .expect("a socket address is a valid authority")
        });
        Arc::new(Self {
            addr,
            authority,
            zone,
            pod,
            last_error: ArcSwapOption::empty(),
            weight: AtomicU32::new(weight.max(1)),
            draining: AtomicBool::new(false),
            conn: AtomicU8::new(Conn::Connecting as u8),
            sender: ArcSwapOption::empty(),
            in_flight: AtomicU32::new(0),
            ewma_nanos: AtomicU64::new(0),
            ewma_stamp: AtomicU64::new(0),
            failure_score: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            load: LoadWeight::default(),
        })
    }

    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub(crate) fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Relaxed);
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Relaxed);
    }

    pub(crate) fn conn(&self) -> Conn {
        match self.conn.load(Relaxed) {
            1 => Conn::Ready,
            2 => Conn::Failed,
            _ => Conn::Connecting,
        }
    }

    /// Installs (or with `None`, drops) the connection's sender.
    pub(crate) fn set_sender(&self, sender: Option<Sender>, state: Conn) {
        if sender.is_some() {
            // A new connection, perhaps to a restarted backend.
            self.load.restart_blackout();
        }
        self.sender.store(sender.map(Arc::new));
        self.conn.store(state as u8, Relaxed);
    }

    /// Its weight from load reports (weighted round robin).
    pub(crate) fn load_weight(&self) -> &LoadWeight {
        &self.load
    }

    /// Records why a connection attempt failed (`None`: it succeeded).
    pub(crate) fn set_last_error(&self, error: Option<String>) {
        self.last_error.store(error.map(Arc::new));
    }

    /// Why the last connection attempt failed, if it did.
    pub(crate) fn last_error(&self) -> Option<Arc<String>> {
        self.last_error.load_full()
    }

    /// A sender for one call, if the connection is up.
    pub(crate) fn sender(&self) -> Option<Sender> {
        let guard = self.sender.load();
        let sender = guard.as_ref()?;
        if sender.is_closed() {
            return None;
        }
        Some(Sender::clone(sender))
    }

    /// The connection went away under a call: stop picking it until the
    /// connection manager has reconnected.
    pub(crate) fn mark_closed(&self) {
        if self.conn() == Conn::Ready {
            self.conn.store(Conn::Connecting as u8, Relaxed);
        }
    }

    pub(crate) fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// Connected, and not ejected: may take a call.
    pub(crate) fn available(&self, now: u64) -> bool {
        self.conn() == Conn::Ready && !self.ejected(now)
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub(crate) fn start_call(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.calls.fetch_add(1, Relaxed);
    }

    pub(crate) fn end_call(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// The peak-EWMA latency estimate in nanoseconds, decayed to `now`.
    pub(crate) fn latency(&self, now: u64) -> f64 {
        let estimate = f64::from_bits(self.ewma_nanos.load(Relaxed));
        let stamp = self.ewma_stamp.load(Relaxed);
        let elapsed = now.saturating_sub(stamp) as f64;
        estimate * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// Folds one latency sample in: a peak raises the estimate at once, lower
    /// samples pull it down gradually (Finagle's and Linkerd's peak EWMA).
    pub(crate) fn observe(&self, rtt: Duration, now: u64) {
        let sample = rtt.as_nanos() as f64;
        let current = self.latency(now);
        let next = if sample > current {
            sample
        } else {
            let stamp = self.ewma_stamp.load(Relaxed);
            let elapsed = now.saturating_sub(stamp) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp().min(0.9);
            current * w + sample * (1.0 - w)
        };
        self.ewma_nanos.store(next.to_bits(), Relaxed);
        self.ewma_stamp.store(now, Relaxed);
    }

    /// Failure score in thousandths: a decaying average of recent failures.
    pub(crate) fn failure_score(&self) -> u32 {
        self.failure_score.load(Relaxed)
    }

    /// Records an outcome; returns the number of consecutive failures.
    pub(crate) fn record(&self, outcome: Outcome) -> u32 {
        let failed = match outcome {
            Outcome::Success => false,
            Outcome::ServerError | Outcome::Unavailable | Outcome::Timeout => true,
            Outcome::Cancelled => return self.consecutive_failures.load(Relaxed),
        };
        let score = self.failure_score.load(Relaxed);
        let next = (score * 9 + if failed { 1000 } else { 0 }) / 10;
        self.failure_score.store(next, Relaxed);
        if failed {
            self.failures.fetch_add(1, Relaxed);
            self.consecutive_failures.fetch_add(1, Relaxed) + 1
        } else {
            self.consecutive_failures.store(0, Relaxed);
            if self.ejections.load(Relaxed) > 0 && !self.ejected(now_nanos()) {
                self.ejections.store(0, Relaxed);
            }
            0
        }
    }

    /// Ejects for a backoff that doubles with each ejection in a row, with
    /// the workspace's one jitter rule (half the step to the whole step), so
    /// endpoints ejected together do not return together.
    pub(crate) fn eject(&self, base: Duration, max: Duration, now: u64) -> Duration {
        let n = self.ejections.fetch_add(1, Relaxed);
        let backoff = Backoff::new(base, max).delay(n);
        let until = now.saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        backoff
    }

    /// A test fixture: an endpoint on `127.0.0.1:port` of `weight` in
    /// `zone`, ready without a real connection (picks look at the state only).
    #[cfg(test)]
    pub(crate) fn ready_for_test(port: u16, weight: u32, zone: &str) -> Arc<Self> {
        let e = Self::new(
            ([127, 0, 0, 1], port).into(),
            None,
            weight,
            zone.into(),
            String::new(),
        );
        e.set_sender(None, Conn::Ready);
        e
    }

    /// Ends an ejection now (tests that reuse endpoints across rounds).
    #[cfg(test)]
    pub(crate) fn readmit(&self) {
        self.ejected_until.store(0, Relaxed);
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Relaxed)
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Arc<EndpointState> {
        EndpointState::new(
            "127.0.0.1:1".parse().unwrap(),
            None,
            1,
            String::new(),
            String::new(),
        )
    }

    #[test]
    fn peak_ewma_rises_at_once_and_decays_with_time() {
        let e = ep();
        let t0 = 1_000_000_000;
        e.observe(Duration::from_millis(10), t0);
        assert!((e.latency(t0) - 10e6).abs() < 1.0);
        e.observe(Duration::from_millis(1), t0 + 1_000_000);
        let pulled = e.latency(t0 + 1_000_000);
        assert!(pulled < 10e6 && pulled > 1e6, "{pulled}");
        // One time constant later with no samples, the estimate has decayed.
        assert!(e.latency(t0 + 1_000_000 + DECAY.as_nanos() as u64) < pulled / 2.0);
    }

    #[test]
    fn ejection_backs_off_and_success_resets_it() {
        let e = ep();
        let now = 10;
        let first = e.eject(Duration::from_secs(1), Duration::from_secs(30), now);
        assert!(e.ejected(now + 1));
        let second = e.eject(Duration::from_secs(1), Duration::from_secs(30), now);
        assert!(first <= Duration::from_secs(1), "{first:?}");
        assert!(
            second >= Duration::from_secs(1) && second <= Duration::from_secs(2),
            "the second ejection's step doubled: {second:?}"
        );
        assert_eq!(e.record(Outcome::Unavailable), 1);
        assert_eq!(e.record(Outcome::ServerError), 2);
        assert_eq!(e.record(Outcome::Cancelled), 2);
        assert_eq!(e.record(Outcome::Success), 0);
        assert!(e.failure_score() > 0);
    }
}
