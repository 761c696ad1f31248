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
//!
//! Publishing takes the store's lock only to compare, number and record the
//! new snapshot; subscribers are woken after it is released, so a service
//! with ten thousand subscribers holds up no other service, subscribe or
//! read. Ordering still holds without the lock:
//! - a subscriber never sees a service's version go backwards: of two
//!   publishes of one service that race, the newer snapshot is delivered and
//!   the older one dropped (the version check is under the channel's own lock);
//! - a subscribe racing a publish first reads the old or the new snapshot,
//!   and then the new one;
//! - the service set moves before the snapshot that makes a service appear
//!   or disappear is delivered: whoever sees that snapshot and then looks at
//!   the set ([`Store::watch_service_set`], [`Store::services`]) finds the
//!   service there too. xDS relies on it: a stream that names a service in
//!   LDS and takes clusters by wildcard must not send the Listener before the
//!   Cluster it routes to.
//!
//! Coalescing ([`Store::with_coalesce_window`]): a burst of changes to one
//! service is pushed as few versions as it can be without delaying an
//! isolated change. A change is published at once unless the service's last
//! version went out less than a window ago; then it waits, merged with any
//! later change, until that window ends, and goes out as one version carrying
//! everything since. So versions of one service go out at least a window
//! apart, the first change of a burst is never delayed, and no change waits
//! longer than one window. Only endpoint changes of an existing service wait:
//! a service appearing or disappearing goes out at once (the service-set
//! ordering above is unchanged). What [`Store::get`] and [`Store::services`]
//! read is what subscribers were sent, not a change still waiting.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::Instrument;

use crate::model::{DiffCache, Endpoint, ServiceKey, Services, Snapshot, is_normalized, normalize};

/// The shared state of every service.
#[derive(Debug, Default)]
pub struct Store {
    // std Mutex: held only for map lookups and updates, never across `.await`
    // nor while subscribers are woken.
    services: Mutex<HashMap<ServiceKey, Entry>>,
    version: AtomicU64,
    // Bumped whenever a service starts or stops existing, after the entry is
    // updated and before its subscribers are woken.
    service_set: watch::Sender<u64>,
    // Zero: every change is published at once.
    coalesce_window: Duration,
    // This store, for the tasks that publish a change at the end of its window.
    me: std::sync::Weak<Store>,
}

/// One service: the snapshot last published, and the channel its subscribers
/// watch. The channel may lag behind `latest` while a publish is waking
/// subscribers outside the lock; it never runs ahead.
#[derive(Debug)]
struct Entry {
    latest: Arc<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// When `latest` was made: the start of the current coalescing window.
    pushed_at: Option<tokio::time::Instant>,
    /// A change waiting for the end of the window (coalescing only).
    pending: Option<Pending>,
    /// A task will publish `pending` at this end of the window.
    flush_at: Option<tokio::time::Instant>,
}

/// Endpoint changes merged while they wait for their window to end.
#[derive(Debug)]
struct Pending {
    endpoints: Arc<[Endpoint]>,
    /// The first merged change's: push latency counts from the oldest change.
    event_at: Instant,
}

impl Entry {
    fn new(snapshot: Arc<Snapshot>) -> Self {
        Self {
            latest: Arc::clone(&snapshot),
            tx: watch::Sender::new(snapshot),
            pushed_at: None,
            pending: None,
            flush_at: None,
        }
    }
}

