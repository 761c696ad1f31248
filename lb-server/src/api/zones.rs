//! The zone board: per service, how many Discovery subscribers are in each
//! zone, and the zone shares ([`crate::zones`]) each zone's subscribers are
//! sent, encoded once per zone and shared by every stream of that zone.
//!
//! Who counts: Discovery subscribers that name a zone on their Watch. xDS
//! clients do not: they route by EDS priority (their own zone first), not by
//! shares, so counting them would skew the shares of those who use them;
//! grpclb clients name no zone.
//!
//! When shares change:
//! - With a new version of a service's endpoints, at once: the first stream
//!   to send that version recomputes every zone's shares (once per version,
//!   not per subscriber), and the new shares ride the new version.
//! - When subscribers come and go, with the version unchanged, but bounded:
//!   a task per service recomputes at most once per [`RECOMPUTE_INTERVAL`],
//!   and a zone's subscribers are sent new shares only when a share moved by
//!   more than [`PUSH_THRESHOLD`] from what they were last sent. A burst of
//!   connects or disconnects (a rollout of clients, a restart of lb-server)
//!   thus costs one recompute a second and no push for changes too small to
//!   matter, instead of one push to every subscriber per connect; and since
//!   the comparison is with what was sent, not with the last computation,
//!   slow drift still gets sent once it adds up.
//! - A subscriber in a zone new to the service gets shares computed for it
//!   at once, in its first response; other zones learn of it within the
//!   interval.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use lookaside_proto::lookaside::v1 as pb;
use tokio::sync::{Notify, watch};
use tokio_stream::wrappers::WatchStream;
use tracing::{Instrument, info_span};

use crate::{
    model::{ServiceKey, Snapshot},
    zones::{Capacity, ClientCounts, Shares, moved, shares},
};

/// The shortest time between two recomputations of a service's shares
/// driven by subscribers coming and going.
pub const RECOMPUTE_INTERVAL: Duration = Duration::from_secs(1);

/// How far (parts per million: 1%) a share must move before the
/// subscribers of a zone are sent it with an unchanged version.
pub const PUSH_THRESHOLD: u32 = 10_000;

/// Every service's zones; one per server, in the subscriber registry.
#[derive(Debug)]
pub struct ZoneBoard {
    // std Mutex: held to find, add or remove a service and to change its
    // counts, never across `.await`. Taken before a service's own lock.
    services: Mutex<HashMap<ServiceKey, Arc<ServiceZones>>>,
    interval: Duration,
}

impl Default for ZoneBoard {
    fn default() -> Self {
        Self::with_interval(RECOMPUTE_INTERVAL)
    }
}

impl ZoneBoard {
    /// A board that recomputes a service's shares at most once per `interval`.
    pub fn with_interval(interval: Duration) -> Self {
        Self {
            services: Mutex::new(HashMap::new()),
            interval,
        }
    }

    /// Counts a subscriber of `key` in `zone` (not empty) while the returned
    /// membership lives. Must be called within a tokio runtime: the first
    /// member of a service starts its recompute task.
    pub fn join(self: &Arc<Self>, key: &ServiceKey, zone: &str) -> Membership {
        let mut services = self.services.lock().unwrap();
        let service = services.entry(key.clone()).or_insert_with(|| {
            let service = Arc::new(ServiceZones {
                state: Mutex::new(State::default()),
                table: watch::Sender::new(Arc::new(ZoneTable::default())),
                dirty: Notify::new(),
            });
            let span = info_span!("zone_shares", target_key = %key);
            tokio::spawn(recompute_loop(Arc::clone(&service), self.interval).instrument(span));
            service
        });
        let service = Arc::clone(service);
        let zone = {
            let mut state = service.state.lock().unwrap();
            let zone = match state.counts.get_key_value(zone) {
                Some((zone, _)) => Arc::clone(zone),
                None => Arc::from(zone),
            };
            *state.counts.entry(Arc::clone(&zone)).or_default() += 1;
            zone
        };
        drop(services);
        service.dirty.notify_one();
        Membership {
            board: Arc::clone(self),
            key: key.clone(),
            service,
            zone,
        }
    }

