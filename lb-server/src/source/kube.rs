//! The Kubernetes source: watches `discovery.k8s.io/v1` EndpointSlices and
//! publishes every service port's endpoints into the [`Store`].
//!
//! One kube-runtime [`watcher()`] per namespace (or one cluster-wide) lists and
//! watches the slices labelled `kubernetes.io/service-name`; the label's value
//! and the slice's namespace name the service.
//!
//! Invariants:
//! - The store never sees half a list. The initial list, and every re-list
//!   after a 410 Gone or a restart, is buffered from `Init` to `InitDone` and
//!   then applied at once, the way kube-runtime's reflector swaps its buffer;
//!   a re-list publishes only the services that changed and removes those
//!   that vanished.
//! - An `Apply` or `Delete` recomputes only the service of that slice.
//! - An error never publishes anything: the last good state stays while the
//!   watcher retries with jittered exponential backoff.
//! - Recovery is bounded: no retry delay is longer than
//!   [`DEFAULT_MAX_BACKOFF`] (3 s), and a 410 Gone, which proves the API
//!   server answers again, starts the backoff over before the re-list. So the
//!   first change after an outage of any length reaches the store within
//!   about 3.8 s (3 s + 0.8 s + a list) of the API server answering again.
//!
//! Mapping a service's slices to endpoints: every IPv4 and IPv6 slice (FQDN
//! slices are skipped) is merged, deduplicated by address and port. Each TCP
//! port of a slice with a number is published under its number and, when it
//! has one, under its name; an endpoint carries its own slice's number, so one
//! port name may map to different numbers in different slices. `ready` absent
//! means ready, `serving` absent follows `ready`, `terminating` absent means
//! not terminating; ready and not terminating is a normal endpoint, serving
//! and terminating is a draining one, anything else is left out. An
//! endpoint carries its entry's `zone`, `nodeName`, the Pod of its
//! `targetRef`, and its `hints` (`forZones[].name`, `forNodes[].name`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, EndpointSlice};
use kube::{
    Api, Client,
    runtime::{watcher, watcher::Event},
};
use lookaside_backoff::Backoff;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    metrics::Metrics,
    model::{Endpoint, Hints, PortRef, ServiceKey, normalize},
    store::Store,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// First step of the retry delay after a watch error, as client-go's
/// reflector: the first delay is 0.4 to 0.8 s.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(800);

/// Longest retry delay after watch errors (the step stops doubling here; with
/// the one jitter rule of [`lookaside_backoff`] each delay at the cap is 1.5
/// to 3 s).
///
/// Why 3 s and not client-go's 30 s: lb-server keeps its last good state
/// through an outage, so what a long delay costs is staleness after the API
/// server is back: the delay in progress when it comes back (≤ 3 s) plus, if
/// the history expired, one first-step delay before the re-list (≤ 0.8 s),
/// so the first change arrives within about 3.8 s plus a list, for an outage
/// of any length (with client-go's 30 s, plus up to 100% jitter, it grew with
/// the outage). What a short delay costs is load on a down API
/// server: one request per 1.5 to 3 s (2.25 s on average) per watcher, that
/// is per lb-server replica (per namespace with `--namespace`): 3 replicas
/// send about 1.3 requests per second, 100 replicas about 44, each a cheap
/// failed watch or list; kubelets and controllers retry a restarting API
/// server far harder.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(3);

/// Watches EndpointSlices and publishes each service port's endpoints.
pub struct KubeSource {
    client: Client,
    namespaces: Vec<String>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("namespaces", &self.namespaces)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source over `client`. With `namespaces` empty (empty names are
    /// ignored) it watches the whole cluster (`Api::all`, needs a ClusterRole);
    /// otherwise it runs one watcher per distinct namespace (`Api::namespaced`),
    /// so a namespaced Role suffices.
    pub fn new(
        client: Client,
        namespaces: Vec<String>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            namespaces,
            store,
            metrics,
            backoff: Backoff::new(DEFAULT_MIN_BACKOFF, DEFAULT_MAX_BACKOFF),
        }
    }