/// Hands `snapshot` to the subscribers of its service unless a newer one got
/// there first (two publishes of one service racing after the lock).
fn deliver(tx: &watch::Sender<Arc<Snapshot>>, snapshot: Arc<Snapshot>) {
    tx.send_if_modified(|current| {
        let newer = snapshot.version > current.version;
        if newer {
            *current = snapshot;
        }
        newer
    });
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
    /// An empty store that publishes every change at once.
    pub fn new() -> Arc<Self> {
        Self::with_coalesce_window(Duration::ZERO)
    }

    /// An empty store that coalesces bursts of changes to one service: at
    /// most one version per service per `window` while changes keep coming,
    /// the first change of a burst at once (see the module docs). A zero
    /// window publishes every change at once. Changes wait only when
    /// published on a tokio runtime (the task that ends the window runs
    /// there); elsewhere they are published at once.
    pub fn with_coalesce_window(window: Duration) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            coalesce_window: window,
            me: me.clone(),
            ..Self::default()
        })
    }

    fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn snapshot(&self, endpoints: Arc<[Endpoint]>, event_at: Instant) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            version: self.next_version(),
            exists: true,
            endpoints,
            updated: SystemTime::now(),
            event_at,
            encoded: OnceLock::new(),
            diffs: DiffCache::default(),
        })
    }

    /// Publishes the whole endpoint set of a service. Returns whether anything
    /// changed (an identical set publishes nothing). With coalescing, a
    /// change may wait for the end of its service's window: it is then
    /// published by a task on the current runtime, merged with later ones.
    pub fn publish(&self, key: &ServiceKey, endpoints: Vec<Endpoint>, event_at: Instant) -> bool {
        self.publish_normalized(key, normalize(endpoints).into(), event_at)
    }

    /// [`Store::publish`] for a list already as [`normalize`] leaves it,
    /// shared as it is: a source that keeps what it published (one list for
    /// a port's name and number, or for an unchanged port) hands the same
    /// list on without copying or sorting it again.
    pub fn publish_normalized(
        &self,
        key: &ServiceKey,
        endpoints: Arc<[Endpoint]>,
        mut event_at: Instant,
    ) -> bool {
        debug_assert!(is_normalized(&endpoints), "{key}: not normalized");
        let now = tokio::time::Instant::now();
        let (appeared, wake) = {
            let mut services = self.services.lock().unwrap();
            let existed = services.get(key).is_some_and(|entry| entry.latest.exists);
            if existed {
                let entry = services.get_mut(key).expect("it exists");
                // What subscribers will end up with: the waiting change, if any.
                let upcoming = entry
                    .pending
                    .as_ref()
                    .map_or(&entry.latest.endpoints, |p| &p.endpoints);
                // `Arc`'s `==` is true at once for the same list (`Endpoint: Eq`).
                if *upcoming == endpoints {
                    return false;
                }
                // A change that waited goes out with this one: it is the
                // oldest event the version carries.
                let oldest = entry
                    .pending
                    .as_ref()
                    .map_or(event_at, |p| p.event_at.min(event_at));
                if self.must_wait(key, entry, now) {
                    entry.pending = Some(Pending {
                        endpoints,
                        event_at: oldest,
                    });
                    return true;
                }
                event_at = oldest;
            }
            let snapshot = self.snapshot(endpoints, event_at);
            let wake = match services.get_mut(key) {
                Some(entry) => {
                    entry.latest = Arc::clone(&snapshot);
                    entry.pushed_at = Some(now);
                    entry.pending = None;
                    Some((entry.tx.clone(), snapshot))
                }
                // Nobody watches a new entry yet: nothing to wake.
                None => {
                    let mut entry = Entry::new(snapshot);
                    entry.pushed_at = Some(now);
                    services.insert(key.clone(), entry);
                    None
                }
            };
            (!existed, wake)
        };
        if appeared {
            self.bump_service_set();
        }
        if let Some((tx, snapshot)) = wake {
            deliver(&tx, snapshot);
        }
        true
    }

    /// Whether a change to the existing service of `entry` must wait for the
    /// end of its window; arms the task that ends it if none is armed yet.
    /// Called under the store's lock.
    fn must_wait(&self, key: &ServiceKey, entry: &mut Entry, now: tokio::time::Instant) -> bool {
        match entry.flush_at {
            Some(at) if now < at => return true,
            // The window has ended and its task is late (a busy runtime, or
            // one shutting down): this change goes out now, and the task
            // finds nothing left to do.
            Some(_) => entry.flush_at = None,
            None => {}
        }
        let window = self.coalesce_window;
        let Some(ends) = entry.pushed_at.map(|at| at + window) else {
            return false;
        };
        if window.is_zero() || now >= ends {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let (store, key) = (self.me.clone(), key.clone());
        runtime.spawn(
            async move {
                tokio::time::sleep_until(ends).await;
                if let Some(store) = store.upgrade() {
                    store.flush(&key, ends);
                }
            }
            .instrument(tracing::debug_span!("coalesce")),
        );
        entry.flush_at = Some(ends);
        true
    }

    /// Publishes the change that waited for the window ending at `ends`, if
    /// any (and unless a later window took over while this task was late).
    fn flush(&self, key: &ServiceKey, ends: tokio::time::Instant) {
        let wake = {
            let mut services = self.services.lock().unwrap();
            let Some(entry) = services.get_mut(key) else {
                return;
            };
            if entry.flush_at != Some(ends) {
                return;
            }
            entry.flush_at = None;
            let Some(pending) = entry.pending.take() else {
                return;
            };
            // A removal drops what waited; a change back to what subscribers
            // hold sends nothing.
            if !entry.latest.exists || entry.latest.endpoints == pending.endpoints {
                return;
            }
            let snapshot = self.snapshot(pending.endpoints, pending.event_at);
            entry.latest = Arc::clone(&snapshot);
            entry.pushed_at = Some(tokio::time::Instant::now());
            (entry.tx.clone(), snapshot)
        };
        deliver(&wake.0, wake.1);
    }

    /// Marks a service as gone. Subscribers see `exists = false`; returns whether it existed.
    pub fn remove(&self, key: &ServiceKey, event_at: Instant) -> bool {
        let wake = {
            let mut services = self.services.lock().unwrap();
            let Some(entry) = services.get_mut(key) else {
                return false;
            };
            if !entry.latest.exists {
                return false;
            }
            if entry.tx.receiver_count() == 0 {
                services.remove(key);
                None
            } else {
                let snapshot = Arc::new(Snapshot {
                    version: self.next_version(),
                    exists: false,
                    endpoints: Arc::default(),
                    updated: SystemTime::now(),
                    event_at,
                    encoded: OnceLock::new(),
                    diffs: DiffCache::default(),
                });
                entry.latest = Arc::clone(&snapshot);
                entry.pushed_at = Some(tokio::time::Instant::now());
                // Gone at once: a change that waited for its window goes
                // with it, and its task finds nothing to do.
                entry.pending = None;
                entry.flush_at = None;
                Some((entry.tx.clone(), snapshot))
            }
        };
        self.bump_service_set();
        if let Some((tx, snapshot)) = wake {
            deliver(&tx, snapshot);
        }
        true
    }

    /// Watches the set of existing services. The value counts the changes to
    /// that set so far: it moves when a service appears or disappears, never
    /// for an endpoint change of an existing service. Read the set itself with
    /// [`Store::services`] after a change is seen: it holds the change, and a
    /// service's own subscribers are woken only after the set moved.
    pub fn watch_service_set(&self) -> watch::Receiver<u64> {
        self.service_set.subscribe()
    }

    // Called after the entry changed (so a woken watcher reads the new set)
    // and before the service's subscribers are woken.
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
        let snapshot = Arc::clone(&services.get(key)?.latest);
        snapshot.exists.then_some(snapshot)
    }

    /// Subscribes to a service, known or not: an unknown one reads as
    /// `exists = false` until a source publishes it.
    pub fn subscribe(self: &Arc<Self>, key: &ServiceKey) -> Subscription {
        let mut services = self.services.lock().unwrap();
        let rx = services
            .entry(key.clone())
            .or_insert_with(|| Entry::new(Arc::new(Snapshot::unknown())))
            .tx
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
            .filter(|(_, entry)| entry.latest.exists)
            .map(|(key, entry)| ServiceView {
                key: key.clone(),
                snapshot: Arc::clone(&entry.latest),
                subscribers: entry.tx.receiver_count(),
            })
            .collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        views
    }

    /// How many subscribers watch a service (0 if none or unknown).
    pub fn subscribers(&self, key: &ServiceKey) -> usize {
        let services = self.services.lock().unwrap();
        services
            .get(key)
            .map_or(0, |entry| entry.tx.receiver_count())
    }

    /// Counts for metrics.
    pub fn stats(&self) -> StoreStats {
        let services = self.services.lock().unwrap();
        let mut stats = StoreStats::default();
        for entry in services.values() {
            let snapshot = &entry.latest;
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
        if let Some(entry) = services.get(key)
            && entry.tx.receiver_count() == 0
            && !entry.latest.exists
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
        assert_eq!(*first.endpoints, vec![ep(1)]);

        store.publish(&k, vec![ep(1), ep(2)], Instant::now());
        store.publish(&k, vec![ep(3)], Instant::now());
        let next = sub.next().await;
        assert_eq!(*next.endpoints, vec![ep(3)], "skips to the newest");
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
    fn a_normalized_list_is_published_as_it_is_and_compared_by_content() {
        let store = Store::new();
        let k = key("a.ns:80");
        let list: Arc<[Endpoint]> = normalize(vec![ep(2), ep(1)]).into();
        assert!(store.publish_normalized(&k, Arc::clone(&list), Instant::now()));
        let published = store.get(&k).unwrap();
        assert!(
            Arc::ptr_eq(&published.endpoints, &list),
            "shared, not copied"
        );
        // The same endpoints in another list are no change.
        let copy: Arc<[Endpoint]> = list.to_vec().into();
        assert!(!store.publish_normalized(&k, copy, Instant::now()));
        assert!(!store.publish(&k, vec![ep(1), ep(2)], Instant::now()));
        assert_eq!(store.get(&k).unwrap().version, published.version);
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

    /// What the store looks like at the moment a subscriber is woken: the
    /// waker runs inside the publish that wakes it, so it sees exactly what
    /// a woken subscriber could see first, whatever the threads do.
    struct Probe {
        store: Arc<Store>,
        set: watch::Receiver<u64>,
        /// At each wake: (the store's lock was free, the service set's count).
        seen: Mutex<Vec<(bool, u64)>>,
    }

    impl std::task::Wake for Probe {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            let lock_free = self.store.services.try_lock().is_ok();
            let set = *self.set.borrow();
            self.seen.lock().unwrap().push((lock_free, set));
        }
    }

    /// Polls `sub.next()` once with a [`Probe`], runs `change`, and returns
    /// what the probe saw when the subscriber was woken.
    fn probe_wake(
        store: &Arc<Store>,
        sub: &mut Subscription,
        change: impl FnOnce(),
    ) -> (bool, u64) {
        use std::{future::Future, task::Context};
        let probe = Arc::new(Probe {
            store: Arc::clone(store),
            set: store.watch_service_set(),
            seen: Mutex::default(),
        });
        let waker = std::task::Waker::from(Arc::clone(&probe));
        let mut next = Box::pin(sub.next());
        assert!(
            next.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        change();
        assert!(
            next.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
        );
        let seen = probe.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "woken once");
        seen[0]
    }

    #[test]
    fn subscribers_are_woken_without_the_store_lock() {
        let store = Store::new();
        let k = key("a.ns:grpc");
        store.publish(&k, vec![ep(1)], Instant::now());
        let mut sub = store.subscribe(&k);
        sub.current();
        let (lock_free, _) = probe_wake(&store, &mut sub, || {
            store.publish(&k, vec![ep(2)], Instant::now());
        });
        assert!(
            lock_free,
            "a publish woke a subscriber holding the store's lock"
        );
        let (lock_free, _) = probe_wake(&store, &mut sub, || {
            store.remove(&k, Instant::now());
        });
        assert!(
            lock_free,
            "a removal woke a subscriber holding the store's lock"
        );
    }

    #[test]
    fn the_service_set_moves_before_a_new_or_gone_service_wakes_its_subscribers() {
        let store = Store::new();
        let k = key("late.ns:80");
        let mut sub = store.subscribe(&k);
        sub.current();
        let (_, set) = probe_wake(&store, &mut sub, || {
            store.publish(&k, vec![ep(1)], Instant::now());
        });
        assert_eq!(set, 1, "woken by a new service before the set had it");
        let listed: Vec<ServiceKey> = store.services().into_iter().map(|v| v.key).collect();
        assert_eq!(listed, std::slice::from_ref(&k));
        let (_, set) = probe_wake(&store, &mut sub, || {
            store.remove(&k, Instant::now());
        });
        assert_eq!(set, 2, "woken by a removal before the set lost it");
    }

    /// Publishers race on one service while subscribers come and go: every
    /// subscriber sees versions only grow, the newest publish is the one
    /// delivered, and a subscriber that joins reads it at once.
    #[test]
    fn concurrent_publishes_and_subscribes_keep_versions_in_order() {
        const PUBLISHERS: u8 = 4;
        const ROUNDS: u16 = 50_000;
        let store = Store::new();
        let k = key("hot.ns:grpc");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut held = store.subscribe(&k);
        std::thread::scope(|scope| {
            let watchers: Vec<_> = (0..3)
                .map(|_| {
                    let (store, k, done) = (Arc::clone(&store), k.clone(), Arc::clone(&done));
                    scope.spawn(move || {
                        let mut seen = 0u64;
                        let mut subscribes = 0u32;
                        while !done.load(Ordering::Acquire) {
                            // A fresh subscription now and then, racing the publishes.
                            let mut sub = store.subscribe(&k);
                            subscribes += 1;
                            let mut last = sub.current().version;
                            for _ in 0..50 {
                                let rx = sub.rx_mut();
                                if rx.has_changed().unwrap() {
                                    let version = rx.borrow_and_update().version;
                                    assert!(version > last, "{version} after {last}");
                                    last = version;
                                }
                                std::thread::yield_now();
                            }
                            seen = seen.max(last);
                        }
                        (seen, subscribes)
                    })
                })
                .collect();
            let publishers: Vec<_> = (0..PUBLISHERS)
                .map(|p| {
                    let (store, k) = (Arc::clone(&store), k.clone());
                    scope.spawn(move || {
                        for round in 0..ROUNDS {
                            let ip = format!("10.{p}.{}.{}", round / 250, round % 250);
                            let ep = Endpoint::new(ip.parse().unwrap(), 80);
                            assert!(store.publish(&k, vec![ep], Instant::now()));
                        }
                    })
                })
                .collect();
            // Joined before any check, so a failed publisher stops the watchers too.
            let published: Vec<_> = publishers.into_iter().map(|p| p.join()).collect();
            done.store(true, Ordering::Release);
            for watcher in watchers {
                let (_, subscribes) = watcher.join().unwrap();
                assert!(subscribes > 0);
            }
            assert!(published.into_iter().all(|p| p.is_ok()));
        });
        let latest = store.get(&k).unwrap();
        assert_eq!(latest.version, u64::from(PUBLISHERS) * u64::from(ROUNDS));
        for delivered in [held.current(), store.subscribe(&k).current()] {
            assert!(
                Arc::ptr_eq(&delivered, &latest),
                "delivered version {} is not the newest, {}",
                delivered.version,
                latest.version
            );
        }
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

    mod coalescing {
        use super::*;

        const WINDOW: Duration = Duration::from_millis(100);

        fn paused_runtime() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        }

        /// Change `i`'s endpoint set: one endpoint of its own, so a
        /// delivered snapshot names the change it carries.
        fn change(i: usize) -> Vec<Endpoint> {
            let ip = format!("10.1.{}.{}", i / 250, i % 250);
            vec![Endpoint::new(ip.parse().unwrap(), 80)]
        }

        fn change_of(snapshot: &Snapshot) -> usize {
            let octets = match snapshot.endpoints[0].address {
                std::net::IpAddr::V4(v4) => v4.octets(),
                std::net::IpAddr::V6(_) => unreachable!(),
            };
            usize::from(octets[2]) * 250 + usize::from(octets[3])
        }

        /// Every snapshot a subscriber is woken with, and when.
        type Seen = Arc<Mutex<Vec<(tokio::time::Instant, Arc<Snapshot>)>>>;

        fn spy(store: &Arc<Store>, k: &ServiceKey) -> Seen {
            let seen = Seen::default();
            let mut sub = store.subscribe(k);
            sub.current();
            let record = Arc::clone(&seen);
            tokio::spawn(async move {
                loop {
                    let snapshot = sub.next().await;
                    let now = tokio::time::Instant::now();
                    record.lock().unwrap().push((now, snapshot));
                }
            });
            seen
        }

        #[test]
        fn an_isolated_change_is_published_at_once() {
            paused_runtime().block_on(async {
                let store = Store::with_coalesce_window(WINDOW);
                let k = key("a.ns:grpc");
                store.publish(&k, change(0), Instant::now());
                let mut sub = store.subscribe(&k);
                sub.current();
                tokio::time::sleep(WINDOW).await;
                // A window after the last version: the change goes out inside publish.
                assert!(store.publish(&k, change(1), Instant::now()));
                assert_eq!(*store.get(&k).unwrap().endpoints, change(1));
                assert_eq!(*sub.current().endpoints, change(1));
            });
        }

        #[test]
        fn a_burst_is_at_most_one_version_per_window_ending_with_the_last_change() {
            paused_runtime().block_on(async {
                let store = Store::with_coalesce_window(WINDOW);
                let k = key("a.ns:grpc");
                store.publish(&k, change(0), Instant::now());
                tokio::time::sleep(WINDOW * 5).await;
                let seen = spy(&store, &k);
                // 1,000 changes 1 ms apart: a burst of 999 ms.
                let started = tokio::time::Instant::now();
                for i in 1..=1000 {
                    assert!(store.publish(&k, change(i), Instant::now()));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let burst = tokio::time::Instant::now() - started - Duration::from_millis(1);
                tokio::time::sleep(WINDOW * 2).await;
                let seen = seen.lock().unwrap();
                let bound = burst.as_millis().div_ceil(WINDOW.as_millis()) as usize + 1;
                assert!(
                    seen.len() <= bound,
                    "{} versions, at most {bound}",
                    seen.len()
                );
                assert!(seen.len() >= 10, "{} versions over a second", seen.len());
                assert_eq!(seen[0].0, started, "the first change is not delayed");
                let (at, last) = seen.last().unwrap();
                assert_eq!(*last.endpoints, change(1000));
                assert!(*at <= started + burst + WINDOW);
                assert_eq!(*store.get(&k).unwrap().endpoints, change(1000));
            });
        }

        #[test]
        fn appearing_and_disappearing_are_never_delayed() {
            paused_runtime().block_on(async {
                let store = Store::with_coalesce_window(WINDOW);
                let k = key("a.ns:grpc");
                let mut sub = store.subscribe(&k);
                sub.current();
                let mut set = store.watch_service_set();
                store.publish(&k, change(0), Instant::now());
                assert!(sub.current().exists);
                // Within the window: this change waits...
                store.publish(&k, change(1), Instant::now());
                assert_eq!(*sub.current().endpoints, change(0));
                // ...and a removal does not, and takes the waiting change with it.
                assert!(store.remove(&k, Instant::now()));
                assert!(!sub.current().exists);
                assert!(store.publish(&k, change(2), Instant::now()));
                let recreated = sub.current();
                assert_eq!(*recreated.endpoints, change(2));
                assert!(set.has_changed().unwrap());
                assert_eq!(*set.borrow_and_update(), 3);
                tokio::time::sleep(WINDOW * 3).await;
                assert!(
                    Arc::ptr_eq(&sub.current(), &recreated),
                    "the removed service's waiting change was published"
                );
            });
        }

        /// A runtime too busy to run the task that ends a window on time: the
        /// next change goes out at once with the one that waited (carrying
        /// its older event time), and the late task then sends nothing.
        #[test]
        fn a_change_after_a_late_window_task_goes_out_at_once_and_the_task_sends_nothing() {
            // The real clock: the runtime's one thread is kept busy past
            // the window's end, as a loaded server's would be.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                // Long enough that a loaded machine cannot end it between the
                // first two publishes by itself.
                const SHORT: Duration = Duration::from_millis(250);
                let store = Store::with_coalesce_window(SHORT);
                let k = key("a.ns:grpc");
                store.publish(&k, change(0), Instant::now());
                let seen = spy(&store, &k);
                let mut sub = store.subscribe(&k);
                sub.current();
                let waited_at = Instant::now();
                assert!(store.publish(&k, change(1), waited_at));
                assert_eq!(
                    *sub.current().endpoints,
                    change(0),
                    "within the window: waits"
                );
                // Busy: the window's task cannot run.
                std::thread::sleep(SHORT * 2);
                assert!(store.publish(&k, change(2), Instant::now()));
                let now = sub.current();
                assert_eq!(*now.endpoints, change(2), "the window has ended: at once");
                assert_eq!(now.event_at, waited_at, "the waiting change's event time");
                // The late task runs now and finds nothing to send.
                tokio::time::sleep(SHORT * 3).await;
                let seen = seen.lock().unwrap();
                assert_eq!(seen.len(), 1, "one version: {seen:?}");
                assert!(Arc::ptr_eq(&seen[0].1, &now));
                assert!(Arc::ptr_eq(&store.get(&k).unwrap(), &now));
            });
        }

        #[test]
        fn a_change_back_within_the_window_sends_nothing() {
            paused_runtime().block_on(async {
                let store = Store::with_coalesce_window(WINDOW);
                let k = key("a.ns:grpc");
                store.publish(&k, change(0), Instant::now());
                let seen = spy(&store, &k);
                assert!(store.publish(&k, change(1), Instant::now()));
                assert!(store.publish(&k, change(0), Instant::now()));
                assert!(!store.publish(&k, change(0), Instant::now()));
                tokio::time::sleep(WINDOW * 3).await;
                assert!(seen.lock().unwrap().is_empty());
                assert_eq!(*store.get(&k).unwrap().endpoints, change(0));
            });
        }

        /// Random timings: no change is lost or waits more than a window,
        /// versions go out at least a window apart and only grow, an isolated
        /// change goes out at once, and the end state is the last change.
        #[test]
        fn random_bursts_lose_no_change_and_push_one_version_per_window() {
            for seed in 0..300 {
                let mut rng = fastrand::Rng::with_seed(seed);
                let changes = rng.usize(1..80);
                let delays: Vec<Duration> = (0..changes)
                    .map(|_| match rng.u8(0..4) {
                        0 => Duration::ZERO,
                        1 => Duration::from_millis(rng.u64(0..WINDOW.as_millis() as u64)),
                        2 => Duration::from_millis(rng.u64(0..3 * WINDOW.as_millis() as u64)),
                        _ => Duration::from_micros(rng.u64(0..2_000)),
                    })
                    .collect();
                paused_runtime().block_on(check_burst(seed, delays));
            }
        }

        async fn check_burst(seed: u64, delays: Vec<Duration>) {
            let store = Store::with_coalesce_window(WINDOW);
            let k = key("a.ns:grpc");
            let base = vec![Endpoint::new("10.9.9.9".parse().unwrap(), 80)];
            store.publish(&k, base, Instant::now());
            tokio::time::sleep(WINDOW * 3).await;
            let seen = spy(&store, &k);
            let mut times = Vec::new();
            for (i, delay) in delays.iter().enumerate() {
                tokio::time::sleep(*delay).await;
                times.push(tokio::time::Instant::now());
                assert!(store.publish(&k, change(i), Instant::now()), "seed {seed}");
            }
            tokio::time::sleep(WINDOW * 3).await;
            let seen = seen.lock().unwrap();
            let last = times.len() - 1;
            assert!(!seen.is_empty(), "seed {seed}");
            for pair in seen.windows(2) {
                assert!(pair[1].1.version > pair[0].1.version, "seed {seed}");
                assert!(
                    pair[1].0 - pair[0].0 >= WINDOW,
                    "seed {seed}: versions {:?} apart",
                    pair[1].0 - pair[0].0
                );
            }
            for (i, at) in times.iter().enumerate() {
                // Delivered, or overtaken by a later change, within a window.
                let by = seen
                    .iter()
                    .find(|(_, snapshot)| change_of(snapshot) >= i)
                    .unwrap_or_else(|| panic!("seed {seed}: change {i} never went out"));
                assert!(
                    by.0 <= *at + WINDOW,
                    "seed {seed}: change {i} waited too long"
                );
                let isolated = i == 0 || *at - times[i - 1] >= WINDOW * 2;
                if isolated {
                    assert_eq!(by.0, *at, "seed {seed}: isolated change {i} was delayed");
                }
            }
            let (_, newest) = seen.last().unwrap();
            assert_eq!(change_of(newest), last, "seed {seed}");
            assert_eq!(*store.get(&k).unwrap().endpoints, change(last));
            let burst = times[last] - times[0];
            let bound = (burst.as_nanos() / WINDOW.as_nanos()) as usize + 2;
            assert!(seen.len() <= bound, "seed {seed}: {} > {bound}", seen.len());
        }
    }
}
