//! Zone-aware picks: keep calls in the client's zone while it has the
//! capacity, spill the rest to other zones in proportion, and honour
//! EndpointSlice hints.
//!
//! A [`ZonePicker`] is built off the hot path whenever the endpoint list or
//! the zone shares change; a pick reads atomics only. It picks in layers,
//! each falling through to the next within the same call when it has no
//! usable endpoint (all ejected, connecting, failed, draining or gone), so a
//! zone that cannot take calls sends them elsewhere at once, with no failed
//! call:
//!
//! 1. **Hints** (Kubernetes topology-aware routing, kube-proxy's rules): if
//!    every non-draining endpoint carries node hints and some are for this
//!    client's node, only those; otherwise, if every one carries zone hints
//!    and some are for this client's zone, only those.
//! 2. **Zone shares** from the LB server (`WatchResponse.zone_shares`): a
//!    zone drawn by its share, then an endpoint within it by the channel's
//!    policy. A zone with no usable endpoint is skipped and its share goes
//!    to the other zones in proportion to theirs.
//! 3. **Every endpoint**, by the channel's policy: what a channel with no
//!    zone does, and the last resort of the layers above.
//!
//! Hints and shares do not combine: when hints are in effect they decide
//! alone. The EndpointSlice controller already spreads hinted endpoints over
//! zones in proportion to each zone's capacity, so applying the shares on top
//! would spill twice; and the LB server, which sees the same hints, names only
//! the hinted zones in its shares anyway. Shares take over only when no hinted
//! endpoint is usable.

use std::sync::Arc;

use crate::{
    endpoint::EndpointState,
    picker::{NoPick, Picker, Policy},
};

/// At most this many zones take part in share-based picks (the largest
/// shares); the rest are reached through the all-endpoints layer. A skipped
/// zone is one bit of a `u64`, so a pick that falls through allocates nothing.
const MAX_ZONES: usize = 64;

/// Where this client runs: its zone and node, empty if unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Locality {
    pub(crate) zone: String,
    pub(crate) node: String,
}

/// An endpoint's EndpointSlice hints: the zones and nodes whose clients
/// should use it. Empty: no hint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hints {
    pub(crate) for_zones: Vec<String>,
    pub(crate) for_nodes: Vec<String>,
}

/// The share of this client's calls one zone should take, in parts per
/// million of the shares' sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ZoneShare {
    pub(crate) zone: String,
    pub(crate) share: u32,
}

/// Shares as the LB server sent them, made safe to draw from: zero shares
/// and repeated zones (after the first) dropped, the largest [`MAX_ZONES`]
/// kept. Does not rescale: a draw is relative to the sum.
pub(crate) fn normalize(shares: Vec<ZoneShare>) -> Vec<ZoneShare> {
    let mut kept: Vec<ZoneShare> = Vec::with_capacity(shares.len());
    for share in shares {
        if share.share > 0 && !kept.iter().any(|k| k.zone == share.zone) {
            kept.push(share);
        }
    }
    if kept.len() > MAX_ZONES {
        // Stable: equal shares keep the server's order.
        kept.sort_by_key(|s| std::cmp::Reverse(s.share));
        kept.truncate(MAX_ZONES);
    }
    kept
}

/// One zone of the shares and the picker over its endpoints.
#[derive(Debug)]
struct Zone {
    name: String,
    share: u64,
    picker: Picker,
}

/// An immutable, zone-aware view of the endpoints (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ZonePicker {
    /// Every endpoint: the last layer, and what stats and ejection look at.
    all: Picker,
    /// The endpoints hinted for this client, when hints are in effect.
    hinted: Option<Picker>,
    /// Zones with a share, in the server's order.
    zones: Vec<Zone>,
    /// The shares' sum.
    total: u64,
}