    /// Sets the retry delay after a watch error: its step starts at `min` and
    /// doubles up to `max`, and each delay is drawn between half its step and
    /// the whole step (the one rule of [`lookaside_backoff`]), so many servers
    /// do not retry in lockstep and no delay exceeds `max`. It starts over
    /// after any success and after a 410 Gone. The default is
    /// [`DEFAULT_MIN_BACKOFF`] to [`DEFAULT_MAX_BACKOFF`] (800 ms to 3 s; see
    /// there why); `min` is at least 1 ms so a failing API server is never
    /// retried in a busy loop.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min.max(Duration::from_millis(1)), max);
        self
    }

    /// Runs until `shutdown` is cancelled. Sets `synced` to true once every
    /// watcher has applied its first full list.
    pub async fn run(self, synced: watch::Sender<bool>, shutdown: CancellationToken) {
        let unique: BTreeSet<String> = self
            .namespaces
            .into_iter()
            .filter(|ns| !ns.is_empty())
            .collect();
        let scopes: Vec<Option<String>> = if unique.is_empty() {
            vec![None]
        } else {
            unique.into_iter().map(Some).collect()
        };
        let mut pending = scopes.len();
        let (synced_tx, mut synced_rx) = mpsc::channel(scopes.len());
        let mut tasks = JoinSet::new();
        for scope in scopes {
            let api: Api<EndpointSlice> = match &scope {
                None => Api::all(self.client.clone()),
                Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            };
            let span = info_span!("kube_watch", namespace = scope.as_deref().unwrap_or("*"));
            let watch = SliceWatch {
                api,
                store: Arc::clone(&self.store),
                metrics: Arc::clone(&self.metrics),
                backoff: self.backoff,
                synced: synced_tx.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(watch.run().instrument(span));
        }
        drop(synced_tx);

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(()) = synced_rx.recv(), if pending > 0 => {
                    pending -= 1;
                    if pending == 0 {
                        info!("every EndpointSlice watcher has synced");
                        synced.send_replace(true);
                    }
                }
            }
        }
        while let Some(result) = tasks.join_next().await {
            if let Err(error) = result {
                error!(%error, "EndpointSlice watcher task failed");
            }
        }
    }
}

/// The most watch events applied as one batch (see [`Slices::stage`]):
/// enough to absorb a rolling restart's backlog, small enough that the
/// runtime gets the thread back between batches.
const MAX_BATCH: usize = 1_000;

/// One watcher over one scope (a namespace or the whole cluster).
struct SliceWatch {
    api: Api<EndpointSlice>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    synced: mpsc::Sender<()>,
    shutdown: CancellationToken,
}

