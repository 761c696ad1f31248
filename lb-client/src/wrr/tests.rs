//! Weight math, blackout, expiry and clamping, on explicit times.

use std::collections::HashMap;

use super::*;
use crate::picker::{Picker, Policy};

const SECOND: u64 = 1_000_000_000;

fn report(qps: f64, cpu: f64) -> OrcaLoadReport {
    OrcaLoadReport {
        rps_fractional: qps,
        cpu_utilization: cpu,
        ..OrcaLoadReport::default()
    }
}

fn config() -> WrrConfig {
    WrrConfig {
        blackout_period: Duration::from_secs(10),
        weight_expiration_period: Duration::from_secs(180),
        ..WrrConfig::default()
    }
}

fn ready(port: u16, weight: u32) -> Arc<EndpointState> {
    EndpointState::ready_for_test(port, weight, "")
}

/// Calls per endpoint (by port) over `n` round-robin picks.
fn shares(endpoints: &[Arc<EndpointState>], n: usize) -> HashMap<u16, usize> {
    let picker = Picker::new(endpoints);
    let mut counts = HashMap::new();
    for _ in 0..n {
        let e = picker
            .pick(Policy::WeightedRoundRobin, now_nanos())
            .unwrap();
        *counts.entry(e.addr.port()).or_default() += 1;
    }
    counts
}

#[test]
fn weight_is_qps_over_utilization_plus_error_penalty() {
    assert_eq!(weight_of(&report(100.0, 0.5), 1.0), Some(200.0));
    // Application utilization wins over CPU when set.
    let mut r = report(100.0, 0.5);
    r.application_utilization = 0.25;
    assert_eq!(weight_of(&r, 1.0), Some(400.0));
    // 10 errors per 100 calls add 0.1 × penalty to the utilization.
    let mut r = report(100.0, 0.4);
    r.eps = 10.0;
    assert_eq!(weight_of(&r, 1.0), Some(200.0));
    assert_eq!(weight_of(&r, 0.0), Some(250.0), "no penalty");
    assert!((weight_of(&r, 6.0).unwrap() - 100.0).abs() < 1e-9);
}

#[test]
fn nonsense_reports_give_no_weight() {
    for (qps, cpu) in [
        (f64::NAN, 0.5),
        (100.0, f64::NAN),
        (-1.0, 0.5),
        (100.0, -0.5),
        (f64::INFINITY, 0.5),
        (100.0, f64::INFINITY),
        // No calls or no utilization: nothing to weigh (as A58).
        (0.0, 0.5),
        (100.0, 0.0),
    ] {
        assert_eq!(weight_of(&report(qps, cpu), 1.0), None, "{qps} {cpu}");
    }
    let mut r = report(100.0, 0.5);
    r.eps = f64::NAN;
    assert_eq!(weight_of(&r, 1.0), None, "a NaN anywhere discards it");
    r.eps = 0.0;
    r.application_utilization = -1.0;
    assert_eq!(weight_of(&r, 1.0), None);
    // Huge but finite figures give a finite weight, which the clamp bounds.
    assert_eq!(
        weight_of(&report(f64::MAX, f64::MIN_POSITIVE), 1.0),
        Some(f64::MAX)
    );
}

#[test]
fn a_weight_counts_only_after_the_blackout_and_until_it_expires() {
    let w = LoadWeight::default();
    let config = config();
    let t0 = 5 * SECOND;
    assert_eq!(w.usable(&config, t0), None, "no report yet");
    assert!(w.record(&report(100.0, 0.5), 1.0, t0));
    assert_eq!(w.usable(&config, t0 + 9 * SECOND), None, "in blackout");
    // Reports keep coming: the blackout runs from the first one.
    assert!(w.record(&report(50.0, 0.5), 1.0, t0 + 9 * SECOND));
    assert_eq!(w.usable(&config, t0 + 10 * SECOND), Some(100.0));
    // Not refreshed for the expiration period: dropped, and the run of
    // reports is over, so the next report starts a new blackout.
    let last = t0 + 9 * SECOND;
    assert_eq!(w.usable(&config, last + 179 * SECOND), Some(100.0));
    assert_eq!(w.usable(&config, last + 180 * SECOND), None);
    let t1 = last + 200 * SECOND;
    w.record(&report(100.0, 0.25), 1.0, t1);
    assert_eq!(w.usable(&config, t1 + 5 * SECOND), None, "a new blackout");
    assert_eq!(w.usable(&config, t1 + 10 * SECOND), Some(400.0));
    // A new connection starts a new blackout too.
    w.restart_blackout();
    w.record(&report(100.0, 0.25), 1.0, t1 + 11 * SECOND);
    assert_eq!(w.usable(&config, t1 + 12 * SECOND), None);
    // A zero blackout uses a weight at once.
    let no_blackout = WrrConfig {
        blackout_period: Duration::ZERO,
        ..config
    };
    assert_eq!(w.usable(&no_blackout, t1 + 12 * SECOND), Some(400.0));
}