impl ZonePicker {
    /// Builds the layers over `all` (sorted by address) for a client at
    /// `me`, with the server's `shares` (already [`normalize`]d).
    pub(crate) fn new(
        all: &[(Arc<EndpointState>, Hints)],
        me: &Locality,
        shares: &[ZoneShare],
    ) -> Self {
        let states: Vec<Arc<EndpointState>> = all.iter().map(|(e, _)| e.clone()).collect();
        let hinted = hinted(all, me).map(|chosen| Picker::new(&chosen));
        let zones: Vec<Zone> = shares
            .iter()
            .map(|s| {
                let members: Vec<_> = states
                    .iter()
                    .filter(|e| e.zone == s.zone)
                    .cloned()
                    .collect();
                Zone {
                    name: s.zone.clone(),
                    share: u64::from(s.share),
                    picker: Picker::new(&members),
                }
            })
            .collect();
        let total = zones.iter().map(|z| z.share).sum();
        Self {
            all: Picker::new(&states),
            hinted,
            zones,
            total,
        }
    }

    /// A picker with no zone layers: every endpoint by the policy.
    #[cfg(test)]
    pub(crate) fn flat(all: &[Arc<EndpointState>]) -> Self {
        Self {
            all: Picker::new(all),
            ..Self::default()
        }
    }

    /// The endpoints that may take new calls, in every zone.
    pub(crate) fn endpoints(&self) -> &[Arc<EndpointState>] {
        self.all.endpoints()
    }

    /// The zone shares in use, as `(zone, parts per million)`.
    pub(crate) fn shares(&self) -> Vec<(String, u32)> {
        self.zones
            .iter()
            .map(|z| (z.name.clone(), u32::try_from(z.share).unwrap_or(u32::MAX)))
            .collect()
    }

    /// Whether EndpointSlice hints decide the picks now.
    #[cfg(test)]
    pub(crate) fn hints_in_effect(&self) -> bool {
        self.hinted.is_some()
    }

    /// Picks an endpoint for one call, falling through the layers; the error
    /// says why no endpoint at all is usable.
    pub(crate) fn pick(&self, policy: Policy, now: u64) -> Result<&Arc<EndpointState>, NoPick> {
        if let Some(hinted) = &self.hinted
            && let Ok(picked) = hinted.pick(policy, now)
        {
            return Ok(picked);
        }
        if let Some(picked) = self.pick_by_share(policy, now) {
            return Ok(picked);
        }
        self.all.pick(policy, now)
    }

    /// A zone drawn by share, then an endpoint in it; a zone that cannot take
    /// the call is skipped and the draw repeated over the rest, so its share
    /// goes to them in proportion.
    fn pick_by_share(&self, policy: Policy, now: u64) -> Option<&Arc<EndpointState>> {
        let mut left = self.total;
        let mut skipped = 0u64;
        while left > 0 {
            let mut r = fastrand::u64(..left);
            let (i, zone) = self
                .zones
                .iter()
                .enumerate()
                .filter(|(i, _)| skipped & (1 << i) == 0)
                .find(|(_, z)| {
                    if r < z.share {
                        true
                    } else {
                        r -= z.share;
                        false
                    }
                })?;
            match zone.picker.pick(policy, now) {
                Ok(picked) => return Some(picked),
                Err(_) => {
                    skipped |= 1 << i;
                    left -= zone.share;
                }
            }
        }
        None
    }
}

