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
//!
//! Mapping a service's slices to endpoints: every IPv4 and IPv6 slice (FQDN
//! slices are skipped) is merged, deduplicated by address and port. Each TCP
//! port of a slice with a number is published under its number and, when it
//! has one, under its name; an endpoint carries its own slice's number, so one
//! port name may map to different numbers in different slices. `ready` absent
//! means ready, `serving` absent follows `ready`, `terminating` absent means
//! not terminating; ready and not terminating is a normal endpoint, serving
//! and terminating is a draining one, anything else is left out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, utils::Backoff, watcher, watcher::Event},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    metrics::Metrics,
    model::{Endpoint, PortRef, ServiceKey, normalize},
    store::Store,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// First retry delay after a watch error, as client-go's reflector.
const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(800);
/// Longest base retry delay, as client-go's reflector.
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Watches EndpointSlices and publishes each service port's endpoints.
pub struct KubeSource {
    client: Client,
    namespaces: Vec<String>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    backoff: BackoffPolicy,
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
            backoff: BackoffPolicy {
                min: DEFAULT_MIN_BACKOFF,
                max: DEFAULT_MAX_BACKOFF,
            },
        }
    }

    /// Sets the retry delay after a watch error: it starts at `min`, doubles
    /// up to `max`, and each delay gets up to as much again in random jitter,
    /// so many servers do not retry in lockstep. It resets after any success.
    /// The default is 800 ms to 30 s, as client-go's reflector; `min` is at
    /// least 1 ms so a failing API server is never retried in a busy loop.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        self.backoff = BackoffPolicy {
            min,
            max: max.max(min),
        };
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

/// One watcher over one scope (a namespace or the whole cluster).
struct SliceWatch {
    api: Api<EndpointSlice>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    backoff: BackoffPolicy,
    synced: mpsc::Sender<()>,
    shutdown: CancellationToken,
}