#[test]
fn a_nonsense_report_changes_nothing() {
    let w = LoadWeight::default();
    let config = config();
    w.record(&report(100.0, 0.5), 1.0, SECOND);
    assert!(!w.record(&report(100.0, f64::NAN), 1.0, 2 * SECOND));
    assert!(!w.record(&report(-5.0, 0.5), 1.0, 3 * SECOND));
    assert_eq!(w.usable(&config, 11 * SECOND), Some(200.0));
    // Nor do nonsense reports keep a weight alive.
    assert_eq!(w.usable(&config, 181 * SECOND), None);
}

#[test]
fn weights_are_kept_within_the_ratio_of_the_median() {
    let clamped = clamp(&[Some(100.0), Some(1e-300), Some(f64::MAX), None], 10.0);
    assert_eq!(clamped, [Some(100.0), Some(10.0), Some(1000.0), None]);
    // An even count: the median is the mean of the middle two.
    let clamped = clamp(&[Some(1.0), Some(3.0)], 1.0);
    assert_eq!(clamped, [Some(2.0), Some(2.0)]);
    // Nothing known, nothing to clamp.
    assert_eq!(clamp(&[None, None], 10.0), [None, None]);
    // A nonsense ratio means no spread at all rather than none enforced.
    assert_eq!(
        clamp(&[Some(1.0), Some(2.0), Some(4.0)], f64::NAN),
        [Some(2.0), Some(2.0), Some(2.0)]
    );
}

#[test]
fn endpoints_without_a_weight_count_as_the_mean_and_lb_weights_multiply() {
    assert_eq!(combine(&[1, 1], &[None, None]), None, "plain weights");
    assert_eq!(
        combine(&[1, 2, 1], &[Some(100.0), Some(300.0), None]),
        Some(vec![100.0, 600.0, 200.0])
    );
    // Two huge weights: their mean does not overflow.
    let huge = combine(&[3, 1], &[Some(f64::MAX), Some(f64::MAX)]).unwrap();
    assert_eq!(huge, [f64::MAX, f64::MAX]);
}

#[test]
fn refresh_sets_the_clamped_weights_and_the_picker_follows_them() {
    let endpoints = vec![ready(1, 1), ready(2, 1), ready(3, 1), ready(4, 1)];
    let config = WrrConfig {
        blackout_period: Duration::ZERO,
        ..config()
    };
    let now = now_nanos();
    // Before any report: an even share.
    assert!(!refresh(&endpoints, &config, now));
    assert_eq!(
        shares(&endpoints, 400).values().collect::<Vec<_>>(),
        [&100; 4]
    );

    // 1 and 2 equal, 3 three times as loaded per call, 4 silent.
    endpoints[0]
        .load_weight()
        .record(&report(100.0, 0.3), 1.0, now);
    endpoints[1]
        .load_weight()
        .record(&report(100.0, 0.3), 1.0, now);
    endpoints[2]
        .load_weight()
        .record(&report(100.0, 0.9), 1.0, now);
    assert!(refresh(&endpoints, &config, now));
    assert!(!refresh(&endpoints, &config, now), "nothing new");
    let c = shares(&endpoints, 10_000);
    let third = c[&3] as f64 / c[&1] as f64;
    assert!((third - 1.0 / 3.0).abs() < 0.02, "{c:?}");
    // The silent one counts as the mean of the others: (3 + 3 + 1) / 3.
    let silent = c[&4] as f64 / c[&1] as f64;
    assert!((silent - 7.0 / 9.0).abs() < 0.03, "{c:?}");

    // A report of near-zero utilization cannot take more than ratio × median.
    endpoints[2]
        .load_weight()
        .record(&report(1e9, 1e-300), 1.0, now);
    refresh(&endpoints, &config, now);
    let median = endpoints[0].load_weight().current().unwrap();
    assert_eq!(endpoints[2].load_weight().current(), Some(median * 10.0));

    // Draining endpoints do not shape the median, and weights expire.
    endpoints[2].set_draining(true);
    refresh(&endpoints, &config, now);
    assert_eq!(endpoints[2].load_weight().current(), None);
    let later = now + nanos(config.weight_expiration_period);
    assert!(refresh(&endpoints, &config, later));
    assert!(
        endpoints
            .iter()
            .all(|e| e.load_weight().current().is_none())
    );
    assert_eq!(
        shares(&endpoints, 300).values().collect::<Vec<_>>(),
        [&100; 3]
    );
}

#[test]
fn lb_weights_still_apply_under_load_weights() {
    let endpoints = vec![ready(1, 3), ready(2, 1)];
    let config = WrrConfig {
        blackout_period: Duration::ZERO,
        ..config()
    };
    let now = now_nanos();
    for e in &endpoints {
        e.load_weight().record(&report(100.0, 0.5), 1.0, now);
    }
    refresh(&endpoints, &config, now);
    // 3:1 quantized to 100:33, one part in a hundred of the largest.
    let c = shares(&endpoints, 13_300);
    assert_eq!((c[&1], c[&2]), (10_000, 3_300), "{c:?}");
}
