//! Picking an endpoint for one call: round-robin, power of two choices on
//! peak-EWMA latency, least-request, or weighted round robin from backend
//! load reports, all weighted.
//!
//! A [`Picker`] is immutable once built (the pool builds a new one when the
//! endpoint list changes and swaps it in); a pick reads atomics only.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use crate::endpoint::{Conn, EndpointState};

/// How a channel picks a backend for each call. Every policy honours weights
/// and skips draining, ejected and unconnected endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Weighted round-robin: each endpoint in turn, in proportion to its weight.
    #[default]
    RoundRobin,
    /// Power of two choices on peak-EWMA latency times outstanding calls; the
    /// two candidates are drawn by weight. Failed calls count as slow, so fast
    /// failures do not attract traffic.
    PeakEwma,
    /// Power of two choices on outstanding calls, scaled up by the endpoint's
    /// recent failure rate; the two candidates are drawn by weight.
    LeastRequest,
    /// Weighted round robin from the load the backends report (ORCA, gRPC's
    /// A58): an endpoint's weight is its calls per second over its
    /// utilization, times the weight lb-server sends. Settings, and what is
    /// done with reports that make no sense, are in [`WrrConfig`](crate::WrrConfig)
    /// ([`Builder::wrr`](crate::Builder::wrr)). While no backend reports,
    /// it is plain round-robin.
    WeightedRoundRobin,
}

impl Policy {
    /// The policy's name, as [`FromStr`] accepts it.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::PeakEwma => "p2c",
            Policy::LeastRequest => "least-request",
            Policy::WeightedRoundRobin => "wrr",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" | "round_robin" | "rr" => Ok(Policy::RoundRobin),
            "p2c" | "peak-ewma" | "ewma" => Ok(Policy::PeakEwma),
            "least-request" | "least_request" | "lr" => Ok(Policy::LeastRequest),
            "wrr" | "weighted-round-robin" | "weighted_round_robin" => {
                Ok(Policy::WeightedRoundRobin)
            }
            _ => Err(format!(
                "unknown policy {s:?}: expected round-robin, p2c, least-request or wrr"
            )),
        }
    }
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoPick {
    /// The list has no endpoint that takes new calls (`draining` counts those left out).
    Empty { draining: usize },
    /// Endpoints exist but none is usable now.
    Unavailable {
        total: usize,
        ejected: usize,
        connecting: usize,
        failed: usize,
    },
}

/// An immutable view of the endpoints that may take new calls.
#[derive(Debug, Default)]
pub(crate) struct Picker {
    endpoints: Vec<Arc<EndpointState>>,
    draining: usize,
    /// Round-robin order: indices into `endpoints`, repeated by weight,
    /// interleaved (`lookaside_weights::schedule`). Weights are lb-server's,
    /// times the load-report weights when any endpoint has one.
    schedule: Vec<u32>,
    /// Prefix sums of the weights as the schedule uses them
    /// (`lookaside_weights::reduce`), for weighted random choice: a weight
    /// means the same to every policy.
    cumulative: Vec<u64>,
    next: AtomicUsize,
}

impl Picker {
    /// Builds a picker over the non-draining endpoints of `all`, weighted
    /// by their current load-report weights as well when any has one
    /// (only weighted round robin sets them).
    pub(crate) fn new(all: &[Arc<EndpointState>]) -> Self {
        let draining = all.iter().filter(|e| e.draining()).count();
        let endpoints: Vec<_> = all.iter().filter(|e| !e.draining()).cloned().collect();
        let mut weights: Vec<u32> = endpoints.iter().map(|e| e.weight()).collect();
        let load: Vec<Option<f64>> = endpoints
            .iter()
            .map(|e| e.load_weight().current())
            .collect();
        if let Some(combined) = crate::wrr::combine(&weights, &load) {
            weights = lookaside_weights::quantize(&combined);
        }
        // The workspace's one weighted scheduler, as lb-server's grpclb lists use.
        let schedule = lookaside_weights::schedule(&weights);
        let mut total = 0;
        let cumulative = lookaside_weights::reduce(&weights)
            .iter()
            .map(|w| {
                total += u64::from(*w);
                total
            })
            .collect();
        Self {
            endpoints,
            draining,
            schedule,
            cumulative,
            // Start each picker at a random place so that many clients
            // created together do not all start on the same backend.
            next: AtomicUsize::new(fastrand::usize(..usize::MAX / 2)),
        }
    }

