//! The store: one `tokio::sync::watch` channel per service carrying `Arc<Snapshot>`.
//!
//! Sources publish whole endpoint sets; subscribers read the newest snapshot.
//! A slow subscriber skips to the newest version instead of queueing stale ones.
//! The store knows nothing of gRPC or Kubernetes.
//!
//! Invariants: versions come from one counter, so a service's version only
//! grows, even across removal and re-creation; publishing an unchanged
//! endpoint set is a no-op; an entry lives while it exists or has a subscriber.
//! Besides the per-service channels, one more channel counts changes to the
//! *set* of existing services (one appears or disappears), for subscribers
//! that want every service, such as xDS wildcard subscriptions.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use tokio::sync::watch;

use crate::model::{Endpoint, ServiceKey, Services, Snapshot, normalize};

/// The shared state of every service.
#[derive(Debug, Default)]
pub struct Store {
    // std Mutex: held only for map lookups and `send_replace`, never across `.await`.
    services: Mutex<HashMap<ServiceKey, watch::Sender<Arc<Snapshot>>>>,
    version: AtomicU64,
    // Bumped, under the `services` lock, whenever a service starts or stops existing.
    service_set: watch::Sender<u64>,
}

/// Counts of what the store holds, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Services that exist.
    pub services: usize,
    /// Endpoints over all existing services.
    pub endpoints: usize,
    /// Draining endpoints over all existing services.
    pub draining: usize,
}

/// One service as [`Store::services`] lists it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// Which service.
    pub key: ServiceKey,
    /// Its current snapshot.
    pub snapshot: Arc<Snapshot>,
    /// How many subscribers watch it.
    pub subscribers: usize,
}

impl Store {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Publishes the whole endpoint set of a service. Returns whether anything
    /// changed (an identical set publishes nothing).
    pub fn publish(&self, key: &ServiceKey, endpoints: Vec<Endpoint>, event_at: Instant) -> bool {
        let endpoints = normalize(endpoints);
        let mut services = self.services.lock().unwrap();
        let existed = services.get(key).is_some_and(|tx| tx.borrow().exists);
        if let Some(tx) = services.get(key) {
            let current = tx.borrow();
            if current.exists && current.endpoints == endpoints {
                return false;
            }
        }
        let snapshot = Arc::new(Snapshot {
            version: self.next_version(),
            exists: true,
            endpoints,
            updated: SystemTime::now(),
            event_at,
            encoded: OnceLock::new(),
        });
        match services.get(key) {
            Some(tx) => {
                tx.send_replace(snapshot);
            }
            None => {
                services.insert(key.clone(), watch::Sender::new(snapshot));
            }
        }
        if !existed {
            self.bump_service_set();
        }
        true
    }

    /// Marks a service as gone. Subscribers see `exists = false`; returns whether it existed.
    pub fn remove(&self, key: &ServiceKey, event_at: Instant) -> bool {
        let mut services = self.services.lock().unwrap();
        let Some(tx) = services.get(key) else {
            return false;
        };
        if !tx.borrow().exists {
            return false;
        }
        if tx.receiver_count() == 0 {
            services.remove(key);
        } else {
            tx.send_replace(Arc::new(Snapshot {
                version: self.next_version(),
                exists: false,
                endpoints: Vec::new(),
                updated: SystemTime::now(),
                event_at,
                encoded: OnceLock::new(),
            }));
        }
        self.bump_service_set();
        true
    }

    /// Watches the set of existing services. The value counts the changes to
    /// that set so far: it moves when a service appears or disappears, never
    /// for an endpoint change of an existing service. Read the set itself with
    /// [`Store::services`] after a change is seen.
    pub fn watch_service_set(&self) -> watch::Receiver<u64> {
        self.service_set.subscribe()
    }

    // Callers hold the `services` lock, so a woken watcher reads the new set.
    fn bump_service_set(&self) {
        self.service_set.send_modify(|changes| *changes += 1);
    }

    /// Makes `services` the whole state: publishes each, removes every other
    /// existing service. Returns how many services changed.
    pub fn replace_all(&self, services: Services, event_at: Instant) -> usize {
        let gone: Vec<ServiceKey> = self
            .services()
            .into_iter()
            .filter(|view| view.snapshot.exists && !services.contains_key(&view.key))
            .map(|view| view.key)
            .collect();
        let mut changed = 0;
        for key in gone {
            changed += usize::from(self.remove(&key, event_at));
        }
        for (key, endpoints) in services {
            changed += usize::from(self.publish(&key, endpoints, event_at));
        }
        changed
    }