impl SliceWatch {
    async fn run(self) {
        // Bookmarks are on by default; they let a resumed watch skip a re-list.
        let config = watcher::Config::default().labels(SERVICE_NAME_LABEL);
        let events = watcher(self.api.clone(), config);
        let mut events = std::pin::pin!(events);
        // The backoff runs here rather than through kube-runtime's
        // `StreamBackoff`, because only here is the error seen: a 410 starts
        // it over (see `gone`).
        let mut backoff = self.backoff.start();
        let mut slices = Slices::default();
        // An item taken from the watch while batching that ends the batch
        // (an error, or the end): handled next, as if just received.
        let mut stashed = None;
        loop {
            let item = match stashed.take() {
                Some(item) => item,
                None => tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return,
                    item = events.next() => item,
                },
            };
            let Some(item) = item else {
                // kube-runtime's watcher retries forever; it never ends.
                error!("EndpointSlice watch ended");
                return;
            };
            let event = match item {
                Ok(event) => {
                    backoff.reset();
                    event
                }
                Err(error) => {
                    self.metrics
                        .source_errors
                        .with_label_values(&["kube"])
                        .inc();
                    if gone(&error) {
                        // The API server answers again; the outage's backoff
                        // must not delay the re-list it asks for.
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    warn!(%error, ?delay, "EndpointSlice watch failed; keeping the last good state");
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            let was_synced = slices.lists() > 0;
            let event_at = Instant::now();
            self.stage_counted(&mut slices, event);
            // The events the watch already holds go in the same batch (a
            // burst, or a backlog after a slow push): each service they
            // change is recomputed and published once for all of them.
            for _ in 1..MAX_BATCH {
                match events.next().now_or_never() {
                    None => break,
                    Some(Some(Ok(event))) => self.stage_counted(&mut slices, event),
                    Some(other) => {
                        stashed = Some(other);
                        break;
                    }
                }
            }
            for update in slices.flush() {
                match update {
                    Update::Publish(key, endpoints) => {
                        debug!(service = %key, endpoints = endpoints.len(), "publishing");
                        self.store.publish_normalized(&key, endpoints, event_at);
                    }
                    Update::Remove(key) => {
                        debug!(service = %key, "removing");
                        self.store.remove(&key, event_at);
                    }
                }
            }
            if !was_synced && slices.lists() > 0 {
                info!(
                    services = slices.services(),
                    "initial EndpointSlice list applied"
                );
                // Capacity is one per watcher and each sends once: never full.
                let _ = self.synced.try_send(());
            }
        }
    }

    /// [`Slices::stage`]s one event, counting a re-list in the metrics.
    fn stage_counted(&self, slices: &mut Slices, event: Event<EndpointSlice>) {
        if matches!(event, Event::Init) && slices.lists() > 0 {
            self.metrics.watch_restarts.inc();
            info!("re-listing EndpointSlices");
        }
        slices.stage(event);
    }
}

/// A change for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Update {
    /// Publish this whole endpoint set (normalized), shared with what the
    /// source keeps as published.
    Publish(ServiceKey, Arc<[Endpoint]>),
    /// The service no longer has this port.
    Remove(ServiceKey),
}

/// A service: namespace and name.
type ServiceId = (String, String);

/// The state of one watcher: the slices it has seen and what each service
/// last published. Pure: events in, store updates out.
#[derive(Debug, Default)]
struct Slices {
    /// What is kept of each slice, by service, then by slice name (so
    /// iteration is in name order).
    by_service: HashMap<ServiceId, BTreeMap<String, SliceView>>,
    /// The service each slice (namespace, slice name) belongs to.
    owner: HashMap<(String, String), ServiceId>,
    /// What each service last published, by key; a port's name and number
    /// keys share one list when they have the same endpoints.
    published: HashMap<ServiceId, BTreeMap<ServiceKey, Arc<[Endpoint]>>>,
    /// The list being received: `Some` between `Init` and `InitDone`, each
    /// slice already cut down to what is kept of it.
    buffer: Option<Vec<Listed>>,
    /// Lists applied so far.
    lists: u64,
    /// Services whose slices changed since the last [`Slices::flush`].
    dirty: BTreeSet<ServiceId>,
}

impl Slices {
    /// How many full lists have been applied.
    fn lists(&self) -> u64 {
        self.lists
    }

    /// How many services currently publish something.
    fn services(&self) -> usize {
        self.published.len()
    }

    /// Applies one watcher event; returns what the store must change.
    #[cfg(test)]
    fn handle(&mut self, event: Event<EndpointSlice>) -> Vec<Update> {
        self.stage(event);
        self.flush()
    }

    /// Applies one watcher event, marking the services it changed; what the
    /// store must change comes from [`Slices::flush`], once for a batch of
    /// events: a service is recomputed from all its slices, so a burst of
    /// events to it costs one recomputation, not one per event.
    fn stage(&mut self, event: Event<EndpointSlice>) {
        match event {
            Event::Init => self.buffer = Some(Vec::new()),
            Event::InitApply(slice) => match &mut self.buffer {
                Some(buffer) => buffer.extend(Listed::of(slice)),
                // kube-runtime always sends Init first; be safe if it did not.
                None => self.apply(slice),
            },
            Event::InitDone => self.replace(),
            Event::Apply(slice) => self.apply(slice),
            Event::Delete(slice) => self.delete(&slice),
        }
    }

