//! Zone shares: how a client zone's calls should spread over the zones of a
//! service's endpoints, from the zones of every subscriber (which no single
//! client sees) and of every endpoint. Pure: it knows nothing of gRPC.
//!
//! The rule is Envoy's zone-aware routing, with capacity counted as endpoint
//! weight and demand as subscribers:
//! - a client zone whose fraction of the capacity is at least its fraction
//!   of the clients keeps all its calls local;
//! - otherwise it keeps `capacity fraction / client fraction` of them local,
//!   and spills the rest to the zones with surplus (capacity fraction above
//!   client fraction), in proportion to their surplus, so that every zone
//!   ends up loaded in proportion to its capacity;
//! - a client zone with no usable endpoint keeps nothing local, and so
//!   spills everything by that same rule (the brief said "in proportion to
//!   capacity"; by surplus is the same formula with a local fraction of 0,
//!   and it does not pile a zone without endpoints onto a zone whose own
//!   clients already fill it; when no other zone has clients the two agree);
//! - zones with no usable endpoint get nothing.
//!
//! There are no shares (route without regard to zones) when the client's
//! zone is unknown (empty), when no usable endpoint has a zone, or when the
//! usable endpoints are all in one zone. Endpoints without a zone are the
//! zone `""`: their capacity counts, and a share named `""` goes to them.
//!
//! EndpointSlice hints: when every usable endpoint carries `for_zones` (the
//! EndpointSlice controller sets them for all endpoints of a service or for
//! none), a client zone's shares go to the endpoints hinted for it, by
//! weight, named by the zones those endpoints are in; a zone no endpoint is
//! hinted for falls back to the rule above, as kube-proxy falls back to
//! every endpoint.
//!
//! Shares are parts per million, summing to exactly [`MILLION`] (largest
//! remainder), sorted by zone name; zones whose share rounds to 0 are left out.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    sync::Arc,
};

use crate::model::Endpoint;

/// The whole of a client zone's calls, in parts per million.
pub const MILLION: u32 = 1_000_000;

/// One zone's part of a client zone's calls.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ZoneShare {
    /// The endpoints' zone (`""`: endpoints without a zone).
    pub zone: Arc<str>,
    /// Parts per million.
    pub share: u32,
}

/// The shares of one client zone; empty for "route without regard to zones".
pub type Shares = Arc<[ZoneShare]>;

/// Subscribers per client zone (zones named, never `""`).
pub type ClientCounts = BTreeMap<Arc<str>, u64>;

/// Usable weight per zone.
type WeightByZone = BTreeMap<Arc<str>, u64>;

/// What the shares need of a snapshot's endpoints, computed once per
/// version: the usable (not draining) weight per zone, and per hinted zone
/// the usable weight hinted for it, by the endpoints' zones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capacity {
    by_zone: BTreeMap<Arc<str>, u64>,
    /// `Some` when every usable endpoint carries `for_zones`.
    hinted: Option<BTreeMap<Arc<str>, WeightByZone>>,
    /// Whether any usable endpoint has a zone.
    zoned: bool,
}

impl Capacity {
    /// The capacity of `endpoints`.
    pub fn of(endpoints: &[Endpoint]) -> Self {
        let mut by_zone: WeightByZone = BTreeMap::new();
        let mut hinted: Option<BTreeMap<Arc<str>, WeightByZone>> = Some(BTreeMap::new());
        let mut zoned = false;
        for endpoint in endpoints.iter().filter(|e| !e.draining) {
            let weight = u64::from(endpoint.weight.max(1));
            zoned |= !endpoint.zone.is_empty();
            let zone = interned(&mut by_zone, &endpoint.zone);
            *by_zone.get_mut(&zone).expect("just added") += weight;
            let for_zones = &endpoint.hints().for_zones;
            if for_zones.is_empty() {
                hinted = None;
            }
            if let Some(hinted) = &mut hinted {
                for client_zone in for_zones {
                    *hinted
                        .entry(Arc::clone(client_zone))
                        .or_default()
                        .entry(Arc::clone(&zone))
                        .or_default() += weight;
                }
            }
        }
        if by_zone.is_empty() {
            hinted = None;
        }
        Self {
            by_zone,
            hinted,
            zoned,
        }
    }

    /// The zones with usable endpoints.
    pub fn zones(&self) -> impl Iterator<Item = &Arc<str>> {
        self.by_zone.keys()
    }
}

/// The key of `zone` in `map`, added with 0 if new, so that one string is
/// shared by every share that names the zone.
fn interned(map: &mut BTreeMap<Arc<str>, u64>, zone: &str) -> Arc<str> {
    match map.get_key_value(zone) {
        Some((key, _)) => Arc::clone(key),
        None => {
            let key: Arc<str> = Arc::from(zone);
            map.insert(Arc::clone(&key), 0);
            key
        }
    }
}