    /// Subscribers per zone of a service, for Admin and tests.
    pub fn counts(&self, key: &ServiceKey) -> ClientCounts {
        let services = self.services.lock().unwrap();
        services
            .get(key)
            .map(|s| s.state.lock().unwrap().counts.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug)]
struct ServiceZones {
    // std Mutex: held to compute shares (no I/O, no `.await`).
    state: Mutex<State>,
    /// The shares each zone's subscribers are to be sent; streams watch it.
    table: watch::Sender<Arc<ZoneTable>>,
    /// Subscribers came or went: the recompute task has work.
    dirty: Notify,
}

#[derive(Debug, Default)]
struct State {
    counts: ClientCounts,
    /// The snapshot version `capacity` is of; 0 before any.
    version: u64,
    capacity: Arc<Capacity>,
    /// The last member left: the recompute task ends.
    closed: bool,
}

/// The shares of every zone of one service.
#[derive(Debug, Default)]
pub struct ZoneTable {
    /// The snapshot version the shares were computed from.
    pub version: u64,
    entries: HashMap<Arc<str>, Arc<ZoneEntry>>,
}

/// One zone's shares and their encoding.
#[derive(Debug)]
pub struct ZoneEntry {
    /// The shares; empty for none.
    pub shares: Shares,
    /// `WatchResponse.zone_shares` encoded: appended to an encoded
    /// `WatchResponse`, it sets the field (protobuf merges concatenated
    /// messages). Empty for no shares.
    pub encoded: Bytes,
}

impl ZoneEntry {
    fn new(shares: Shares) -> Arc<Self> {
        let message = pb::WatchResponse {
            zone_shares: shares
                .iter()
                .map(|s| pb::ZoneShare {
                    zone: s.zone.to_string(),
                    share: s.share,
                })
                .collect(),
            ..Default::default()
        };
        let encoded = Bytes::from(prost::Message::encode_to_vec(&message));
        Arc::new(Self { shares, encoded })
    }
}

/// One subscriber counted in its zone; uncounts it on drop.
#[derive(Debug)]
pub struct Membership {
    board: Arc<ZoneBoard>,
    key: ServiceKey,
    service: Arc<ServiceZones>,
    zone: Arc<str>,
}

impl Membership {
    /// The subscriber's zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// This zone's shares for a message that carries `snapshot`. The first
    /// call for a newer version recomputes every zone's (see the module docs).
    pub fn entry_for(&self, snapshot: &Snapshot) -> Arc<ZoneEntry> {
        let mut state = self.service.state.lock().unwrap();
        if snapshot.version > state.version {
            state.version = snapshot.version;
            state.capacity = Arc::new(Capacity::of(&snapshot.endpoints));
            let entries: HashMap<_, _> = state
                .counts
                .keys()
                .map(|zone| {
                    let entry = ZoneEntry::new(shares(&state.capacity, &state.counts, zone));
                    (Arc::clone(zone), entry)
                })
                .collect();
            let entry = Arc::clone(&entries[&self.zone]);
            self.service.table.send_replace(Arc::new(ZoneTable {
                version: snapshot.version,
                entries,
            }));
            return entry;
        }
        let table = self.service.table.borrow().clone();
        if let Some(entry) = table.entries.get(&self.zone) {
            return Arc::clone(entry);
        }
        // The first of its zone since the last recompute: its own shares now.
        let entry = ZoneEntry::new(shares(&state.capacity, &state.counts, &self.zone));
        let mut entries = table.entries.clone();
        entries.insert(Arc::clone(&self.zone), Arc::clone(&entry));
        self.service.table.send_replace(Arc::new(ZoneTable {
            version: table.version,
            entries,
        }));
        entry
    }

    /// Every later change of the service's table.
    pub fn changes(&self) -> WatchStream<Arc<ZoneTable>> {
        WatchStream::from_changes(self.service.table.subscribe())
    }

    /// The service's current table.
    pub fn table(&self) -> Arc<ZoneTable> {
        self.service.table.borrow().clone()
    }

    /// This zone's entry in `table`.
    pub fn entry_in(&self, table: &ZoneTable) -> Option<Arc<ZoneEntry>> {
        table.entries.get(&self.zone).cloned()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut services = self.board.services.lock().unwrap();
        let mut state = self.service.state.lock().unwrap();
        if let Some(count) = state.counts.get_mut(&self.zone) {
            *count -= 1;
            if *count == 0 {
                state.counts.remove(&self.zone);
            }
        }
        if state.counts.is_empty() {
            state.closed = true;
            if services
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.service))
            {
                services.remove(&self.key);
            }
        }
        drop(state);
        drop(services);
        self.service.dirty.notify_one();
    }
}