    /// What the store must change for the events staged since the last
    /// flush: each changed service recomputed once; unchanged ones produce
    /// no update.
    fn flush(&mut self) -> Vec<Update> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.iter().flat_map(|s| self.recompute(s)).collect()
    }

    /// Swaps the buffered list in; every service it or the old state
    /// mentions is to be recomputed.
    fn replace(&mut self) {
        let listed = self.buffer.take().unwrap_or_default();
        let mut touched: BTreeSet<ServiceId> = self.published.keys().cloned().collect();
        touched.extend(self.by_service.keys().cloned());
        self.by_service.clear();
        self.owner.clear();
        for slice in listed {
            touched.insert(self.insert(slice));
        }
        self.lists += 1;
        self.dirty.extend(touched);
    }

    fn apply(&mut self, slice: EndpointSlice) {
        if let Some(previous) = self.forget(&slice_id(&slice)) {
            self.dirty.insert(previous);
        }
        if let Some(slice) = Listed::of(slice) {
            let service = self.insert(slice);
            self.dirty.insert(service);
        }
    }

    fn delete(&mut self, slice: &EndpointSlice) {
        if let Some(service) = self.forget(&slice_id(slice)) {
            self.dirty.insert(service);
        }
    }

    /// Stores a slice under its service; returns the service.
    fn insert(&mut self, slice: Listed) -> ServiceId {
        let Listed { service, id, view } = slice;
        self.by_service
            .entry(service.clone())
            .or_default()
            .insert(id.1.clone(), view);
        self.owner.insert(id, service.clone());
        service
    }

    /// Drops a slice; returns the service it belonged to.
    fn forget(&mut self, id: &(String, String)) -> Option<ServiceId> {
        let service = self.owner.remove(id)?;
        if let Some(slices) = self.by_service.get_mut(&service) {
            slices.remove(&id.1);
            if slices.is_empty() {
                self.by_service.remove(&service);
            }
        }
        Some(service)
    }

    /// Recomputes one service from its slices and diffs it against what it
    /// last published.
    fn recompute(&mut self, service: &ServiceId) -> Vec<Update> {
        let (mut current, exists) = match self.by_service.get(service) {
            Some(slices) => (
                service_endpoints(&service.0, &service.1, slices.values()),
                true,
            ),
            None => (BTreeMap::new(), false),
        };
        let previous = self.published.remove(service).unwrap_or_default();
        // A service scaled to zero keeps a slice with no ports and no
        // endpoints: it still exists, so its keys stay, with no endpoints,
        // rather than reading as unknown services.
        if exists && current.is_empty() {
            current = previous
                .keys()
                .map(|key| (key.clone(), Arc::from([])))
                .collect();
        }
        let mut updates = Vec::new();
        for key in previous.keys() {
            if !current.contains_key(key) {
                updates.push(Update::Remove(key.clone()));
            }
        }
        for (key, endpoints) in &current {
            if previous.get(key) != Some(endpoints) {
                updates.push(Update::Publish(key.clone(), Arc::clone(endpoints)));
            }
        }
        if !current.is_empty() {
            self.published.insert(service.clone(), current);
        }
        updates
    }
}