    /// The endpoints that may take new calls.
    pub(crate) fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// Picks an endpoint for one call.
    pub(crate) fn pick(&self, policy: Policy, now: u64) -> Result<&Arc<EndpointState>, NoPick> {
        if self.endpoints.is_empty() {
            return Err(NoPick::Empty {
                draining: self.draining,
            });
        }
        let picked = match policy {
            Policy::RoundRobin | Policy::WeightedRoundRobin => self.round_robin(now),
            // Weights shape which two endpoints are drawn; the costs then
            // compare load alone, so that idle endpoints share by weight.
            Policy::PeakEwma => self.two_choices(now, |e| {
                e.latency(now).max(1_000.0) * f64::from(e.in_flight() + 1)
            }),
            Policy::LeastRequest => self.two_choices(now, |e| {
                f64::from(e.in_flight() + 1) * (1.0 + 8.0 * f64::from(e.failure_score()) / 1000.0)
            }),
        };
        picked.ok_or_else(|| self.why_not(now))
    }

    fn round_robin(&self, now: u64) -> Option<&Arc<EndpointState>> {
        let turn = self.next.fetch_add(1, Relaxed) % self.schedule.len();
        let endpoint = &self.endpoints[self.schedule[turn] as usize];
        if endpoint.available(now) {
            return Some(endpoint);
        }
        // The turn of an unusable endpoint goes to a usable one drawn by
        // weight: handing it to the next in the order would give that one
        // twice its share for as long as its neighbour is ejected.
        self.usable_by_weight(now)
    }

