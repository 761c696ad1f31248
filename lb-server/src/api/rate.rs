//! A token bucket: a burst, then a steady rate. The one rate limiter of the
//! APIs: an ADS stream's requests, and the NACK warnings per stream and over
//! the process, are each one [`TokenBucket`].
//!
//! It reads no clock: callers pass the time (tokio's `Instant`, so a test
//! with a paused clock can move it), and its tests step it by hand.

use std::time::Duration;

use tokio::time::Instant;

/// Up to `burst` tokens, refilled at `per_second`; one per event allowed.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket: `burst` events at once, then `per_second`.
    pub fn new(burst: u32, per_second: f64, now: Instant) -> Self {
        Self {
            burst: f64::from(burst),
            per_second,
            tokens: f64::from(burst),
            refilled: now,
        }
    }

    /// A full bucket: `burst` events at once, then one per `period`.
    pub fn every(burst: u32, period: Duration, now: Instant) -> Self {
        Self::new(burst, 1.0 / period.as_secs_f64(), now)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` more tokens for an event that turned out to cost more than
    /// one, into debt if need be: the next event waits until it is paid.
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// `None` if a token is there now, else when the next one will be.
    pub fn next_token(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        (self.tokens < 1.0)
            .then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut bucket = TokenBucket::new(3, 2.0, start);
        assert!((0..3).all(|_| bucket.try_take(start)));
        assert!(!bucket.try_take(start));
        assert_eq!(bucket.next_token(start), Some(at(500)));
        assert!(!bucket.try_take(at(499)));
        assert_eq!(bucket.next_token(at(500)), None);
        assert!(bucket.try_take(at(500)));
        assert!(!bucket.try_take(at(500)));
        // A long idle time refills the burst, never more.
        let later = at(60_000);
        assert_eq!((0..10).filter(|_| bucket.try_take(later)).count(), 3);
        // Time going backwards (it cannot, but) takes nothing.
        assert!(!bucket.try_take(start));
    }

    #[test]
    fn a_charge_is_paid_before_the_next_event() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, 10.0, start);
        assert!(bucket.try_take(start));
        bucket.charge(10.0, start);
        // 1 - 10 = -9 tokens: one more event needs 10, a second.
        assert_eq!(
            bucket.next_token(start),
            Some(start + Duration::from_secs(1))
        );
        assert!(!bucket.try_take(start + Duration::from_millis(999)));
        assert!(bucket.try_take(start + Duration::from_secs(1)));
    }

    #[test]
    fn one_per_period() {
        let start = Instant::now();
        let mut bucket = TokenBucket::every(1, Duration::from_secs(10), start);
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start + Duration::from_secs(9)));
        assert!(bucket.try_take(start + Duration::from_secs(10)));
    }
}