/// The shares of the calls of clients in `zone`, given the service's
/// `capacity` and its subscribers per zone (`clients`, which should count
/// this client). See the module docs for the rule.
pub fn shares(capacity: &Capacity, clients: &ClientCounts, zone: &str) -> Shares {
    if zone.is_empty() || !capacity.zoned || capacity.by_zone.len() < 2 {
        return Arc::from([]);
    }
    if let Some(targets) = capacity.hinted.as_ref().and_then(|h| h.get(zone)) {
        let weights = targets.iter().map(|(z, w)| (z, *w as f64));
        return to_ppm(weights);
    }
    let total_capacity: u64 = capacity.by_zone.values().sum();
    let total_clients: u64 = clients.values().sum();
    let capacity_frac =
        |z: &str| capacity.by_zone.get(z).copied().unwrap_or(0) as f64 / total_capacity as f64;
    let client_frac = |z: &str| {
        if total_clients == 0 {
            0.0
        } else {
            clients.get(z).copied().unwrap_or(0) as f64 / total_clients as f64
        }
    };
    let (local_capacity, local_clients) = (capacity_frac(zone), client_frac(zone));
    if local_capacity > 0.0 && local_capacity >= local_clients {
        let (local, _) = capacity
            .by_zone
            .get_key_value(zone)
            .expect("a zone with capacity is listed");
        return Arc::from([ZoneShare {
            zone: Arc::clone(local),
            share: MILLION,
        }]);
    }
    let local = if local_clients > 0.0 {
        local_capacity / local_clients
    } else {
        0.0
    };
    let surplus: Vec<(&Arc<str>, f64)> = capacity
        .by_zone
        .keys()
        .filter(|z| ***z != *zone)
        .map(|z| (z, capacity_frac(z) - client_frac(z)))
        .filter(|(_, surplus)| *surplus > 0.0)
        .collect();
    let total_surplus: f64 = surplus.iter().map(|(_, s)| s).sum();
    let mut weights: Vec<(&Arc<str>, f64)> = Vec::with_capacity(capacity.by_zone.len());
    if total_surplus > 0.0 {
        weights.extend(
            surplus
                .into_iter()
                .map(|(z, s)| (z, (1.0 - local) * s / total_surplus)),
        );
    } else {
        // Only when this zone has no clients counted and every other zone
        // exactly its fill: spread by capacity.
        weights.extend(
            capacity
                .by_zone
                .iter()
                .filter(|(z, _)| ***z != *zone)
                .map(|(z, c)| (z, (1.0 - local) * *c as f64)),
        );
    }
    if local > 0.0
        && let Some((key, _)) = capacity.by_zone.get_key_value(zone)
    {
        weights.push((key, local));
    }
    to_ppm(weights)
}

/// Weights as parts per million summing to exactly [`MILLION`]: each gets
/// its rounded-down part, and the parts left over go to the largest
/// remainders (ties to the first zone by name). Zones with 0 are left out.
fn to_ppm<'a>(weights: impl IntoIterator<Item = (&'a Arc<str>, f64)>) -> Shares {
    let mut merged: BTreeMap<&Arc<str>, f64> = BTreeMap::new();
    for (zone, weight) in weights {
        if weight > 0.0 && weight.is_finite() {
            match merged.entry(zone) {
                Entry::Occupied(mut e) => *e.get_mut() += weight,
                Entry::Vacant(e) => {
                    e.insert(weight);
                }
            }
        }
    }
    let total: f64 = merged.values().sum();
    if merged.is_empty() || total <= 0.0 {
        return Arc::from([]);
    }
    let exact: Vec<(&Arc<str>, f64)> = merged
        .into_iter()
        .map(|(z, w)| (z, w / total * f64::from(MILLION)))
        .collect();
    let mut parts: Vec<(&Arc<str>, u32, f64)> = exact
        .iter()
        .map(|&(z, x)| {
            let floor = x.floor().min(f64::from(MILLION));
            (z, floor as u32, x - floor)
        })
        .collect();
    let given: u32 = parts.iter().map(|(_, p, _)| p).sum();
    let mut left = MILLION.saturating_sub(given);
    let mut order: Vec<usize> = (0..parts.len()).collect();
    // Stable: ties keep zone-name order.
    order.sort_by(|&a, &b| parts[b].2.total_cmp(&parts[a].2));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        parts[i].1 += 1;
        left -= 1;
    }
    parts
        .into_iter()
        .filter(|(_, share, _)| *share > 0)
        .map(|(zone, share, _)| ZoneShare {
            zone: Arc::clone(zone),
            share,
        })
        .collect()
}