impl SliceWatch {
    async fn run(self) {
        // Bookmarks are on by default; they let a resumed watch skip a re-list.
        let config = watcher::Config::default().labels(SERVICE_NAME_LABEL);
        let events = watcher(self.api.clone(), config).backoff(self.backoff.start());
        let mut events = std::pin::pin!(events);
        let mut slices = Slices::default();
        loop {
            let event = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return,
                event = events.next() => event,
            };
            let Some(event) = event else {
                // The watcher retries forever; it only ends if the backoff gave up.
                error!("EndpointSlice watch ended");
                return;
            };
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    self.metrics
                        .source_errors
                        .with_label_values(&["kube"])
                        .inc();
                    warn!(%error, "EndpointSlice watch failed; keeping the last good state");
                    continue;
                }
            };
            let was_synced = slices.lists() > 0;
            if matches!(event, Event::Init) && was_synced {
                self.metrics.watch_restarts.inc();
                info!("re-listing EndpointSlices");
            }
            let event_at = Instant::now();
            for update in slices.handle(event) {
                match update {
                    Update::Publish(key, endpoints) => {
                        debug!(service = %key, endpoints = endpoints.len(), "publishing");
                        self.store.publish(&key, endpoints, event_at);
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
}

/// A change for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Update {
    /// Publish this whole endpoint set (sorted and unique).
    Publish(ServiceKey, Vec<Endpoint>),
    /// The service no longer has this port.
    Remove(ServiceKey),
}

/// A service: namespace and name.
type ServiceId = (String, String);

/// The state of one watcher: the slices it has seen and what each service
/// last published. Pure: events in, store updates out.
#[derive(Debug, Default)]
struct Slices {
    /// Slices by service, then by slice name (so iteration is in name order).
    by_service: HashMap<ServiceId, BTreeMap<String, EndpointSlice>>,
    /// The service each slice (namespace, slice name) belongs to.
    owner: HashMap<(String, String), ServiceId>,
    /// What each service last published, by key.
    published: HashMap<ServiceId, BTreeMap<ServiceKey, Vec<Endpoint>>>,
    /// The list being received: `Some` between `Init` and `InitDone`.
    buffer: Option<Vec<EndpointSlice>>,
    /// Lists applied so far.
    lists: u64,
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
    fn handle(&mut self, event: Event<EndpointSlice>) -> Vec<Update> {
        match event {
            Event::Init => {
                self.buffer = Some(Vec::new());
                Vec::new()
            }
            Event::InitApply(slice) => match &mut self.buffer {
                Some(buffer) => {
                    buffer.push(slice);
                    Vec::new()
                }
                // kube-runtime always sends Init first; be safe if it did not.
                None => self.apply(slice),
            },
            Event::InitDone => self.replace(),
            Event::Apply(slice) => self.apply(slice),
            Event::Delete(slice) => self.delete(&slice),
        }
    }

    /// Swaps the buffered list in and recomputes every service it or the old
    /// state mentions; unchanged services produce no update.
    fn replace(&mut self) -> Vec<Update> {
        let listed = self.buffer.take().unwrap_or_default();
        let mut touched: BTreeSet<ServiceId> = self.published.keys().cloned().collect();
        touched.extend(self.by_service.keys().cloned());
        self.by_service.clear();
        self.owner.clear();
        for slice in listed {
            if let Some(service) = self.insert(slice) {
                touched.insert(service);
            }
        }
        self.lists += 1;
        touched.iter().flat_map(|s| self.recompute(s)).collect()
    }

    fn apply(&mut self, slice: EndpointSlice) -> Vec<Update> {
        let mut touched = BTreeSet::new();
        if let Some(previous) = self.forget(&slice_id(&slice)) {
            touched.insert(previous);
        }
        if let Some(service) = self.insert(slice) {
            touched.insert(service);
        }
        touched.iter().flat_map(|s| self.recompute(s)).collect()
    }

    fn delete(&mut self, slice: &EndpointSlice) -> Vec<Update> {
        match self.forget(&slice_id(slice)) {
            Some(service) => self.recompute(&service),
            None => Vec::new(),
        }
    }

    /// Stores a slice under its service; a slice without the label is ignored.
    fn insert(&mut self, mut slice: EndpointSlice) -> Option<ServiceId> {
        let service = service_of(&slice)?;
        // Keep only what endpoints are computed from: managed fields and
        // annotations can be most of an object's size in a large cluster.
        slice.metadata.managed_fields = None;
        slice.metadata.annotations = None;
        let id = slice_id(&slice);
        self.by_service
            .entry(service.clone())
            .or_default()
            .insert(id.1.clone(), slice);
        self.owner.insert(id, service.clone());
        Some(service)
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
                .map(|key| (key.clone(), Vec::new()))
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
                updates.push(Update::Publish(key.clone(), endpoints.clone()));
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

/// Every key a service's slices produce, with its endpoints (normalized).
/// `slices` must come in slice-name order: among duplicates that are equally
/// draining, the first slice's copy wins.
fn service_endpoints<'a>(
    namespace: &str,
    name: &str,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<ServiceKey, Vec<Endpoint>> {
    let mut by_port: BTreeMap<PortRef, Vec<Endpoint>> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let endpoints: Vec<Endpoint> = slice.endpoints.iter().filter_map(endpoint_of).collect();
        for port in slice.ports.iter().flatten() {
            // gRPC rides TCP; a UDP or SCTP port of the same service is not ours.
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Some(number) = port
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
            else {
                continue;
            };
            let named = port
                .name
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(|n| PortRef::Name(n.to_owned()));
            for port_ref in [Some(PortRef::Number(number)), named].into_iter().flatten() {
                by_port
                    .entry(port_ref)
                    .or_default()
                    .extend(endpoints.iter().map(|e| Endpoint {
                        port: number,
                        ..e.clone()
                    }));
            }
        }
    }
    let mut out = BTreeMap::new();
    for (port, mut endpoints) in by_port {
        let key = match ServiceKey::new(namespace, name, port) {
            Ok(key) => key,
            Err(error) => {
                debug!(namespace, name, %error, "skipping a port that cannot be a service key");
                continue;
            }
        };
        // `normalize` keeps the first of each address+port: put serving copies
        // first (stable, so slice-name order decides among equals).
        endpoints.sort_by_key(|e| e.draining);
        out.insert(key, normalize(endpoints));
    }
    out
}

/// The endpoint of one EndpointSlice entry, with port 0, or `None` when it
/// must be left out (not ready and not draining, or no usable address).
fn endpoint_of(entry: &k8s_openapi::api::discovery::v1::Endpoint) -> Option<Endpoint> {
    let draining = draining(entry.conditions.as_ref())?;
    // Only the first address has defined semantics (kube-proxy reads only it).
    let address: IpAddr = entry.addresses.first()?.parse().ok()?;
    let pod = entry
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| r.name.clone())
        .unwrap_or_default();
    Some(Endpoint {
        address,
        port: 0,
        weight: 1,
        zone: entry.zone.clone().unwrap_or_default(),
        node: entry.node_name.clone().unwrap_or_default(),
        pod,
        draining,
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

/// Retry delays after watch errors.
#[derive(Debug, Clone, Copy)]
struct BackoffPolicy {
    min: Duration,
    max: Duration,
}

impl BackoffPolicy {
    fn start(self) -> JitteredBackoff {
        JitteredBackoff {
            policy: self,
            base: self.min,
        }
    }
}

/// Exponential backoff with jitter: each delay is its base plus up to as much
/// again at random; the base doubles from `min` up to `max`.
#[derive(Debug)]
struct JitteredBackoff {
    policy: BackoffPolicy,
    base: Duration,
}

impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.base;
        self.base = (base * 2).min(self.policy.max);
        Some(base + base.mul_f64(rand::random::<f64>()))
    }
}

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        self.base = self.policy.min;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::ObjectReference,
            discovery::v1::{Endpoint as SliceEndpoint, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    /// Builder for an EndpointSlice labelled with its service.
    struct SliceFixture(EndpointSlice);

    fn slice(namespace: &str, name: &str, service: &str) -> SliceFixture {
        SliceFixture(EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.into(),
                    service.into(),
                )])),
                ..ObjectMeta::default()
            },
            ports: None,
        })
    }

    impl SliceFixture {
        fn address_type(mut self, address_type: &str) -> Self {
            self.0.address_type = address_type.into();
            self
        }

        fn ipv6(self) -> Self {
            self.address_type("IPv6")
        }

        fn port_spec(
            mut self,
            name: Option<&str>,
            port: Option<i32>,
            protocol: Option<&str>,
        ) -> Self {
            self.0
                .ports
                .get_or_insert_with(Vec::new)
                .push(EndpointPort {
                    name: name.map(Into::into),
                    port,
                    protocol: protocol.map(Into::into),
                    app_protocol: None,
                });
            self
        }

        fn port(self, name: &str, port: i32) -> Self {
            self.port_spec(Some(name), Some(port), Some("TCP"))
        }

        fn endpoint(mut self, endpoint: EpFixture) -> Self {
            self.0.endpoints.push(endpoint.0);
            self
        }

        fn endpoints(mut self, endpoints: impl IntoIterator<Item = EpFixture>) -> Self {
            self.0.endpoints.extend(endpoints.into_iter().map(|e| e.0));
            self
        }

        fn service(mut self, service: &str) -> Self {
            self.0
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(SERVICE_NAME_LABEL.into(), service.into());
            self
        }

        fn unlabeled(mut self) -> Self {
            self.0.metadata.labels = None;
            self
        }

        fn build(self) -> EndpointSlice {
            self.0
        }
    }

    /// Builder for one entry of an EndpointSlice; conditions absent by default.
    struct EpFixture(SliceEndpoint);

    fn ep(address: &str) -> EpFixture {
        EpFixture(SliceEndpoint {
            addresses: vec![address.into()],
            ..SliceEndpoint::default()
        })
    }

    impl EpFixture {
        fn conditions(&mut self) -> &mut EndpointConditions {
            self.0
                .conditions
                .get_or_insert_with(EndpointConditions::default)
        }

        fn ready(mut self, ready: bool) -> Self {
            self.conditions().ready = Some(ready);
            self
        }

        fn serving(mut self, serving: bool) -> Self {
            self.conditions().serving = Some(serving);
            self
        }

        fn terminating(mut self, terminating: bool) -> Self {
            self.conditions().terminating = Some(terminating);
            self
        }

        /// What a pod shutting down gracefully looks like.
        fn draining(self) -> Self {
            self.ready(false).serving(true).terminating(true)
        }

        fn zone(mut self, zone: &str) -> Self {
            self.0.zone = Some(zone.into());
            self
        }

        fn node(mut self, node: &str) -> Self {
            self.0.node_name = Some(node.into());
            self
        }

        fn target(mut self, kind: &str, name: &str) -> Self {
            self.0.target_ref = Some(ObjectReference {
                kind: Some(kind.into()),
                name: Some(name.into()),
                ..ObjectReference::default()
            });
            self
        }
    }

    fn key(namespace: &str, name: &str, port: PortRef) -> ServiceKey {
        ServiceKey::new(namespace, name, port).unwrap()
    }

    fn keys(targets: &[&str]) -> BTreeSet<ServiceKey> {
        targets.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn named(port: &str) -> PortRef {
        PortRef::Name(port.into())
    }

    fn endpoint(address: &str, port: u16) -> Endpoint {
        Endpoint::new(address.parse().unwrap(), port)
    }

    /// A watcher state after an initial list of `slices`, and its updates.
    fn listed(slices: impl IntoIterator<Item = EndpointSlice>) -> (Slices, Vec<Update>) {
        let mut state = Slices::default();
        assert!(state.handle(Event::Init).is_empty());
        for slice in slices {
            assert!(
                state.handle(Event::InitApply(slice)).is_empty(),
                "buffered until InitDone"
            );
        }
        let updates = state.handle(Event::InitDone);
        (state, updates)
    }

    fn published(updates: &[Update]) -> BTreeMap<ServiceKey, Vec<Endpoint>> {
        updates
            .iter()
            .filter_map(|u| match u {
                Update::Publish(key, endpoints) => Some((key.clone(), endpoints.clone())),
                Update::Remove(_) => None,
            })
            .collect()
    }

    fn removed(updates: &[Update]) -> BTreeSet<ServiceKey> {
        updates
            .iter()
            .filter_map(|u| match u {
                Update::Remove(key) => Some(key.clone()),
                Update::Publish(..) => None,
            })
            .collect()
    }

    /// `count` ready endpoints 10.`block`.x.y.
    fn block(block: u8, count: u16) -> Vec<EpFixture> {
        (0..count)
            .map(|i| ep(&format!("10.{block}.{}.{}", i / 256, i % 256)))
            .collect()
    }

    #[test]
    fn a_service_split_over_three_large_slices_is_published_whole_at_init_done() {
        let slices = (0..3u8).map(|i| {
            slice("default", &format!("greeter-{i}"), "greeter")
                .port("grpc", 50051)
                .endpoints(block(i, 120))
                .build()
        });
        let (state, updates) = listed(slices);
        let out = published(&updates);
        assert_eq!(
            out.len(),
            2,
            "one key by name, one by number: {:?}",
            out.keys()
        );
        let by_name = &out[&key("default", "greeter", named("grpc"))];
        assert_eq!(by_name.len(), 360);
        assert!(
            by_name
                .iter()
                .all(|e| e.port == 50051 && e.weight == 1 && !e.draining)
        );
        assert_eq!(
            &out[&key("default", "greeter", PortRef::Number(50051))],
            by_name
        );
        assert_eq!(state.lists(), 1);
    }

    #[test]
    fn dual_stack_slices_merge_both_families_and_fqdn_slices_are_skipped() {
        let (_, updates) = listed([
            slice("default", "greeter-v4", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1"))
                .build(),
            slice("default", "greeter-v6", "greeter")
                .ipv6()
                .port("grpc", 50051)
                .endpoint(ep("fd00::1"))
                .build(),
            slice("default", "greeter-fqdn", "greeter")
                .address_type("FQDN")
                .port("grpc", 50051)
                .endpoint(ep("greeter.example.com"))
                .build(),
        ]);
        let out = published(&updates);
        assert_eq!(
            out[&key("default", "greeter", named("grpc"))],
            vec![endpoint("10.0.0.1", 50051), endpoint("fd00::1", 50051)]
        );
    }

    #[test]
    fn an_endpoint_in_two_slices_while_it_moves_keeps_its_serving_copy() {
        let grpc = key("default", "greeter", named("grpc"));
        // The draining copy sorts first by slice name; the serving copy still wins.
        let (mut state, updates) = listed([
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1").draining().zone("old"))
                .build(),
            slice("default", "greeter-b", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1").zone("new"))
                .build(),
        ]);
        assert_eq!(
            published(&updates)[&grpc],
            vec![endpoint("10.0.0.1", 50051).zone("new")]
        );

        // Both serving: the first by slice name wins.
        let updates = state.handle(Event::Apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1").zone("old"))
                .build(),
        ));
        assert_eq!(
            published(&updates)[&grpc],
            vec![endpoint("10.0.0.1", 50051).zone("old")]
        );

        // The move completes: the old slice drops it, the new copy remains.
        let updates = state.handle(Event::Apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .build(),
        ));
        assert_eq!(
            published(&updates)[&grpc],
            vec![endpoint("10.0.0.1", 50051).zone("new")]
        );

        // Both draining: still one copy, draining.
        let mut state = listed([]).0;
        for (name, zone) in [("greeter-b", "b"), ("greeter-a", "a")] {
            state.handle(Event::Apply(
                slice("default", name, "greeter")
                    .port("grpc", 50051)
                    .endpoint(ep("10.0.0.1").draining().zone(zone))
                    .build(),
            ));
        }
        let snapshot = &state.published[&("default".to_owned(), "greeter".to_owned())][&grpc];
        assert_eq!(
            snapshot,
            &vec![endpoint("10.0.0.1", 50051).zone("a").draining()]
        );
    }

    #[test]
    fn deleting_one_slice_recomputes_only_its_service() {
        let (mut state, _) = listed([
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1"))
                .build(),
            slice("default", "greeter-b", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.2"))
                .build(),
            slice("default", "other-a", "other")
                .port("http", 80)
                .endpoint(ep("10.0.1.1"))
                .build(),
        ]);
        let updates = state.handle(Event::Delete(
            slice("default", "greeter-b", "greeter").build(),
        ));
        assert_eq!(
            updates,
            vec![
                Update::Publish(
                    key("default", "greeter", named("grpc")),
                    vec![endpoint("10.0.0.1", 50051)]
                ),
                Update::Publish(
                    key("default", "greeter", PortRef::Number(50051)),
                    vec![endpoint("10.0.0.1", 50051)]
                ),
            ],
            "only greeter changes"
        );

        let updates = state.handle(Event::Delete(
            slice("default", "greeter-a", "greeter").build(),
        ));
        assert_eq!(
            removed(&updates),
            BTreeSet::from([
                key("default", "greeter", PortRef::Number(50051)),
                key("default", "greeter", named("grpc")),
            ])
        );
        assert!(published(&updates).is_empty());
        // Deleting a slice never seen changes nothing.
        assert!(
            state
                .handle(Event::Delete(slice("default", "ghost", "greeter").build()))
                .is_empty()
        );
    }

    #[test]
    fn a_named_port_with_different_numbers_per_slice_keeps_each_slices_number() {
        let (_, updates) = listed([
            slice("default", "greeter-a", "greeter")
                .port("grpc", 8080)
                .endpoint(ep("10.0.0.1"))
                .build(),
            slice("default", "greeter-b", "greeter")
                .port("grpc", 9090)
                .endpoint(ep("10.0.0.2"))
                .build(),
        ]);
        let out = published(&updates);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[&key("default", "greeter", named("grpc"))],
            vec![endpoint("10.0.0.1", 8080), endpoint("10.0.0.2", 9090)]
        );
        assert_eq!(
            out[&key("default", "greeter", PortRef::Number(8080))],
            vec![endpoint("10.0.0.1", 8080)]
        );
        assert_eq!(
            out[&key("default", "greeter", PortRef::Number(9090))],
            vec![endpoint("10.0.0.2", 9090)]
        );
    }

    /// `ready`, `serving`, `terminating`.
    type Conditions = (Option<bool>, Option<bool>, Option<bool>);

    #[test]
    fn conditions_decide_ready_draining_or_left_out() {
        // (ready, serving, terminating) -> None = left out, Some(draining)
        let cases: &[(Conditions, Option<bool>)] = &[
            ((None, None, None), Some(false)),
            ((Some(true), None, None), Some(false)),
            ((Some(false), None, None), None),
            ((Some(true), Some(true), Some(false)), Some(false)),
            ((Some(true), Some(false), Some(false)), Some(false)),
            ((Some(false), Some(true), Some(false)), None),
            ((Some(false), Some(true), Some(true)), Some(true)),
            ((Some(false), Some(false), Some(true)), None),
            ((Some(false), None, Some(true)), None),
            ((None, None, Some(true)), Some(true)),
            ((Some(true), None, Some(true)), Some(true)),
            ((None, Some(false), Some(true)), None),
            ((None, Some(true), None), Some(false)),
        ];
        for &((ready, serving, terminating), want) in cases {
            let conditions = EndpointConditions {
                ready,
                serving,
                terminating,
            };
            assert_eq!(
                draining(Some(&conditions)),
                want,
                "ready={ready:?} serving={serving:?} terminating={terminating:?}"
            );
        }
        assert_eq!(
            draining(None),
            Some(false),
            "no conditions at all means ready"
        );

        // Through a slice: the draining flag reaches the store, not-ready is left out.
        let (_, updates) = listed([slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .endpoint(ep("10.0.0.2").draining())
            .endpoint(ep("10.0.0.3").ready(false))
            .endpoint(ep("10.0.0.4").ready(false).serving(false).terminating(true))
            .build()]);
        assert_eq!(
            published(&updates)[&key("default", "greeter", named("grpc"))],
            vec![
                endpoint("10.0.0.1", 50051),
                endpoint("10.0.0.2", 50051).draining()
            ]
        );
    }

    #[test]
    fn endpoint_fields_come_from_the_slice_and_bad_entries_are_skipped() {
        let (_, updates) = listed([slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .port_spec(Some("dns"), Some(53), Some("UDP"))
            .port_spec(Some("nonum"), None, None)
            .port_spec(None, Some(8080), None)
            .port_spec(Some(""), Some(8081), Some("TCP"))
            .endpoint(
                ep("10.0.0.1")
                    .zone("a")
                    .node("node-1")
                    .target("Pod", "greeter-1"),
            )
            .endpoint(ep("10.0.0.2").target("Node", "not-a-pod"))
            .endpoint(ep("not-an-ip"))
            .build()]);
        let out = published(&updates);
        assert_eq!(
            out.keys().cloned().collect::<BTreeSet<_>>(),
            keys(&[
                "greeter.default:grpc",
                "greeter.default:8080",
                "greeter.default:8081",
                "greeter.default:50051"
            ]),
            "UDP, number-less and name-less ports handled"
        );
        assert_eq!(
            out[&key("default", "greeter", PortRef::Number(8080))],
            vec![
                endpoint("10.0.0.1", 8080)
                    .zone("a")
                    .node("node-1")
                    .pod("greeter-1"),
                endpoint("10.0.0.2", 8080),
            ]
        );
    }

    #[test]
    fn a_relist_publishes_only_what_changed_and_removes_what_vanished() {
        let greeter = |address: &str| {
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep(address))
                .build()
        };
        let other = slice("default", "other-a", "other")
            .port("http", 80)
            .endpoint(ep("10.0.1.1"))
            .build();
        let gone = slice("default", "gone-a", "gone")
            .port("http", 80)
            .endpoint(ep("10.0.2.1"))
            .build();
        let (mut state, updates) = listed([greeter("10.0.0.1"), other.clone(), gone]);
        assert_eq!(published(&updates).len(), 6);

        assert!(state.handle(Event::Init).is_empty());
        assert!(
            state
                .handle(Event::InitApply(greeter("10.0.0.9")))
                .is_empty()
        );
        assert!(state.handle(Event::InitApply(other)).is_empty());
        let updates = state.handle(Event::InitDone);
        assert_eq!(
            published(&updates).keys().cloned().collect::<BTreeSet<_>>(),
            keys(&["greeter.default:grpc", "greeter.default:50051"]),
            "other is unchanged"
        );
        assert_eq!(
            removed(&updates),
            BTreeSet::from([
                key("default", "gone", named("http")),
                key("default", "gone", PortRef::Number(80))
            ])
        );
        assert_eq!(state.lists(), 2);
        assert_eq!(state.services(), 2);
    }

    #[test]
    fn keys_a_service_no_longer_produces_are_removed() {
        let (mut state, _) = listed([slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build()]);
        let updates = state.handle(Event::Apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc-v2", 50052)
                .endpoint(ep("10.0.0.1"))
                .build(),
        ));
        assert_eq!(
            removed(&updates),
            BTreeSet::from([
                key("default", "greeter", named("grpc")),
                key("default", "greeter", PortRef::Number(50051)),
            ])
        );
        assert_eq!(published(&updates).len(), 2);
    }

    #[test]
    fn a_service_scaled_to_zero_keeps_its_keys_with_no_endpoints() {
        let (mut state, _) = listed([slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build()]);
        // The EndpointSlice controller leaves a slice with no ports and no endpoints.
        let updates = state.handle(Event::Apply(
            slice("default", "greeter-a", "greeter").build(),
        ));
        assert!(removed(&updates).is_empty());
        let published = published(&updates);
        assert_eq!(published.len(), 2);
        assert!(published.values().all(Vec::is_empty));
        // Deleting the last slice removes the service.
        let gone = state.handle(Event::Delete(
            slice("default", "greeter-a", "greeter").build(),
        ));
        assert_eq!(removed(&gone).len(), 2);
    }

    #[test]
    fn a_slice_that_changes_service_or_loses_its_label_moves_with_it() {
        let (mut state, _) = listed([slice("default", "s-1", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build()]);
        let updates = state.handle(Event::Apply(
            slice("default", "s-1", "greeter")
                .service("renamed")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1"))
                .build(),
        ));
        assert_eq!(removed(&updates).len(), 2);
        assert!(published(&updates).contains_key(&key("default", "renamed", named("grpc"))));

        let updates = state.handle(Event::Apply(
            slice("default", "s-1", "renamed")
                .unlabeled()
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1"))
                .build(),
        ));
        assert_eq!(removed(&updates).len(), 2);
        assert_eq!(state.services(), 0);
    }

    #[test]
    fn services_in_different_namespaces_stay_apart() {
        let (_, updates) = listed([
            slice("a", "greeter-x", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1"))
                .build(),
            slice("b", "greeter-x", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.2"))
                .build(),
        ]);
        let out = published(&updates);
        assert_eq!(
            out[&key("a", "greeter", named("grpc"))],
            vec![endpoint("10.0.0.1", 50051)]
        );
        assert_eq!(
            out[&key("b", "greeter", named("grpc"))],
            vec![endpoint("10.0.0.2", 50051)]
        );
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap_and_resets() {
        let policy = BackoffPolicy {
            min: Duration::from_millis(100),
            max: Duration::from_millis(400),
        };
        let mut backoff = policy.start();
        let mut seen = BTreeSet::new();
        for base in [100, 200, 400, 400, 400] {
            let delay = backoff.next().unwrap();
            let base = Duration::from_millis(base);
            assert!(
                delay >= base && delay < base * 2,
                "{delay:?} outside [{base:?}, 2x)"
            );
            seen.insert(delay);
        }
        backoff.reset();
        let delay = backoff.next().unwrap();
        assert!(
            delay < Duration::from_millis(200),
            "reset to min: {delay:?}"
        );

        let jittered = (0..20)
            .map(|_| policy.start().next().unwrap())
            .collect::<BTreeSet<_>>();
        assert!(jittered.len() > 1, "delays are jittered");
    }
}