    /// The current snapshot of a service, if it exists.
    pub fn get(&self, key: &ServiceKey) -> Option<Arc<Snapshot>> {
        let services = self.services.lock().unwrap();
        let snapshot = services.get(key)?.borrow().clone();
        snapshot.exists.then_some(snapshot)
    }

    /// Subscribes to a service, known or not: an unknown one reads as
    /// `exists = false` until a source publishes it.
    pub fn subscribe(self: &Arc<Self>, key: &ServiceKey) -> Subscription {
        let mut services = self.services.lock().unwrap();
        let rx = services
            .entry(key.clone())
            .or_insert_with(|| watch::Sender::new(Arc::new(Snapshot::unknown())))
            .subscribe();
        Subscription {
            rx: Some(rx),
            key: key.clone(),
            store: Arc::clone(self),
        }
    }

    /// Every service that exists, sorted by key.
    pub fn services(&self) -> Vec<ServiceView> {
        let services = self.services.lock().unwrap();
        let mut views: Vec<ServiceView> = services
            .iter()
            .map(|(key, tx)| ServiceView {
                key: key.clone(),
                snapshot: tx.borrow().clone(),
                subscribers: tx.receiver_count(),
            })
            .filter(|view| view.snapshot.exists)
            .collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        views
    }

    /// How many subscribers watch a service (0 if none or unknown).
    pub fn subscribers(&self, key: &ServiceKey) -> usize {
        let services = self.services.lock().unwrap();
        services.get(key).map_or(0, |tx| tx.receiver_count())
    }

    /// Counts for metrics.
    pub fn stats(&self) -> StoreStats {
        let services = self.services.lock().unwrap();
        let mut stats = StoreStats::default();
        for tx in services.values() {
            let snapshot = tx.borrow();
            if snapshot.exists {
                stats.services += 1;
                stats.endpoints += snapshot.endpoints.len();
                stats.draining += snapshot.endpoints.iter().filter(|e| e.draining).count();
            }
        }
        stats
    }

    /// Drops the entry of an unknown service nobody watches any more.
    fn release(&self, key: &ServiceKey) {
        let mut services = self.services.lock().unwrap();
        if let Some(tx) = services.get(key)
            && tx.receiver_count() == 0
            && !tx.borrow().exists
        {
            services.remove(key);
        }
    }
}

/// Newer snapshots of one service; see [`Subscription::into_stream`].
pub type SnapshotStream = std::pin::Pin<Box<dyn futures::Stream<Item = Arc<Snapshot>> + Send>>;

/// A subscriber's view of one service. Dropping it releases the entry of a
/// service that does not exist, so probing unknown names leaks nothing.
#[derive(Debug)]
pub struct Subscription {
    rx: Option<watch::Receiver<Arc<Snapshot>>>,
    key: ServiceKey,
    store: Arc<Store>,
}

impl Subscription {
    /// The service this subscription watches.
    pub fn key(&self) -> &ServiceKey {
        &self.key
    }

    /// The newest snapshot, marking it seen.
    pub fn current(&mut self) -> Arc<Snapshot> {
        self.rx_mut().borrow_and_update().clone()
    }

    /// Waits for a snapshot newer than the last one seen, and returns it.
    /// Versions in between are skipped.
    pub async fn next(&mut self) -> Arc<Snapshot> {
        // The store keeps the sender while a receiver exists, so this cannot fail;
        // if it ever did, waiting forever is the right behaviour for a watcher.
        if self.rx_mut().changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.current()
    }

    /// Every newer snapshot from now on, as a stream (it never ends).
    pub fn into_stream(self) -> SnapshotStream {
        Box::pin(futures::stream::unfold(
            self,
            |mut subscription| async move {
                let snapshot = subscription.next().await;
                Some((snapshot, subscription))
            },
        ))
    }

    fn rx_mut(&mut self) -> &mut watch::Receiver<Arc<Snapshot>> {
        self.rx.as_mut().expect("receiver lives until drop")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.store.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortRef, parse_target};

    fn key(target: &str) -> ServiceKey {
        parse_target(target).unwrap()
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint::new(format!("10.0.0.{last}").parse().unwrap(), 8080)
    }

    #[tokio::test]
    async fn subscriber_gets_current_then_newer_versions_skipping_stale_ones() {
        let store = Store::new();
        let k = key("a.ns:grpc");
        assert!(store.publish(&k, vec![ep(1)], Instant::now()));
        let mut sub = store.subscribe(&k);
        let first = sub.current();
        assert!(first.exists);
        assert_eq!(first.endpoints, vec![ep(1)]);

        store.publish(&k, vec![ep(1), ep(2)], Instant::now());
        store.publish(&k, vec![ep(3)], Instant::now());
        let next = sub.next().await;
        assert_eq!(next.endpoints, vec![ep(3)], "skips to the newest");
        assert!(next.version > first.version);
    }