fn slice_id(slice: &EndpointSlice) -> (String, String) {
    (
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

fn service_of(slice: &EndpointSlice) -> Option<ServiceId> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let namespace = slice.metadata.namespace.as_ref()?;
    Some((namespace.clone(), name.clone()))
}

/// What the source keeps of one EndpointSlice: the endpoints and ports its
/// service's keys are computed from. The rest of the object (metadata,
/// target references, conditions) is dropped as the slice arrives: at
/// cluster scale it is most of the memory a plain reflector holds. Hints are
/// kept only on the endpoints that have them, shared (see [`HintCache`]).
#[derive(Debug, Clone, PartialEq)]
struct SliceView {
    /// The endpoints to publish, with port 0 (see [`endpoint_of`]); none for
    /// an FQDN slice.
    endpoints: Vec<Endpoint>,
    /// The TCP ports with a number, each with its name if it has one; none
    /// for an FQDN slice.
    ports: Vec<(Option<String>, u16)>,
}

impl SliceView {
    fn of(slice: &EndpointSlice) -> Self {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return Self {
                endpoints: Vec::new(),
                ports: Vec::new(),
            };
        }
        let mut hints = HintCache::default();
        let mut endpoints: Vec<Endpoint> = slice
            .endpoints
            .iter()
            .filter_map(|entry| endpoint_of(entry, &mut hints))
            .collect();
        // In the order a port's list is sorted in (see `service_endpoints`),
        // once per slice event: the list is then the slices' sorted runs one
        // after another, which the stable sort merges rather than sorts.
        endpoints.sort_by_key(|e| (e.address, e.draining));
        let ports = slice
            .ports
            .iter()
            .flatten()
            // gRPC rides TCP; a UDP or SCTP port of the same service is not ours.
            .filter(|port| port.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|port| {
                let number = port
                    .port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|&p| p != 0)?;
                let name = port.name.clone().filter(|n| !n.is_empty());
                Some((name, number))
            })
            .collect();
        Self { endpoints, ports }
    }
}

/// A slice as it arrives, cut down: its service, its id and what is kept.
#[derive(Debug)]
struct Listed {
    service: ServiceId,
    id: (String, String),
    view: SliceView,
}

impl Listed {
    /// `None` for a slice without the service label.
    fn of(slice: EndpointSlice) -> Option<Self> {
        Some(Self {
            service: service_of(&slice)?,
            id: slice_id(&slice),
            view: SliceView::of(&slice),
        })
    }
}

/// Every key a service's slices produce, with its endpoints (normalized).
/// A key's list is made once per distinct set of contributions, the slices
/// it takes endpoints from and the port number each gives them: a port's
/// name usually has the same contributions as its number (every slice names
/// it alike), so the two keys share one list, made once. `slices` must come
/// in slice-name order: among duplicates that are equally draining, the
/// first slice's copy wins.
fn service_endpoints<'a>(
    namespace: &str,
    name: &str,
    slices: impl IntoIterator<Item = &'a SliceView>,
) -> BTreeMap<ServiceKey, Arc<[Endpoint]>> {
    /// The slices a key takes endpoints from (by index, in slice order),
    /// each with the port number it gives them.
    type Contributions = Vec<(usize, u16)>;
    let slices: Vec<&SliceView> = slices.into_iter().collect();
    let mut by_port: BTreeMap<PortRef, Contributions> = BTreeMap::new();
    for (index, slice) in slices.iter().enumerate() {
        for (port_name, number) in &slice.ports {
            let named = port_name.clone().map(PortRef::Name);
            for port_ref in [Some(PortRef::Number(*number)), named]
                .into_iter()
                .flatten()
            {
                let contributions = by_port.entry(port_ref).or_default();
                // A slice that lists one port twice gives its endpoints once.
                if contributions.last() != Some(&(index, *number)) {
                    contributions.push((index, *number));
                }
            }
        }
    }
    let mut made: Vec<(Contributions, Arc<[Endpoint]>)> = Vec::new();
    let mut out: BTreeMap<ServiceKey, Arc<[Endpoint]>> = BTreeMap::new();
    for (port, contributions) in by_port {
        let key = match ServiceKey::new(namespace, name, port) {
            Ok(key) => key,
            Err(error) => {
                debug!(namespace, name, %error, "skipping a port that cannot be a service key");
                continue;
            }
        };
        if let Some((_, shared)) = made.iter().find(|(c, _)| *c == contributions) {
            out.insert(key, Arc::clone(shared));
            continue;
        }
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(
            contributions
                .iter()
                .map(|&(index, _)| slices[index].endpoints.len())
                .sum(),
        );
        for &(index, number) in &contributions {
            endpoints.extend(slices[index].endpoints.iter().map(|e| Endpoint {
                port: number,
                ..e.clone()
            }));
        }
        // `normalize` keeps the first of each address+port: put serving copies
        // first (stable, so slice-name order decides among equals). Each
        // slice's run is already in this order (see `SliceView::of`), so the
        // sort merges runs; sorted here, `normalize`'s own sort finds one run
        // and does no work.
        endpoints.sort_by_key(|e| (e.address, e.port, e.draining));
        let endpoints: Arc<[Endpoint]> = normalize(endpoints).into();
        made.push((contributions, Arc::clone(&endpoints)));
        out.insert(key, endpoints);
    }
    out
}