/// Recomputes a service's shares when subscribers come and go, at most once
/// per `interval`; ends when its last member leaves.
async fn recompute_loop(service: Arc<ServiceZones>, interval: Duration) {
    loop {
        service.dirty.notified().await;
        if !recompute(&service) {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Recomputes every zone's shares from the current counts, keeping a zone's
/// entry unless a share moved past [`PUSH_THRESHOLD`]. False once closed.
fn recompute(service: &ServiceZones) -> bool {
    let state = service.state.lock().unwrap();
    if state.closed {
        return false;
    }
    if state.version == 0 {
        return true;
    }
    let table = service.table.borrow().clone();
    let mut changed = false;
    let entries: HashMap<_, _> = state
        .counts
        .keys()
        .map(|zone| {
            let new = shares(&state.capacity, &state.counts, zone);
            let entry = match table.entries.get(zone) {
                Some(old) if !moved(&old.shares, &new, PUSH_THRESHOLD) => Arc::clone(old),
                _ => {
                    changed = true;
                    ZoneEntry::new(new)
                }
            };
            (Arc::clone(zone), entry)
        })
        .collect();
    if changed || entries.len() != table.entries.len() {
        service.table.send_replace(Arc::new(ZoneTable {
            version: table.version,
            entries,
        }));
    }
    true
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::model::{Endpoint, parse_target};

    fn snapshot(version: u64, zones: &[&str]) -> Snapshot {
        Snapshot {
            version,
            exists: true,
            endpoints: zones
                .iter()
                .enumerate()
                .map(|(i, z)| Endpoint::new(format!("10.0.0.{i}").parse().unwrap(), 80).zone(*z))
                .collect(),
            ..Snapshot::unknown()
        }
    }

    async fn next(changes: &mut WatchStream<Arc<ZoneTable>>) -> Arc<ZoneTable> {
        tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .unwrap()
            .unwrap()
    }

    fn pairs(entry: &ZoneEntry) -> Vec<(String, u32)> {
        entry
            .shares
            .iter()
            .map(|s| (s.zone.to_string(), s.share))
            .collect()
    }

    #[tokio::test]
    async fn joins_recompute_once_per_interval_and_push_only_real_moves() {
        let interval = Duration::from_millis(200);
        let board = Arc::new(ZoneBoard::with_interval(interval));
        let key = parse_target("a.ns:grpc").unwrap();
        let s = snapshot(5, &["a", "b", "b", "b"]);
        let a = board.join(&key, "a");
        // Alone, a's clients are all the clients, for a quarter of the capacity.
        assert_eq!(
            pairs(&a.entry_for(&s)),
            [("a".into(), 250_000), ("b".into(), 750_000)]
        );
        let mut changes = a.changes();

        // A subscriber in b: a's clients are now half, for a quarter of the capacity.
        let b = board.join(&key, "b");
        assert_eq!(pairs(&b.entry_for(&s)), [("b".into(), 1_000_000)]);
        let mut table = next(&mut changes).await;
        while a.entry_in(&table).unwrap().shares[0].share == 250_000 {
            table = next(&mut changes).await;
        }
        assert_eq!(table.version, 5, "a shares-only change keeps the version");
        let sent = a.entry_in(&table).unwrap();
        assert_eq!(pairs(&sent), [("a".into(), 500_000), ("b".into(), 500_000)]);

        // 200 more in b at once: one recompute within the interval, one change.
        let start = tokio::time::Instant::now();
        let more: Vec<_> = (0..200).map(|_| board.join(&key, "b")).collect();
        let table = next(&mut changes).await;
        assert!(start.elapsed() <= interval * 2, "{:?}", start.elapsed());
        let now = a.entry_in(&table).unwrap();
        assert_eq!(pairs(&now), [("a".into(), 1_000_000)]);
        assert_eq!(board.counts(&key)[&Arc::<str>::from("b")], 201);

        // One more in b moves nothing by 1%: no change is sent.
        let one = board.join(&key, "b");
        let quiet = tokio::time::timeout(interval * 3, changes.next()).await;
        assert!(quiet.is_err(), "no push for a move under the threshold");
        assert!(Arc::ptr_eq(&a.entry_in(&a.table()).unwrap(), &now));

        drop((more, one, b, a));
        assert!(board.counts(&key).is_empty());
        assert!(board.services.lock().unwrap().is_empty());
    }
}
