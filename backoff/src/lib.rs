//! Lookaside's one retry backoff: exponential steps with one jitter rule.
//!
//! Every retry in the workspace waits through this crate: lb-server's
//! EndpointSlice watch, lb-client's LB subscription and backend reconnects,
//! and lb-client's endpoint ejections. It is a crate of its own because both
//! lb-server and lb-client need it and neither may depend on the other (a
//! server that links the client library, or a client library that exposes a
//! retry helper as public API, would both be the wrong dependency), and
//! `lookaside-proto` holds only protocols.
//!
//! The rule: attempt `n` (from 0) has the step `min × 2ⁿ`, capped at `max`,
//! and waits a delay drawn uniformly from **half the step to the whole step**
//! ("equal jitter"). So:
//! - `max` is a hard ceiling: no delay is ever longer, which is what lets a
//!   caller promise how soon it notices a peer that came back;
//! - no delay is shorter than half its step, so a failing peer is never
//!   retried in a busy loop, and many clients that failed together spread
//!   their retries over half a step instead of retrying in lockstep.

use std::time::Duration;

/// A backoff policy: the step doubles from `min` up to `max`; each delay is
/// drawn between half its step and the whole step. `Copy`, so one policy can
/// start any number of independent [`JitteredBackoff`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// A policy whose first step is `min` and whose longest delay is `max`.
    /// `max` below `min` is raised to `min`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
        }
    }

    /// The first step.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest step, and so the longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The step of attempt `attempt` (0 is the first): `min × 2^attempt`,
    /// capped at `max`.
    pub fn step(&self, attempt: u32) -> Duration {
        // 2^20 × any useful `min` is past any useful `max`; the cap keeps the
        // shift and the multiplication from overflowing.
        self.min.saturating_mul(1 << attempt.min(20)).min(self.max)
    }

    /// The delay of attempt `attempt`: uniform in `[step / 2, step]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        jitter(self.step(attempt), fastrand::f64())
    }

    /// A fresh sequence of delays at attempt 0.
    pub fn start(&self) -> JitteredBackoff {
        JitteredBackoff {
            policy: *self,
            attempt: 0,
        }
    }
}

/// The one jitter rule: `step × (1 + unit) / 2` for `unit` in `[0, 1]`.
fn jitter(step: Duration, unit: f64) -> Duration {
    step.mul_f64(0.5 + unit.clamp(0.0, 1.0) * 0.5)
}

/// The delays of one retry loop: each call to [`next_delay`](Self::next_delay)
/// moves one attempt on; [`reset`](Self::reset) after a success starts over.
#[derive(Debug, Clone)]
pub struct JitteredBackoff {
    policy: Backoff,
    attempt: u32,
}

impl JitteredBackoff {
    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The policy this sequence follows.
    pub fn policy(&self) -> Backoff {
        self.policy
    }
}

/// Never ends: a retry loop that should give up counts its own attempts.
impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_double_from_min_and_stop_at_max() {
        let policy = Backoff::new(100 * MS, 1000 * MS);
        let steps: Vec<u128> = (0..6).map(|n| policy.step(n).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.step(u32::MAX), 1000 * MS, "no overflow");
        assert_eq!(
            Backoff::new(Duration::MAX, Duration::MAX).step(40),
            Duration::MAX
        );
        assert_eq!(Backoff::new(500 * MS, 100 * MS).max(), 500 * MS);
    }

    #[test]
    fn jitter_spans_half_the_step_to_the_whole_step() {
        assert_eq!(jitter(800 * MS, 0.0), 400 * MS);
        assert_eq!(jitter(800 * MS, 0.5), 600 * MS);
        assert_eq!(jitter(800 * MS, 1.0), 800 * MS);
    }

    #[test]
    fn delays_stay_within_their_step_never_exceed_max_and_spread() {
        let policy = Backoff::new(100 * MS, 400 * MS);
        let mut backoff = policy.start();
        for step in [100, 200, 400, 400, 400, 400] {
            let delay = backoff.next_delay();
            let step = step * MS;
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        let spread: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| policy.delay(5)).collect();
        assert!(spread.len() > 10, "delays are jittered: {spread:?}");
        assert!(spread.iter().all(|d| *d <= policy.max()));
    }

    #[test]
    fn reset_starts_over_at_the_first_step() {
        let mut backoff = Backoff::new(100 * MS, 10_000 * MS).start();
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() >= 5000 * MS);
        backoff.reset();
        assert!(backoff.next_delay() <= 100 * MS);
        assert!(backoff.next().unwrap() > 100 * MS, "then it grows again");
    }
}