/// Whether `new` differs from `old` enough to be worth a push: one became
/// empty while the other did not, or some zone's share moved by more than
/// `threshold` parts per million (a zone missing from one counts as 0).
pub fn moved(old: &[ZoneShare], new: &[ZoneShare], threshold: u32) -> bool {
    if old.is_empty() != new.is_empty() {
        return true;
    }
    let find = |list: &[ZoneShare], zone: &str| {
        list.iter()
            .find(|s| *s.zone == *zone)
            .map_or(0, |s| s.share)
    };
    old.iter()
        .chain(new)
        .any(|s| find(old, &s.zone).abs_diff(find(new, &s.zone)) > threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` endpoints in `zone`, numbered from `first`.
    fn eps(zone: &str, first: u8, count: u8) -> Vec<Endpoint> {
        (first..first + count)
            .map(|i| Endpoint::new(format!("10.0.0.{i}").parse().unwrap(), 80).zone(zone))
            .collect()
    }

    fn clients(counts: &[(&str, u64)]) -> ClientCounts {
        counts.iter().map(|(z, n)| (Arc::from(*z), *n)).collect()
    }

    fn of(endpoints: &[Endpoint], counts: &[(&str, u64)], zone: &str) -> Vec<(String, u32)> {
        let shares = shares(&Capacity::of(endpoints), &clients(counts), zone);
        let sum: u32 = shares.iter().map(|s| s.share).sum();
        assert!(shares.is_empty() || sum == MILLION, "{shares:?}");
        shares
            .iter()
            .map(|s| (s.zone.to_string(), s.share))
            .collect()
    }

    fn list(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(z, s)| (z.to_string(), *s)).collect()
    }

    #[test]
    fn two_equal_zones_with_clients_in_both_stay_local() {
        let endpoints = [eps("a", 1, 2), eps("b", 3, 2)].concat();
        let counts = [("a", 5), ("b", 5)];
        assert_eq!(of(&endpoints, &counts, "a"), list(&[("a", MILLION)]));
        assert_eq!(of(&endpoints, &counts, "b"), list(&[("b", MILLION)]));
    }

    #[test]
    fn a_small_zone_keeps_its_capacity_over_its_clients_and_spills_the_rest() {
        // a: 1 of 4 endpoints, half of the clients: 0.25 / 0.5 stays local.
        let endpoints = [eps("a", 1, 1), eps("b", 2, 3)].concat();
        let counts = [("a", 3), ("b", 3)];
        assert_eq!(
            of(&endpoints, &counts, "a"),
            list(&[("a", 500_000), ("b", 500_000)])
        );
        assert_eq!(of(&endpoints, &counts, "b"), list(&[("b", MILLION)]));
        // Every zone then takes load in proportion to its capacity: a gets
        // half of a's half, b all of b's half plus the other half of a's.
        let load_a = 0.5 * 0.5;
        assert!((load_a - 0.25f64).abs() < 1e-9);
    }

    #[test]
    fn a_zone_whose_only_endpoint_drains_sends_everything_elsewhere() {
        let mut endpoints = [eps("a", 1, 1), eps("b", 2, 3)].concat();
        endpoints[0].draining = true;
        // Only one zone is usable: no shares needed, everything goes to b anyway.
        assert!(of(&endpoints, &[("a", 1), ("b", 1)], "a").is_empty());
        // With a third zone, a's clients go to the zones with surplus.
        endpoints.extend(eps("c", 5, 1));
        assert_eq!(
            of(&endpoints, &[("a", 1), ("b", 1), ("c", 1)], "a"),
            list(&[("b", MILLION)]),
            "b has 3/4 of the capacity for 1/3 of the clients; c 1/4 for 1/3"
        );
    }

    #[test]
    fn a_client_zone_without_endpoints_spills_by_surplus() {
        let endpoints = [eps("a", 1, 1), eps("b", 2, 3)].concat();
        // No other clients: by surplus is by capacity.
        assert_eq!(
            of(&endpoints, &[("c", 4)], "c"),
            list(&[("a", 250_000), ("b", 750_000)])
        );
        // Clients in a fill a; b has the surplus.
        assert_eq!(
            of(&endpoints, &[("a", 1), ("c", 3)], "c"),
            list(&[("b", MILLION)])
        );
    }

    #[test]
    fn no_shares_without_a_client_zone_zoned_endpoints_or_a_second_zone() {
        let endpoints = [eps("a", 1, 1), eps("b", 2, 3)].concat();
        assert!(of(&endpoints, &[("a", 1)], "").is_empty());
        assert!(of(&eps("", 1, 4), &[("a", 1)], "a").is_empty());
        assert!(of(&eps("a", 1, 4), &[("a", 1), ("b", 1)], "b").is_empty());
        assert!(of(&[], &[("a", 1)], "a").is_empty());
    }

    #[test]
    fn weights_count_as_capacity_and_draining_endpoints_do_not() {
        let mut endpoints = [eps("a", 1, 1), eps("b", 2, 2)].concat();
        endpoints[0].weight = 2;
        endpoints[1].draining = true;
        // a: weight 2, b: weight 1 usable: a's clients (half) stay local.
        let counts = [("a", 1), ("b", 1)];
        assert_eq!(of(&endpoints, &counts, "a"), list(&[("a", MILLION)]));
        // b: 1/3 of capacity for half of the clients: 2/3 local.
        assert_eq!(
            of(&endpoints, &counts, "b"),
            list(&[("a", 333_333), ("b", 666_667)])
        );
    }

    #[test]
    fn shares_sum_to_a_million_and_endpoints_without_a_zone_take_spill() {
        let endpoints = [
            eps("a", 1, 1),
            eps("b", 2, 1),
            eps("", 3, 1),
            eps("c", 4, 3),
        ]
        .concat();
        let counts = [("a", 7), ("b", 3), ("c", 1)];
        let a = of(&endpoints, &counts, "a");
        assert_eq!(
            a[0].0, "",
            "sorted by name; the zone-less endpoints take a part"
        );
        assert_eq!(a.iter().map(|(_, s)| s).sum::<u32>(), MILLION);
        assert!(a.iter().any(|(z, _)| z == "a"));
        for zone in ["a", "b", "c", "d"] {
            let shares = of(&endpoints, &counts, zone);
            assert!(!shares.is_empty(), "{zone}");
            assert!(
                shares.iter().all(|(z, _)| z != "d"),
                "no endpoints, no share"
            );
        }
    }

    #[test]
    fn hints_send_a_zone_to_the_endpoints_hinted_for_it() {
        // The controller gave one of b's endpoints to a: a has 2, b has 2.
        let endpoints = vec![
            eps("a", 1, 1)[0].clone().for_zones(["a"]),
            eps("b", 2, 1)[0].clone().for_zones(["a"]),
            eps("b", 3, 1)[0].clone().for_zones(["b"]),
            eps("b", 4, 1)[0].clone().for_zones(["b"]),
        ];
        let counts = [("a", 1), ("b", 1)];
        assert_eq!(
            of(&endpoints, &counts, "a"),
            list(&[("a", 500_000), ("b", 500_000)])
        );
        assert_eq!(of(&endpoints, &counts, "b"), list(&[("b", MILLION)]));
        // A zone no endpoint is hinted for falls back to the rule: a's
        // capacity (1/4) is a's clients' fraction, b has the surplus.
        assert_eq!(
            of(&endpoints, &[("a", 1), ("b", 1), ("c", 2)], "c"),
            list(&[("b", MILLION)])
        );
        // One usable endpoint without hints: hints are not followed at all.
        let mut partial = endpoints.clone();
        partial.push(eps("b", 5, 1).remove(0));
        assert_eq!(of(&partial, &counts, "b"), list(&[("b", MILLION)]));
        assert_eq!(
            of(&partial, &counts, "a"),
            list(&[("a", 400_000), ("b", 600_000)]),
            "a: 1/5 of the capacity for 1/2 of the clients"
        );
        // ... but a draining one does not count.
        partial.last_mut().unwrap().draining = true;
        assert_eq!(
            of(&partial, &counts, "a"),
            list(&[("a", 500_000), ("b", 500_000)])
        );
    }

    #[test]
    fn a_push_needs_a_move_past_the_threshold() {
        let share = |zone: &str, share: u32| ZoneShare {
            zone: Arc::from(zone),
            share,
        };
        let old = [share("a", 500_000), share("b", 500_000)];
        let near = [share("a", 509_999), share("b", 490_001)];
        let far = [share("a", 510_001), share("b", 489_999)];
        assert!(!moved(&old, &old, 10_000));
        assert!(!moved(&old, &near, 10_000));
        assert!(moved(&old, &far, 10_000));
        assert!(moved(&old, &[], 10_000) && moved(&[], &old, 10_000));
        // A zone that appears with a small share is no push; a large one is.
        let small = [share("a", 495_000), share("b", 495_000), share("c", 10_000)];
        assert!(!moved(&old, &small, 10_000));
        let large = [
            share("a", 400_000),
            share("b", 400_000),
            share("c", 200_000),
        ];
        assert!(moved(&old, &large, 10_000));
    }

    #[test]
    fn rounding_gives_the_leftover_parts_to_the_largest_remainders() {
        let endpoints = [eps("a", 1, 1), eps("b", 2, 1), eps("c", 3, 1)].concat();
        let shares = of(&endpoints, &[("d", 1)], "d");
        assert_eq!(
            shares,
            list(&[("a", 333_334), ("b", 333_333), ("c", 333_333)])
        );
    }
}