    #[tokio::test]
    async fn unchanged_publish_is_a_no_op() {
        let store = Store::new();
        let k = key("a.ns:grpc");
        assert!(store.publish(&k, vec![ep(2), ep(1)], Instant::now()));
        let version = store.get(&k).unwrap().version;
        assert!(!store.publish(&k, vec![ep(1), ep(2)], Instant::now()));
        assert_eq!(store.get(&k).unwrap().version, version);
    }

    #[tokio::test]
    async fn unknown_service_appears_and_disappears_with_growing_versions() {
        let store = Store::new();
        let k = key("late.ns:80");
        let mut sub = store.subscribe(&k);
        assert!(!sub.current().exists);
        assert!(store.services().is_empty(), "placeholders are not listed");

        store.publish(&k, vec![ep(1)], Instant::now());
        let created = sub.next().await;
        assert!(created.exists);
        assert!(store.remove(&k, Instant::now()));
        let removed = sub.next().await;
        assert!(!removed.exists && removed.version > created.version);
        store.publish(&k, vec![ep(1)], Instant::now());
        assert!(sub.next().await.version > removed.version);
    }

    #[test]
    fn dropping_the_last_subscriber_of_an_unknown_service_frees_its_entry() {
        let store = Store::new();
        let k = key("nope.ns:grpc");
        let a = store.subscribe(&k);
        let b = store.subscribe(&k);
        assert_eq!(store.subscribers(&k), 2);
        drop(a);
        assert_eq!(store.subscribers(&k), 1);
        drop(b);
        assert!(store.services.lock().unwrap().is_empty());
    }

    #[test]
    fn service_set_changes_only_when_a_service_appears_or_disappears() {
        let store = Store::new();
        let mut set = store.watch_service_set();
        let a = key("a.ns:grpc");
        let b = key("b.ns:grpc");
        let changes = |set: &mut watch::Receiver<u64>| {
            let changed = set.has_changed().unwrap();
            set.borrow_and_update();
            changed
        };

        let placeholder = store.subscribe(&b);
        assert!(
            !changes(&mut set),
            "subscribing to an unknown service adds nothing"
        );
        store.publish(&a, vec![ep(1)], Instant::now());
        assert!(changes(&mut set), "a appeared");
        store.publish(&a, vec![ep(1), ep(2)], Instant::now());
        store.publish(&a, vec![ep(1), ep(2)], Instant::now());
        assert!(!changes(&mut set), "endpoint changes are not set changes");

        store.publish(&b, vec![ep(3)], Instant::now());
        assert!(changes(&mut set), "a watched placeholder became a service");
        assert!(store.remove(&b, Instant::now()));
        assert!(changes(&mut set), "b disappeared while watched");
        assert!(!store.remove(&b, Instant::now()));
        assert!(
            !changes(&mut set),
            "removing a gone service changes nothing"
        );
        drop(placeholder);

        assert!(store.remove(&a, Instant::now()));
        assert!(changes(&mut set), "a disappeared unwatched");
        assert_eq!(*set.borrow(), 4);
    }

    #[tokio::test]
    async fn service_set_watcher_wakes_and_reads_the_new_set() {
        let store = Store::new();
        let mut set = store.watch_service_set();
        let writer = Arc::clone(&store);
        let task = tokio::spawn(async move {
            writer.publish(&key("late.ns:80"), vec![ep(1)], Instant::now());
        });
        set.changed().await.unwrap();
        let names: Vec<String> = store.services().iter().map(|v| v.key.to_string()).collect();
        assert_eq!(names, ["late.ns:80"]);
        task.await.unwrap();
    }

    #[test]
    fn replace_all_removes_what_is_missing_and_counts_changes() {
        let store = Store::new();
        let a = key("a.ns:grpc");
        let b = ServiceKey::new("ns", "b", PortRef::Number(80)).unwrap();
        let now = Instant::now();
        let first = HashMap::from([(a.clone(), vec![ep(1)]), (b.clone(), vec![ep(2)])]);
        assert_eq!(store.replace_all(first, now), 2);
        let second = HashMap::from([(a.clone(), vec![ep(1)])]);
        assert_eq!(store.replace_all(second, now), 1);
        assert!(store.get(&b).is_none());
        assert_eq!(
            store.stats(),
            StoreStats {
                services: 1,
                endpoints: 1,
                draining: 0
            }
        );
    }
}