    /// A usable endpoint drawn at random by weight, if any is usable.
    fn usable_by_weight(&self, now: u64) -> Option<&Arc<EndpointState>> {
        // While most endpoints are usable a draw or two finds one.
        for _ in 0..4 {
            let endpoint = &self.endpoints[self.weighted_random()];
            if endpoint.available(now) {
                return Some(endpoint);
            }
        }
        let weight =
            |i: usize| self.cumulative[i] - i.checked_sub(1).map_or(0, |j| self.cumulative[j]);
        let usable: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].available(now))
            .collect();
        let total: u64 = usable.iter().map(|&i| weight(i)).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(..total);
        usable.into_iter().find_map(|i| {
            if r < weight(i) {
                Some(&self.endpoints[i])
            } else {
                r -= weight(i);
                None
            }
        })
    }

    fn two_choices(
        &self,
        now: u64,
        cost: impl Fn(&EndpointState) -> f64,
    ) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let a = self.weighted_random();
        if n == 1 {
            return Some(&self.endpoints[a]).filter(|e| e.available(now));
        }
        let mut b = self.weighted_random();
        if b == a {
            b = (a + 1 + fastrand::usize(..n - 1)) % n;
        }
        let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
        match (ea.available(now), eb.available(now)) {
            (true, true) => Some(if cost(eb) < cost(ea) { eb } else { ea }),
            (true, false) => Some(ea),
            (false, true) => Some(eb),
            // Both unusable: take the cheapest usable one, if any.
            (false, false) => self
                .endpoints
                .iter()
                .filter(|e| e.available(now))
                .min_by(|x, y| cost(x).total_cmp(&cost(y))),
        }
    }

    fn weighted_random(&self) -> usize {
        let total = *self.cumulative.last().expect("non-empty");
        let r = fastrand::u64(..total);
        self.cumulative.partition_point(|c| *c <= r)
    }

    fn why_not(&self, now: u64) -> NoPick {
        let mut why = NoPick::Unavailable {
            total: self.endpoints.len(),
            ejected: 0,
            connecting: 0,
            failed: 0,
        };
        if let NoPick::Unavailable {
            ejected,
            connecting,
            failed,
            ..
        } = &mut why
        {
            for e in &self.endpoints {
                match e.conn() {
                    Conn::Connecting => *connecting += 1,
                    Conn::Failed => *failed += 1,
                    Conn::Ready if e.ejected(now) => *ejected += 1,
                    Conn::Ready => {}
                }
            }
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;
    use crate::endpoint::{Outcome, now_nanos};

    fn ready(port: u16, weight: u32) -> Arc<EndpointState> {
        EndpointState::ready_for_test(port, weight, "")
    }

    fn counts(picker: &Picker, policy: Policy, n: usize) -> HashMap<u16, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let e = picker.pick(policy, now_nanos()).unwrap();
            *counts.entry(e.addr.port()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn every_policy_honours_weights() {
        let endpoints = vec![ready(1, 1), ready(2, 2), ready(3, 1)];
        let picker = Picker::new(&endpoints);
        let rr = counts(&picker, Policy::RoundRobin, 4000);
        assert_eq!((rr[&1], rr[&2], rr[&3]), (1000, 2000, 1000));
        for policy in [Policy::PeakEwma, Policy::LeastRequest] {
            let c = counts(&picker, policy, 40_000);
            // Idle endpoints cost the same per weight, so picks follow weights.
            let share = c[&2] as f64 / 40_000.0;
            assert!((share - 0.5).abs() < 0.05, "{policy}: {c:?}");
        }
    }

    #[test]
    fn an_unusable_endpoints_turns_are_shared_by_weight() {
        // In the order of ports [1, 2, 3, 4, 2], port 3 is ejected: its turns must
        // not all go to the endpoint after it.
        let endpoints = vec![ready(1, 1), ready(2, 2), ready(3, 1), ready(4, 1)];
        endpoints[2].eject(
            Duration::from_secs(10),
            Duration::from_secs(10),
            now_nanos(),
        );
        let picker = Picker::new(&endpoints);
        let c = counts(&picker, Policy::RoundRobin, 40_000);
        let share = |port| c[&port] as f64 / 40_000.0;
        assert!((share(2) - 0.5).abs() < 0.02, "{c:?}");
        for port in [1, 4] {
            assert!((share(port) - 0.25).abs() < 0.02, "{c:?}");
        }
        // With most endpoints unusable the draw falls back to a scan.
        for e in &endpoints[1..] {
            e.set_sender(None, Conn::Failed);
        }
        assert_eq!(counts(&picker, Policy::RoundRobin, 100)[&1], 100);
    }

    #[test]
    fn a_weight_means_the_same_to_every_policy() {
        // The schedule caps a weight at MAX_REPEAT times the smallest; the
        // random draws of p2c and least-request must use the same weights.
        let endpoints = vec![ready(1, 1_000_000), ready(2, 1), ready(3, 1)];
        let picker = Picker::new(&endpoints);
        let rr = counts(&picker, Policy::RoundRobin, 102_000);
        assert_eq!(rr[&2], 1_000);
        for policy in [Policy::PeakEwma, Policy::LeastRequest] {
            let c = counts(&picker, policy, 102_000);
            let small = c.get(&2).copied().unwrap_or(0);
            assert!((700..1_300).contains(&small), "{policy}: {c:?}");
        }
    }

    #[test]
    fn draining_ejected_and_unconnected_endpoints_get_no_calls() {
        let endpoints = vec![ready(1, 1), ready(2, 1), ready(3, 1), ready(4, 1)];
        endpoints[1].set_draining(true);
        endpoints[2].eject(
            Duration::from_secs(10),
            Duration::from_secs(10),
            now_nanos(),
        );
        endpoints[3].set_sender(None, Conn::Failed);
        let picker = Picker::new(&endpoints);
        for policy in [Policy::RoundRobin, Policy::PeakEwma, Policy::LeastRequest] {
            assert_eq!(counts(&picker, policy, 100)[&1], 100, "{policy}");
        }
        endpoints[0].set_sender(None, Conn::Connecting);
        assert_eq!(
            picker.pick(Policy::RoundRobin, now_nanos()).unwrap_err(),
            NoPick::Unavailable {
                total: 3,
                ejected: 1,
                connecting: 1,
                failed: 1
            }
        );
        let all_draining = Picker::new(&endpoints[1..2]);
        assert_eq!(
            all_draining
                .pick(Policy::PeakEwma, now_nanos())
                .unwrap_err(),
            NoPick::Empty { draining: 1 }
        );
    }

    #[test]
    fn fast_failures_do_not_attract_traffic() {
        let endpoints = vec![ready(1, 1), ready(2, 1), ready(3, 1)];
        let picker = Picker::new(&endpoints);
        let now = now_nanos();
        // Healthy endpoints answer in 2 ms; the bad one fails in 10 µs.
        endpoints[0].observe(Duration::from_millis(2), now);
        endpoints[1].observe(Duration::from_millis(2), now);
        endpoints[2].observe(crate::endpoint::FAILURE_PENALTY, now);
        for _ in 0..20 {
            endpoints[2].record(Outcome::ServerError);
        }
        for policy in [Policy::PeakEwma, Policy::LeastRequest] {
            let c = counts(&picker, policy, 3000);
            assert!(c.get(&3).copied().unwrap_or(0) < 150, "{policy}: {c:?}");
        }
    }

    #[test]
    fn p2c_prefers_the_less_loaded_endpoint() {
        let endpoints = vec![ready(1, 1), ready(2, 1)];
        let picker = Picker::new(&endpoints);
        for _ in 0..5 {
            endpoints[0].start_call();
        }
        for policy in [Policy::PeakEwma, Policy::LeastRequest] {
            assert_eq!(counts(&picker, policy, 100)[&2], 100, "{policy}");
        }
    }

    #[test]
    fn policies_parse() {
        for policy in [
            Policy::RoundRobin,
            Policy::PeakEwma,
            Policy::LeastRequest,
            Policy::WeightedRoundRobin,
        ] {
            assert_eq!(policy.as_str().parse::<Policy>().unwrap(), policy);
        }
        for name in ["weighted-round-robin", "weighted_round_robin"] {
            assert_eq!(name.parse::<Policy>(), Ok(Policy::WeightedRoundRobin));
        }
        assert!(
            "random"
                .parse::<Policy>()
                .unwrap_err()
                .contains("unknown policy")
        );
    }
}