/// One slice's hints, made once per distinct set, and its names (zones,
/// nodes, hinted zones and nodes), made once each: the endpoints of a slice
/// are usually hinted alike (each for its own zone) and share a few zones
/// and nodes, so they hold one [`Hints`] and one copy of each name instead
/// of a string each.
#[derive(Default)]
struct HintCache {
    hints: HashSet<Arc<Hints>>,
    names: HashSet<Arc<str>>,
}

impl HintCache {
    /// The shared hints of an entry; `None` without any (absent or empty).
    fn of(&mut self, hints: Option<&EndpointHints>) -> Option<Arc<Hints>> {
        let hints = hints?;
        let mut name = |text: &str| self.name(text);
        let for_zones = hints
            .for_zones
            .iter()
            .flatten()
            .map(|z| name(&z.name))
            .collect();
        let for_nodes = hints
            .for_nodes
            .iter()
            .flatten()
            .map(|n| name(&n.name))
            .collect();
        let hints = Hints {
            for_zones,
            for_nodes,
        };
        if hints.for_zones.is_empty() && hints.for_nodes.is_empty() {
            return None;
        }
        if let Some(shared) = self.hints.get(&hints) {
            return Some(Arc::clone(shared));
        }
        let shared = Arc::new(hints);
        self.hints.insert(Arc::clone(&shared));
        Some(shared)
    }
}

impl HintCache {
    /// One shared copy of a name (a zone, a node, a hinted zone or node)
    /// for every endpoint of the slice that carries it.
    fn name(&mut self, text: &str) -> Arc<str> {
        match self.names.get(text) {
            Some(shared) => Arc::clone(shared),
            None => {
                let shared: Arc<str> = Arc::from(text);
                self.names.insert(Arc::clone(&shared));
                shared
            }
        }
    }
}

/// The endpoint of one EndpointSlice entry, with port 0, or `None` when it
/// must be left out (not ready and not draining, or no usable address).
fn endpoint_of(
    entry: &k8s_openapi::api::discovery::v1::Endpoint,
    hints: &mut HintCache,
) -> Option<Endpoint> {
    let draining = draining(entry.conditions.as_ref())?;
    // Only the first address has defined semantics (kube-proxy reads only it).
    let address: IpAddr = entry.addresses.first()?.parse().ok()?;
    let pod = entry
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| r.name.as_deref())
        .map_or_else(Arc::default, Arc::from);
    Some(Endpoint {
        address,
        port: 0,
        weight: 1,
        zone: hints.name(entry.zone.as_deref().unwrap_or_default()),
        node: hints.name(entry.node_name.as_deref().unwrap_or_default()),
        pod,
        draining,
        hints: hints.of(entry.hints.as_ref()),
    })
}

/// `Some(false)` for a normal endpoint, `Some(true)` for a draining one,
/// `None` for one to leave out.
fn draining(conditions: Option<&EndpointConditions>) -> Option<bool> {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Some(false)
    } else if serving && terminating {
        Some(true)
    } else {
        None
    }
}

/// Whether a watch error is a 410 Gone: the API server answered, and the
/// watcher's next step is a re-list.
fn gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(error)
        | watcher::Error::WatchStartFailed(error)
        | watcher::Error::WatchFailed(error) => {
            matches!(error, kube::Error::Api(status) if status.code == 410)
        }
        watcher::Error::NoResourceVersion => false,
    }
}

#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixtures;
#[cfg(test)]
mod tests;