/// The endpoints hints send this client to, if hints are in effect:
/// kube-proxy's rules over the non-draining endpoints (node hints first).
fn hinted(all: &[(Arc<EndpointState>, Hints)], me: &Locality) -> Option<Vec<Arc<EndpointState>>> {
    let serving: Vec<_> = all.iter().filter(|(e, _)| !e.draining()).collect();
    let choose = |hints_of: fn(&Hints) -> &[String], mine: &str| {
        if mine.is_empty() || serving.iter().any(|(_, h)| hints_of(h).is_empty()) {
            return None;
        }
        let chosen: Vec<_> = serving
            .iter()
            .filter(|(_, h)| hints_of(h).iter().any(|x| x == mine))
            .map(|(e, _)| e.clone())
            .collect();
        (!chosen.is_empty()).then_some(chosen)
    };
    choose(|h| &h.for_nodes, &me.node).or_else(|| choose(|h| &h.for_zones, &me.zone))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::endpoint::{Conn, now_nanos};

    /// A connected endpoint on port `port` in `zone`.
    fn ready(port: u16, zone: &str) -> Arc<EndpointState> {
        EndpointState::ready_for_test(port, 1, zone)
    }

    fn unhinted(endpoints: &[Arc<EndpointState>]) -> Vec<(Arc<EndpointState>, Hints)> {
        endpoints
            .iter()
            .map(|e| (e.clone(), Hints::default()))
            .collect()
    }

    fn shares(list: &[(&str, u32)]) -> Vec<ZoneShare> {
        normalize(
            list.iter()
                .map(|(zone, share)| ZoneShare {
                    zone: (*zone).into(),
                    share: *share,
                })
                .collect(),
        )
    }

    fn me(zone: &str) -> Locality {
        Locality {
            zone: zone.into(),
            node: String::new(),
        }
    }

    /// Calls per zone over `n` picks (`!` for a failed pick).
    fn per_zone(picker: &ZonePicker, policy: Policy, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let zone = match picker.pick(policy, now_nanos()) {
                Ok(e) => e.zone.clone(),
                Err(_) => "!".into(),
            };
            *counts.entry(zone).or_default() += 1;
        }
        counts
    }

    fn share_of(counts: &BTreeMap<String, usize>, zone: &str, n: usize) -> f64 {
        counts.get(zone).copied().unwrap_or(0) as f64 / n as f64
    }

    const POLICIES: [Policy; 3] = [Policy::RoundRobin, Policy::PeakEwma, Policy::LeastRequest];

    #[test]
    fn without_shares_every_endpoint_takes_calls_as_before() {
        let endpoints = vec![ready(1, "a"), ready(2, "a"), ready(3, "b")];
        let picker = ZonePicker::new(&unhinted(&endpoints), &me("a"), &[]);
        let mut per_port = BTreeMap::new();
        for _ in 0..300 {
            let e = picker.pick(Policy::RoundRobin, now_nanos()).unwrap();
            *per_port.entry(e.addr.port()).or_insert(0) += 1;
        }
        assert_eq!(per_port, BTreeMap::from([(1, 100), (2, 100), (3, 100)]));
    }

    #[test]
    fn calls_follow_the_shares() {
        let endpoints = vec![ready(1, "a"), ready(2, "b"), ready(3, "b"), ready(4, "c")];
        let all = unhinted(&endpoints);
        let local = ZonePicker::new(&all, &me("a"), &shares(&[("a", 1_000_000)]));
        for policy in POLICIES {
            assert_eq!(
                per_zone(&local, policy, 1_000),
                BTreeMap::from([("a".into(), 1_000)]),
                "{policy}"
            );
        }
        let n = 20_000;
        let split = ZonePicker::new(
            &all,
            &me("a"),
            &shares(&[("a", 500_000), ("b", 300_000), ("c", 200_000)]),
        );
        for policy in POLICIES {
            let counts = per_zone(&split, policy, n);
            for (zone, want) in [("a", 0.5), ("b", 0.3), ("c", 0.2)] {
                let got = share_of(&counts, zone, n);
                assert!((got - want).abs() < 0.02, "{policy} {zone}: {counts:?}");
            }
        }
    }

    /// The local zone cannot take calls for every reason an endpoint can be
    /// unusable: its share goes to the others in proportion, and no pick fails.
    #[test]
    fn an_unusable_zone_spills_its_share_in_proportion_with_no_failed_pick() {
        let n = 20_000;
        type Breaks = [(&'static str, fn(&Arc<EndpointState>)); 4];
        let make_unusable: Breaks = [
            ("ejected", |e| {
                e.eject(
                    Duration::from_secs(10),
                    Duration::from_secs(10),
                    now_nanos(),
                );
            }),
            ("unreachable", |e| e.set_sender(None, Conn::Failed)),
            ("connecting", |e| e.set_sender(None, Conn::Connecting)),
            ("draining", |e| e.set_draining(true)),
        ];
        for (how, break_it) in make_unusable {
            let endpoints = vec![ready(1, "a"), ready(2, "a"), ready(3, "b"), ready(4, "c")];
            break_it(&endpoints[0]);
            break_it(&endpoints[1]);
            let picker = ZonePicker::new(
                &unhinted(&endpoints),
                &me("a"),
                &shares(&[("a", 500_000), ("b", 300_000), ("c", 200_000)]),
            );
            for policy in POLICIES {
                let counts = per_zone(&picker, policy, n);
                assert!(!counts.contains_key("!"), "{how} {policy}: {counts:?}");
                assert!(!counts.contains_key("a"), "{how} {policy}: {counts:?}");
                let b = share_of(&counts, "b", n);
                assert!((b - 0.6).abs() < 0.02, "{how} {policy}: {counts:?}");
            }
        }
        // Gone: the shares name a zone that has no endpoint (any more).
        let endpoints = vec![ready(3, "b"), ready(4, "c")];
        let picker = ZonePicker::new(
            &unhinted(&endpoints),
            &me("a"),
            &shares(&[("a", 500_000), ("b", 250_000), ("c", 250_000)]),
        );
        let counts = per_zone(&picker, Policy::RoundRobin, n);
        assert!(!counts.contains_key("!"), "{counts:?}");
        assert!((share_of(&counts, "b", n) - 0.5).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn when_no_zone_with_a_share_can_take_calls_any_endpoint_does() {
        // Zone "c" has no share (and one endpoint has no zone at all): they
        // are the last resort, used only when the shared zones cannot serve.
        let endpoints = vec![ready(1, "a"), ready(2, "b"), ready(3, "c"), ready(4, "")];
        let picker = ZonePicker::new(
            &unhinted(&endpoints),
            &me("a"),
            &shares(&[("a", 600_000), ("b", 400_000)]),
        );
        let counts = per_zone(&picker, Policy::RoundRobin, 1_000);
        assert!(
            !counts.contains_key("c") && !counts.contains_key(""),
            "{counts:?}"
        );
        endpoints[0].set_sender(None, Conn::Failed);
        endpoints[1].set_sender(None, Conn::Failed);
        for policy in POLICIES {
            let counts = per_zone(&picker, policy, 1_000);
            assert!(!counts.contains_key("!"), "{policy}: {counts:?}");
            assert!(counts["c"] > 0 && counts[""] > 0, "{policy}: {counts:?}");
        }
        // Nothing usable anywhere: the error counts every endpoint.
        endpoints[2].set_sender(None, Conn::Failed);
        endpoints[3].set_sender(None, Conn::Connecting);
        assert_eq!(
            picker.pick(Policy::PeakEwma, now_nanos()).unwrap_err(),
            NoPick::Unavailable {
                total: 4,
                ejected: 0,
                connecting: 1,
                failed: 3
            }
        );
    }

    fn hinted_for(e: &Arc<EndpointState>, zones: &[&str]) -> (Arc<EndpointState>, Hints) {
        (
            e.clone(),
            Hints {
                for_zones: zones.iter().map(|z| (*z).into()).collect(),
                for_nodes: Vec::new(),
            },
        )
    }

    #[test]
    fn zone_hints_decide_when_every_serving_endpoint_has_one() {
        let endpoints = [ready(1, "a"), ready(2, "b"), ready(3, "b"), ready(4, "c")];
        // The slice controller gave zone a one endpoint of its own and one
        // of b's (a lacks capacity); the shares would keep a's calls home.
        let all = vec![
            hinted_for(&endpoints[0], &["a"]),
            hinted_for(&endpoints[1], &["a"]),
            hinted_for(&endpoints[2], &["b"]),
            hinted_for(&endpoints[3], &["c"]),
        ];
        let local_only = shares(&[("a", 1_000_000)]);
        let picker = ZonePicker::new(&all, &me("a"), &local_only);
        assert!(picker.hints_in_effect());
        let counts = per_zone(&picker, Policy::RoundRobin, 1_000);
        assert_eq!(
            counts,
            BTreeMap::from([("a".into(), 500), ("b".into(), 500)])
        );

        // A draining endpoint without hints does not turn hints off...
        let draining = ready(5, "c");
        draining.set_draining(true);
        let mut with_draining = all.clone();
        with_draining.push((draining, Hints::default()));
        assert!(ZonePicker::new(&with_draining, &me("a"), &local_only).hints_in_effect());
        // ...a serving one does, and so do hints that name no endpoint for
        // this zone, and a client that does not know its zone.
        let mut unhinted_one = all.clone();
        unhinted_one[3].1 = Hints::default();
        for (all, zone) in [(&unhinted_one, "a"), (&all, "d"), (&all, "")] {
            let picker = ZonePicker::new(all, &me(zone), &local_only);
            assert!(!picker.hints_in_effect(), "zone {zone:?}");
        }
        let picker = ZonePicker::new(&unhinted_one, &me("a"), &local_only);
        assert_eq!(
            per_zone(&picker, Policy::RoundRobin, 100),
            BTreeMap::from([("a".into(), 100)])
        );

        // No hinted endpoint usable: the shares take over, then everything.
        endpoints[0].set_sender(None, Conn::Failed);
        endpoints[1].set_sender(None, Conn::Failed);
        let picker = ZonePicker::new(&all, &me("a"), &shares(&[("c", 1_000_000)]));
        assert_eq!(
            per_zone(&picker, Policy::RoundRobin, 100),
            BTreeMap::from([("c".into(), 100)])
        );
        endpoints[3].set_sender(None, Conn::Failed);
        assert_eq!(
            per_zone(&picker, Policy::RoundRobin, 100),
            BTreeMap::from([("b".into(), 100)])
        );
    }

    #[test]
    fn node_hints_come_before_zone_hints() {
        let endpoints = [ready(1, "a"), ready(2, "a")];
        let hints = |node: &str| Hints {
            for_zones: vec!["a".into()],
            for_nodes: vec![node.into()],
        };
        let all = vec![
            (endpoints[0].clone(), hints("n1")),
            (endpoints[1].clone(), hints("n2")),
        ];
        let at = |node: &str| Locality {
            zone: "a".into(),
            node: node.into(),
        };
        let picker = ZonePicker::new(&all, &at("n2"), &[]);
        for _ in 0..10 {
            let e = picker.pick(Policy::RoundRobin, now_nanos()).unwrap();
            assert_eq!(e.addr.port(), 2);
        }
        // A node no endpoint is hinted for: the zone hints, both endpoints.
        let picker = ZonePicker::new(&all, &at("n3"), &[]);
        let ports: std::collections::BTreeSet<u16> = (0..10)
            .map(|_| {
                picker
                    .pick(Policy::RoundRobin, now_nanos())
                    .unwrap()
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(ports, [1, 2].into());
    }

    #[test]
    fn shares_are_made_safe_to_draw_from() {
        let kept = shares(&[("a", 0), ("b", 10), ("b", 20), ("c", 30)]);
        assert_eq!(
            kept,
            vec![
                ZoneShare {
                    zone: "b".into(),
                    share: 10
                },
                ZoneShare {
                    zone: "c".into(),
                    share: 30
                }
            ]
        );
        let many: Vec<(String, u32)> = (0..100).map(|i| (format!("z{i}"), i + 1)).collect();
        let many: Vec<(&str, u32)> = many.iter().map(|(z, s)| (z.as_str(), *s)).collect();
        let kept = shares(&many);
        assert_eq!(kept.len(), MAX_ZONES);
        assert_eq!(kept[0].zone, "z99");
        // All zero: no shares, as if the server sent none.
        assert!(shares(&[("a", 0)]).is_empty());
        let endpoints = vec![ready(1, "a")];
        let picker = ZonePicker::new(&unhinted(&endpoints), &me("a"), &shares(&[("a", 0)]));
        assert!(picker.shares().is_empty());
        assert!(picker.pick(Policy::RoundRobin, now_nanos()).is_ok());
    }
}
