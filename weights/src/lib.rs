//! Lookaside's one weighted scheduler: the order in which weighted endpoints
//! take their turns in a round-robin.
//!
//! Two places turn weights into a round-robin order: lb-server's grpclb API,
//! whose stock clients round-robin over the server list it sends (so a
//! weight can only be expressed by repeating an entry), and lb-client's
//! round-robin picker, which walks the same kind of list with an atomic
//! cursor. Both must agree on what a weight means, so both call
//! [`schedule`]. It is a crate of its own for the reason `lookaside-backoff`
//! is: lb-server and lb-client both need it and neither may depend on the
//! other.
//!
//! The rule: weights are divided by their greatest common divisor (so 4:2
//! costs the list length of 2:1), each is capped at [`MAX_REPEAT`] (so one
//! huge weight cannot make a list of millions of entries), and the schedule
//! is built in rounds: round `r` lists, in input order, every endpoint whose
//! reduced weight is above `r`. Over the whole schedule each endpoint appears
//! exactly its reduced weight times, and the endpoints of equal weight
//! alternate instead of coming in runs.
//!
//! Weights that are not whole numbers (lb-client's weighted round robin
//! derives them from backend load reports) go through [`quantize`] first:
//! the same scheduler then orders them, to a resolution of one part in
//! [`MAX_REPEAT`] of the largest.

/// The most times one endpoint appears in a schedule: weights whose ratio is
/// above this are flattened to it (1,000,000 : 1 is scheduled as 100 : 1).
/// It bounds a schedule to `MAX_REPEAT` entries per endpoint.
pub const MAX_REPEAT: u32 = 100;

/// The round-robin order for endpoints of these `weights`: indices into
/// `weights`, each index appearing its reduced weight times (see the crate
/// docs). A weight of 0 never appears; all weights 0 (or none) give an empty
/// schedule.
///
/// ```
/// // 4:2:2 reduces to 2:1:1, in rounds: [0, 1, 2], then [0].
/// assert_eq!(lookaside_weights::schedule(&[4, 2, 2]), [0, 1, 2, 0]);
/// ```
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    let reduced = reduce(weights);
    let rounds = reduced.iter().copied().max().unwrap_or(0);
    let mut order = Vec::with_capacity(reduced.iter().map(|w| *w as usize).sum());
    for round in 0..rounds {
        for (index, weight) in reduced.iter().enumerate() {
            if *weight > round {
                order.push(u32::try_from(index).expect("fewer than 2^32 endpoints"));
            }
        }
    }
    order
}

/// The weights as the scheduler uses them: divided by their greatest common
/// divisor, each capped at [`MAX_REPEAT`]. A policy that draws endpoints at
/// random by weight (lb-client's power of two choices) draws by these, so
/// that a weight means the same under every policy.
///
/// ```
/// assert_eq!(lookaside_weights::reduce(&[4, 2, 2]), [2, 1, 1]);
/// assert_eq!(lookaside_weights::reduce(&[1_000_000, 1]), [100, 1]);
/// ```
pub fn reduce(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().fold(0, |g, w| gcd(g, *w)).max(1);
    weights
        .iter()
        .map(|w| (w / divisor).min(MAX_REPEAT))
        .collect()
}

/// Whole-number weights for the scheduler from real ones: the largest
/// becomes [`MAX_REPEAT`] and the others keep their ratio to it, rounded,
/// but at least 1 (a positive weight is never rounded away). A weight that
/// is not a positive finite number becomes 0 (never scheduled).
///
/// ```
/// let weights = lookaside_weights::quantize(&[2.0, 1.0, 0.001, f64::NAN]);
/// assert_eq!(weights, [100, 50, 1, 0]);
/// // 100:50:1 reduces to nothing smaller; the NaN never appears.
/// assert_eq!(lookaside_weights::schedule(&weights).len(), 151);
/// ```
pub fn quantize(weights: &[f64]) -> Vec<u32> {
    let usable = |w: f64| w.is_finite() && w > 0.0;
    let max = weights
        .iter()
        .copied()
        .filter(|w| usable(*w))
        .fold(0.0, f64::max);
    weights
        .iter()
        .map(|&w| {
            if !usable(w) {
                return 0;
            }
            // In 1..=MAX_REPEAT: the cast saturates and the ratio is at most 1.
            ((w / max * f64::from(MAX_REPEAT)).round() as u32).clamp(1, MAX_REPEAT)
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(weights: &[u32]) -> Vec<usize> {
        let order = schedule(weights);
        (0..weights.len())
            .map(|i| order.iter().filter(|&&j| j as usize == i).count())
            .collect()
    }

    #[test]
    fn each_endpoint_appears_its_reduced_weight_times() {
        assert_eq!(counts(&[1, 2, 1]), [1, 2, 1]);
        assert_eq!(counts(&[4, 2]), [2, 1], "4:2 reduces to 2:1");
        assert_eq!(counts(&[6, 9, 3]), [2, 3, 1]);
        assert_eq!(counts(&[7, 7, 7]), [1, 1, 1]);
    }

    #[test]
    fn rounds_interleave_in_input_order() {
        assert_eq!(schedule(&[4, 2]), [0, 1, 0]);
        assert_eq!(schedule(&[1, 3, 2]), [0, 1, 2, 1, 2, 1]);
    }

    #[test]
    fn a_huge_weight_is_capped() {
        assert_eq!(counts(&[1_000_000, 1]), [MAX_REPEAT as usize, 1]);
        assert_eq!(schedule(&[u32::MAX, u32::MAX - 1]).len(), 200);
    }

    #[test]
    fn real_weights_keep_their_ratio_to_the_largest() {
        assert_eq!(quantize(&[3.0, 1.0]), [100, 33]);
        assert_eq!(counts(&quantize(&[0.5, 0.5, 0.5])), [1, 1, 1]);
        assert_eq!(quantize(&[1e300, 1.0]), [100, 1], "never rounded to 0");
        assert_eq!(
            quantize(&[f64::INFINITY, -1.0, 0.0, f64::NAN, 2.0]),
            [0, 0, 0, 0, 100]
        );
        assert_eq!(quantize(&[]), Vec::<u32>::new());
    }

    #[test]
    fn zero_weights_and_no_endpoints_schedule_nothing() {
        assert_eq!(schedule(&[]), Vec::<u32>::new());
        assert_eq!(schedule(&[0, 0]), Vec::<u32>::new());
        assert_eq!(counts(&[0, 3]), [0, 1]);
    }
}
