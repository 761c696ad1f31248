//! Counters a user can export: per channel and per endpoint.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) picks: Counter,
    pub(crate) no_endpoint: Counter,
    pub(crate) retries: Counter,
    pub(crate) ejections: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) lb_updates: Counter,
    pub(crate) lb_errors: Counter,
}

/// Channel-wide counters since the channel was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelStats {
    /// Calls sent to a picked endpoint.
    pub picks: u64,
    /// Calls failed with `UNAVAILABLE` because no endpoint was usable.
    pub no_endpoint: u64,
    /// Calls re-sent to another endpoint because their connection closed
    /// before the request left the client.
    pub retries: u64,
    /// Endpoints ejected after failures.
    pub ejections: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Endpoint lists received from LB servers.
    pub lb_updates: u64,
    /// LB subscriptions that failed or ended.
    pub lb_errors: u64,
}

/// One endpoint's state and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    /// The backend's address.
    pub addr: SocketAddr,
    /// Its zone, if the LB server knows it.
    pub zone: String,
    /// Its pod name, if the LB server knows it.
    pub pod: String,
    /// Its weight.
    pub weight: u32,
    /// Draining: finishing calls, taking no new ones.
    pub draining: bool,
    /// Its HTTP/2 connection is up.
    pub connected: bool,
    /// Ejected after failures, for now.
    pub ejected: bool,
    /// Calls in flight.
    pub in_flight: u32,
    /// Calls sent to it.
    pub calls: u64,
    /// Calls that failed on it.
    pub failures: u64,
    /// Its peak-EWMA latency estimate.
    pub latency: Duration,
    /// Its weight from its load reports as weighted round robin uses it
    /// (past the blackout, not expired, clamped around the median), before
    /// it is multiplied by [`weight`](Self::weight). `None` when it has
    /// none: another policy, no reports yet, in blackout or expired; it
    /// then counts as the mean of the endpoints that have one.
    pub load_weight: Option<f64>,
}
