//! lb-server's Kubernetes source, driven through kube-rs against the API
//! server stand-in over the real list/watch wire protocol. Each test observes
//! the store the way a subscriber would; every wait is bounded.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use lb_server::{
    metrics::Metrics,
    model::{ServiceKey, Snapshot},
    source::kube::{DEFAULT_MAX_BACKOFF, DEFAULT_MIN_BACKOFF, KubeSource},
    store::{Store, Subscription},
};
use lookaside_backoff::Backoff;
use lookaside_tests::kube_api::{Counters, KubeApi, SliceBuilder, ep, eps, slice};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, timeout},
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

/// A KubeSource running against a stand-in.
struct Running {
    api: KubeApi,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    synced: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    watchers: usize,
}

async fn start(api: KubeApi, namespaces: &[&str]) -> Running {
    start_with_backoff(
        api,
        namespaces,
        Duration::from_millis(20),
        Duration::from_millis(200),
    )
    .await
}

/// [`start`], then waits until the source has synced and its watches are open.
async fn start_watching(api: KubeApi, namespaces: &[&str]) -> Running {
    let mut running = start(api, namespaces).await;
    running.synced().await;
    running.watching().await;
    running
}

async fn start_with_backoff(
    api: KubeApi,
    namespaces: &[&str],
    min: Duration,
    max: Duration,
) -> Running {
    let store = Store::new();
    let metrics = Arc::new(Metrics::new());
    let (synced_tx, synced) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let watchers = namespaces.len().max(1);
    let namespaces = namespaces.iter().map(|ns| (*ns).to_owned()).collect();
    let source = KubeSource::new(
        api.client(),
        namespaces,
        Arc::clone(&store),
        Arc::clone(&metrics),
    )
    .backoff(min, max);
    let task = tokio::spawn(source.run(synced_tx, shutdown.clone()));
    Running {
        api,
        store,
        metrics,
        synced,
        shutdown,
        task,
        watchers,
    }
}

impl Running {
    async fn synced(&mut self) {
        timeout(WAIT, self.synced.wait_for(|synced| *synced))
            .await
            .expect("the source syncs in time")
            .expect("the source keeps its sender");
    }

    /// Waits until every watcher has its watch open (it opens them after
    /// applying the list, so right after `synced` they may not be yet).
    async fn watching(&self) {
        let watchers = self.watchers;
        self.api_until("open watches", |c| c.open_watches == watchers)
            .await;
    }

    async fn api_until(&self, what: &str, condition: impl FnMut(&Counters) -> bool) -> Counters {
        timeout(WAIT, self.api.until(condition))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", self.api.counters()))
    }

    fn errors(&self) -> u64 {
        self.metrics
            .source_errors
            .with_label_values(&["kube"])
            .get()
    }

    fn restarts(&self) -> u64 {
        self.metrics.watch_restarts.get()
    }

    /// Every key in the store with its version.
    fn versions(&self) -> BTreeMap<String, u64> {
        self.store
            .services()
            .into_iter()
            .map(|view| (view.key.to_string(), view.snapshot.version))
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(WAIT, self.task)
            .await
            .expect("the source stops on shutdown")
            .expect("the source does not panic");
        self.api.shutdown().await;
    }
}

fn key(target: &str) -> ServiceKey {
    target.parse().unwrap()
}

/// Waits until the subscription's newest snapshot satisfies `condition`.
async fn until(
    sub: &mut Subscription,
    what: &str,
    condition: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let wait = async {
        let mut snapshot = sub.current();
        while !condition(&snapshot) {
            snapshot = sub.next().await;
        }
        snapshot
    };
    timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// `billing-a`, the one slice of `billing.default`, port `http` 8080,
/// holding `address`.
fn billing_a(address: &str) -> SliceBuilder {
    one_endpoint(("default", "billing-a", "billing"), ("http", 8080), address)
}

/// A slice of one endpoint: `(namespace, name, service)`, its one port
/// `(name, number)` and the endpoint's address.
fn one_endpoint(
    (namespace, name, service): (&str, &str, &str),
    (port_name, port): (&str, u16),
    address: &str,
) -> SliceBuilder {
    slice(namespace, name, service)
        .port(port_name, port)
        .endpoint(ep(address))
}

/// `greeter-a`, the one slice of `greeter.default`, port `grpc` 50051,
/// holding `address`.
fn greeter_a(address: &str) -> SliceBuilder {
    one_endpoint(
        ("default", "greeter-a", "greeter"),
        ("grpc", 50051),
        address,
    )
}

fn addresses(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .endpoints
        .iter()
        .map(|e| {
            let draining = if e.draining { " draining" } else { "" };
            format!("{}:{}{draining}", e.address, e.port)
        })
        .collect()
}

#[tokio::test]
async fn the_initial_list_is_published_at_once_and_marks_synced() {
    let api = KubeApi::start().await;
    for i in 0..3u8 {
        api.apply(
            slice("default", &format!("greeter-{i}"), "greeter")
                .port("grpc", 50051)
                .endpoints(eps(i, 120)),
        );
    }
    api.apply(
        slice("default", "billing-v6", "billing")
            .ipv6()
            .port("http", 8080)
            .endpoint(ep("fd00::1").zone("a").node("n1").pod("billing-1")),
    );
    let running = start_watching(api, &[]).await;

    // Synced means published: no waiting for the store after this point.
    let greeter = running
        .store
        .get(&key("greeter.default:grpc"))
        .expect("greeter");
    assert_eq!(greeter.endpoints.len(), 360);
    let billing = running
        .store
        .get(&key("billing.default:8080"))
        .expect("billing");
    assert_eq!(addresses(&billing), ["fd00::1:8080"]);
    assert_eq!(
        (
            billing.endpoints[0].zone.as_ref(),
            billing.endpoints[0].node.as_ref(),
            billing.endpoints[0].pod.as_ref()
        ),
        ("a", "n1", "billing-1")
    );
    // Each key was published exactly once: the store's version counter
    // counts publishes, so a per-slice publish would push it past the key count.
    let versions = running.versions();
    assert_eq!(versions.len(), 4, "{versions:?}");
    assert_eq!(versions.values().max().copied(), Some(4), "{versions:?}");
    assert_eq!(running.api.lists(), 1);
    assert_eq!((running.errors(), running.restarts()), (0, 0));
    let list = &running.api.requests()[0];
    assert!(
        list.starts_with("/apis/discovery.k8s.io/v1/endpointslices?")
            && list.contains("labelSelector=kubernetes.io%2Fservice-name"),
        "{list}"
    );
    running.stop().await;
}

#[tokio::test]
async fn synced_waits_for_a_successful_list_and_errors_publish_nothing() {
    let api = KubeApi::start().await;
    api.apply(greeter_a("10.0.0.1"));
    api.set_failing(true);
    let mut running = start(api, &[]).await;
    running.api_until("failed lists", |c| c.failed >= 2).await;
    assert!(!*running.synced.borrow(), "not synced without a list");
    assert!(running.errors() >= 1);
    assert!(running.store.services().is_empty());

    running.api.set_failing(false);
    running.synced().await;
    running.watching().await;
    assert!(running.store.get(&key("greeter.default:grpc")).is_some());
    assert_eq!(
        running.restarts(),
        0,
        "failed attempts before the first list are not restarts"
    );
    running.stop().await;
}

#[tokio::test]
async fn added_modified_and_deleted_slices_are_reflected() {
    let api = KubeApi::start().await;
    api.apply(
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .endpoint(ep("10.0.0.2")),
    );
    let running = start_watching(api, &[]).await;
    let mut greeter = running.store.subscribe(&key("greeter.default:grpc"));
    assert_eq!(
        addresses(&greeter.current()),
        ["10.0.0.1:50051", "10.0.0.2:50051"]
    );

    // ADDED: a second slice of the same service.
    running.api.apply(one_endpoint(
        ("default", "greeter-b", "greeter"),
        ("grpc", 50051),
        "10.0.0.3",
    ));
    until(&mut greeter, "the added slice", |s| s.endpoints.len() == 3).await;

    // MODIFIED: one endpoint starts draining, one stops being ready.
    running.api.apply(
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1").draining())
            .endpoint(ep("10.0.0.2").ready(false)),
    );
    let snapshot = until(&mut greeter, "the modified slice", |s| {
        s.endpoints.len() == 2
    })
    .await;
    assert_eq!(
        addresses(&snapshot),
        ["10.0.0.1:50051 draining", "10.0.0.3:50051"]
    );

    // A new service appears.
    let mut late = running.store.subscribe(&key("late.default:http"));
    running.api.apply(one_endpoint(
        ("default", "late-a", "late"),
        ("http", 80),
        "10.0.9.1",
    ));
    until(&mut late, "a new service", |s| s.exists).await;

    // DELETED: one slice, then the last one.
    assert!(running.api.delete("default", "greeter-b"));
    let snapshot = until(&mut greeter, "one slice deleted", |s| {
        s.endpoints.len() == 1
    })
    .await;
    assert_eq!(addresses(&snapshot), ["10.0.0.1:50051 draining"]);
    assert!(running.api.delete("default", "greeter-a"));
    until(&mut greeter, "the service removed", |s| !s.exists).await;
    assert!(running.store.get(&key("greeter.default:50051")).is_none());
    assert!(
        running.store.get(&key("late.default:80")).is_some(),
        "others untouched"
    );
    assert_eq!(
        (running.errors(), running.restarts(), running.api.lists()),
        (0, 0, 1)
    );
    running.stop().await;
}

#[tokio::test]
async fn a_410_after_compaction_relists_and_republishes_nothing_unchanged() {
    let api = KubeApi::start().await;
    api.apply(greeter_a("10.0.0.1"));
    api.apply(billing_a("10.1.0.1"));
    let running = start_watching(api, &[]).await;
    let before = running.versions();

    running.api.compact();
    running.api.drop_watches();
    // Resume from the old version (410 Expired), re-list, watch again.
    let counters = running
        .api_until("the re-list and a new watch", |c| {
            c.lists == 2 && c.watches == 3 && c.open_watches == 1
        })
        .await;
    assert_eq!(counters.expired, 1);
    assert_eq!(running.restarts(), 1);
    assert!(
        running.errors() >= 1,
        "the 410 is counted as a source error"
    );
    assert_eq!(
        running.versions(),
        before,
        "an unchanged re-list publishes nothing"
    );
    running.stop().await;
}

#[tokio::test]
async fn changes_during_an_outage_are_published_as_a_difference_after_a_relist() {
    let api = KubeApi::start().await;
    api.apply(greeter_a("10.0.0.1"));
    api.apply(billing_a("10.1.0.1"));
    api.apply(one_endpoint(
        ("default", "legacy-a", "legacy"),
        ("http", 80),
        "10.2.0.1",
    ));
    let running = start_watching(api, &[]).await;
    let before = running.versions();

    // The API server goes away: the watch drops and every retry fails.
    running.api.set_failing(true);
    running.api.drop_watches();
    running.api_until("failed retries", |c| c.failed >= 2).await;
    assert!(running.errors() >= 1);
    assert_eq!(
        running.versions(),
        before,
        "an outage publishes nothing, least of all an empty list"
    );

    // Meanwhile the cluster changes and the history is compacted.
    running.api.apply(greeter_a("10.0.0.9"));
    assert!(running.api.delete("default", "legacy-a"));
    running.api.apply(one_endpoint(
        ("default", "fresh-a", "fresh"),
        ("grpc", 50051),
        "10.3.0.1",
    ));
    running.api.compact();
    running.api.set_failing(false);

    running
        .api_until("the re-list and a new watch", |c| {
            c.lists == 2 && c.open_watches == 1
        })
        .await;
    let after = running.versions();
    assert_eq!(
        after["billing.default:http"], before["billing.default:http"],
        "unchanged keeps its version"
    );
    assert_eq!(
        after["billing.default:8080"],
        before["billing.default:8080"]
    );
    assert!(after["greeter.default:grpc"] > before["greeter.default:grpc"]);
    assert_eq!(
        addresses(&running.store.get(&key("greeter.default:grpc")).unwrap()),
        ["10.0.0.9:50051"]
    );
    assert!(!after.contains_key("legacy.default:http") && !after.contains_key("legacy.default:80"));
    assert!(after.contains_key("fresh.default:grpc"));
    assert_eq!(running.restarts(), 1);
    running.stop().await;
}

#[tokio::test]
async fn dropped_or_ended_watches_resume_without_a_relist_and_keep_state() {
    let api = KubeApi::start().await;
    api.apply(greeter_a("10.0.0.1"));
    let running = start_watching(api, &[]).await;
    let before = running.versions();
    let mut greeter = running.store.subscribe(&key("greeter.default:grpc"));
    greeter.current();

    running.api.drop_watches();
    running
        .api_until("a resumed watch", |c| c.watches == 2 && c.open_watches == 1)
        .await;
    running.api.end_watches();
    running
        .api_until("another resumed watch", |c| {
            c.watches == 3 && c.open_watches == 1
        })
        .await;
    assert_eq!(
        running.versions(),
        before,
        "nothing published across the reconnects"
    );

    running.api.apply(greeter_a("10.0.0.2"));
    let snapshot = until(&mut greeter, "a change after the reconnects", |s| {
        addresses(s) == ["10.0.0.2:50051"]
    })
    .await;
    assert_eq!(
        snapshot.version,
        before["greeter.default:grpc"] + 2,
        "one publish per key, no empty one between"
    );
    assert_eq!((running.api.lists(), running.restarts()), (1, 0));
    running.stop().await;
}

#[tokio::test]
async fn namespaced_mode_sees_only_its_namespaces_through_namespaced_urls() {
    let api = KubeApi::start().await;
    api.apply(one_endpoint(
        ("a", "greeter-a", "greeter"),
        ("grpc", 50051),
        "10.0.0.1",
    ));
    api.apply(one_endpoint(
        ("b", "greeter-b", "greeter"),
        ("grpc", 50051),
        "10.0.1.1",
    ));
    // Two namespaces, one of them empty: synced needs both watchers.
    let running = start_watching(api, &["a", "c"]).await;
    assert!(running.store.get(&key("greeter.a:grpc")).is_some());
    assert!(running.store.get(&key("greeter.b:grpc")).is_none());

    let mut in_a = running.store.subscribe(&key("greeter.a:grpc"));
    running.api.apply(one_endpoint(
        ("b", "greeter-b", "greeter"),
        ("grpc", 50051),
        "10.0.1.2",
    ));
    running.api.apply(one_endpoint(
        ("a", "greeter-a", "greeter"),
        ("grpc", 50051),
        "10.0.0.2",
    ));
    until(&mut in_a, "the change in a", |s| {
        addresses(s) == ["10.0.0.2:50051"]
    })
    .await;
    assert!(running.store.get(&key("greeter.b:grpc")).is_none());
    assert_eq!(running.store.services().len(), 2, "only a's two keys");

    let requests = running.api.requests();
    for prefix in [
        "/apis/discovery.k8s.io/v1/namespaces/a/",
        "/apis/discovery.k8s.io/v1/namespaces/c/",
    ] {
        assert!(
            requests.iter().any(|r| r.starts_with(prefix)),
            "{prefix} in {requests:?}"
        );
    }
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("/apis/discovery.k8s.io/v1/namespaces/")),
        "no cluster-wide request: {requests:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn bookmarks_disturb_nothing_and_spare_a_relist_after_compaction() {
    let api = KubeApi::start().await;
    api.apply(greeter_a("10.0.0.1"));
    api.apply(billing_a("10.1.0.1"));
    let running = start_watching(api, &[]).await;
    let before = running.versions();
    let mut greeter = running.store.subscribe(&key("greeter.default:grpc"));
    greeter.current();

    for _ in 0..3 {
        running.api.bookmark();
    }
    running.api.apply(greeter_a("10.0.0.2"));
    until(&mut greeter, "a change after bookmarks", |s| {
        addresses(s) == ["10.0.0.2:50051"]
    })
    .await;
    assert_eq!(
        running.api.counters().bookmarks,
        3,
        "the watch asked for bookmarks"
    );
    let after = running.versions();
    assert_eq!(
        after["billing.default:http"],
        before["billing.default:http"]
    );

    // Compaction moves the revision on; a bookmark carries it to the watcher,
    // so resuming after the stream ends needs no re-list.
    running.api.compact();
    running.api.bookmark();
    running.api.end_watches();
    running
        .api_until("a resumed watch", |c| c.watches >= 2 && c.open_watches == 1)
        .await;
    let counters = running.api.counters();
    assert_eq!(
        (counters.watches, counters.expired, counters.lists),
        (2, 0, 1),
        "{counters:?}"
    );
    assert_eq!((running.errors(), running.restarts()), (0, 0));
    assert_eq!(running.versions(), after);
    running.stop().await;
}

#[tokio::test]
async fn slices_without_the_service_name_label_are_ignored() {
    let api = KubeApi::start().await;
    api.apply(
        slice("default", "orphan-a", "orphan")
            .without_service_label()
            .port("grpc", 50051)
            .endpoint(ep("10.9.0.1")),
    );
    api.apply(greeter_a("10.0.0.1"));
    let running = start_watching(api, &[]).await;
    let keys: Vec<String> = running.versions().into_keys().collect();
    assert_eq!(keys, ["greeter.default:50051", "greeter.default:grpc"]);

    // A later unlabelled slice never arrives; events stay in order, so once
    // the labelled change is seen the unlabelled one would have been too.
    let mut greeter = running.store.subscribe(&key("greeter.default:grpc"));
    running.api.apply(
        slice("default", "orphan-b", "greeter")
            .without_service_label()
            .port("grpc", 50051)
            .endpoint(ep("10.9.0.2")),
    );
    running.api.apply(greeter_a("10.0.0.2"));
    let snapshot = until(&mut greeter, "the labelled change", |s| {
        addresses(s) == ["10.0.0.2:50051"]
    })
    .await;
    assert_eq!(
        snapshot.endpoints.len(),
        1,
        "the unlabelled slice's endpoint is not merged"
    );

    // Removing the label takes the slice, and so the service, away.
    running.api.apply(
        slice("default", "greeter-a", "greeter")
            .without_service_label()
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.2")),
    );
    until(&mut greeter, "the service removed", |s| !s.exists).await;
    assert!(running.store.services().is_empty());
    running.stop().await;
}

/// How soon after the API server answers again the first change must reach
/// subscribers, however long the outage was (issue 13: with client-go's
/// 800 ms doubling to 30 s plus up to 100% jitter it grew with the outage).
const RECOVERY: Duration = Duration::from_secs(5);

/// The test runs the default backoff and the bound at a fifth of their
/// length, so an outage long enough to take the old backoff past the bound
/// lasts about a second instead of ten. (Real time, not a paused clock: the
/// kube client's own timeouts would fire at once under auto-advance.)
const SCALE: u32 = 5;

/// The API server fails every request for as long as it takes the source to
/// fail four times in a row (the old backoff's fourth delay is at least
/// 6.4 s, scaled 1.28 s: past the bound), then answers again; a change made
/// right then must reach a subscriber within the bound. With `compacted`,
/// the history is gone meanwhile, so the resumed watch gets 410 and the
/// source must re-list first.
async fn a_change_after_an_outage_arrives_within_the_bound(compacted: bool) {
    let (min, max) = (DEFAULT_MIN_BACKOFF / SCALE, DEFAULT_MAX_BACKOFF / SCALE);
    let bound = RECOVERY / SCALE;
    let api = KubeApi::start().await;
    api.apply(greeter_a("10.0.0.1"));
    let mut running = start_with_backoff(api, &[], min, max).await;
    running.synced().await;
    running.watching().await;
    let mut greeter = running.store.subscribe(&key("greeter.default:grpc"));
    greeter.current();

    let down = Instant::now();
    running.api.set_failing(true);
    running.api.drop_watches();
    running
        .api_until("four failed retries", |c| c.failed >= 4)
        .await;
    let outage = down.elapsed();
    // Not hammering: at least three delays, each at least half its step.
    let policy = Backoff::new(min, max);
    let least: Duration = (0..3).map(|n| policy.step(n) / 2).sum();
    assert!(
        outage >= least,
        "four attempts in {outage:?}, faster than the backoff allows ({least:?})"
    );
    if compacted {
        running.api.compact();
    }

    let back = Instant::now();
    running.api.set_failing(false);
    running.api.apply(greeter_a("10.0.0.2"));
    let arrived = timeout(bound, async {
        while addresses(&greeter.current()) != ["10.0.0.2:50051"] {
            greeter.next().await;
        }
    })
    .await;
    let took = back.elapsed();
    assert!(
        arrived.is_ok(),
        "the change took longer than {bound:?} (outage {outage:?}, compacted {compacted}): {:?}",
        running.api.counters()
    );
    eprintln!("outage {outage:?}; the change arrived {took:?} after the API server answered");
    assert_eq!(
        running.restarts(),
        u64::from(compacted),
        "a re-list only after a 410"
    );
    running.stop().await;
}

#[tokio::test]
async fn after_an_outage_a_resumed_watch_delivers_the_next_change_within_the_bound() {
    a_change_after_an_outage_arrives_within_the_bound(false).await;
}

#[tokio::test]
async fn after_an_outage_that_expired_the_history_a_relist_delivers_within_the_bound() {
    a_change_after_an_outage_arrives_within_the_bound(true).await;
}

/// lb-server (the real binary, `--source kube` with a kubeconfig for the
/// stand-in) in a child process, killed on drop.
struct KubeLbProcess {
    url: String,
    child: std::process::Child,
}

impl KubeLbProcess {
    fn start(kubeconfig: &std::path::Path) -> Self {
        let mut child = std::process::Command::new(lookaside_tests::local::lb_server_binary())
            .args(["--source", "kube", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("KUBECONFIG", kubeconfig)
            .env("LB_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start lb-server");
        let addr = lookaside_tests::local::logged_addr(&mut child, "grpc");
        Self {
            url: format!("http://{addr}"),
            child,
        }
    }
}

impl Drop for KubeLbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One slice per backend (each backend has a port of its own): `name`'s
/// endpoint in `zone`, hinted for `for_zones` and, if given, `for_nodes`.
fn hinted(
    backend: &lookaside_tests::local::Backend,
    zone: &str,
    for_zones: &[&str],
    for_nodes: Option<&[&str]>,
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let mut endpoint = ep(&backend.addr.ip().to_string())
        .zone(zone)
        .pod(&backend.name)
        .for_zones(for_zones);
    if let Some(nodes) = for_nodes {
        endpoint = endpoint.for_nodes(nodes);
    }
    slice("default", &format!("greeter-{}", backend.name), "greeter")
        .port("grpc", backend.addr.port())
        .endpoint(endpoint)
        .build()
}

/// Calls per backend over `calls` calls through `channel`.
async fn spread(channel: &lb_client::Channel, calls: u64) -> BTreeMap<String, u64> {
    let tally = greeter::load::Tally::new(4);
    greeter::load::run(
        lookaside_proto::helloworld::greeter_client::GreeterClient::new(channel.clone()),
        Some(calls),
        4,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let counts = tally.counts();
    assert_eq!(counts.failed(), 0, "{counts:?}");
    counts.backends
}

/// Makes calls until all of a batch go to `only`, for at most [`WAIT`];
/// then checks a larger batch.
async fn calls_go_only_to(channel: &lb_client::Channel, only: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let batch = spread(channel, 40).await;
        if batch.keys().all(|b| b == only) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "calls still reach {batch:?}, not only {only}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let batch = spread(channel, 300).await;
    assert_eq!(
        batch.keys().collect::<Vec<_>>(),
        vec![only],
        "every call to the endpoint hinted for this client: {batch:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_hints_from_the_api_reach_a_zoned_client_which_follows_them_as_they_change() {
    use lookaside_tests::local::{Backend, TARGET};
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut backends = Vec::new();
    for name in ["a1", "a2", "b1", "b2"] {
        backends.push(Backend::start(name).await);
    }
    let [a1, a2, b1, b2] = &backends[..] else {
        unreachable!()
    };
    // Zone hints as the EndpointSlice controller might set them: a2 is in
    // zone a but lent to zone b, so only the hints (not the zones) say that
    // zone a's clients use a1 alone.
    api.apply(hinted(a1, "a", &["a"], None));
    api.apply(hinted(a2, "a", &["b"], None));
    api.apply(hinted(b1, "b", &["b"], None));
    api.apply(hinted(b2, "b", &["b"], None));
    let lb = KubeLbProcess::start(&api.kubeconfig(dir.path()));
    let channel = lb_client::Channel::builder(TARGET)
        .lb(&lb.url)
        .zone("a")
        .node("node-1")
        .connect()
        .await
        .expect("channel");
    // lb-server answers once its first list is in: wait for the first answered call.
    let deadline = Instant::now() + WAIT;
    let mut client =
        lookaside_proto::helloworld::greeter_client::GreeterClient::new(channel.clone());
    while client
        .say_hello(lookaside_proto::helloworld::HelloRequest::default())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "no call answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // All four endpoints are known (the channel balances over them all
    // when no hint applies), yet zone a's calls go to a1 only.
    calls_go_only_to(&channel, "a1").await;

    // The hints change: zone a now gets a2, and a1 goes to zone b.
    api.apply(hinted(a1, "a", &["b"], None));
    api.apply(hinted(a2, "a", &["a"], None));
    calls_go_only_to(&channel, "a2").await;

    // Node hints on every endpoint (`trafficDistribution: PreferSameNode`)
    // come before zone hints: node-1's client goes to b2, in another zone.
    api.apply(hinted(a1, "a", &["b"], Some(&["node-2"])));
    api.apply(hinted(a2, "a", &["a"], Some(&["node-2"])));
    api.apply(hinted(b1, "b", &["b"], Some(&["node-3"])));
    api.apply(hinted(b2, "b", &["b"], Some(&["node-1"])));
    calls_go_only_to(&channel, "b2").await;

    // Hints gone: the zone shares decide again, and calls spread beyond one
    // endpoint (zone a's clients are all the clients lb-server knows, so
    // about half of their calls spill to zone b).
    for backend in &backends {
        let zone = &backend.name[..1];
        api.apply(
            slice("default", &format!("greeter-{}", backend.name), "greeter")
                .port("grpc", backend.addr.port())
                .endpoint(
                    ep(&backend.addr.ip().to_string())
                        .zone(zone)
                        .pod(&backend.name),
                )
                .build(),
        );
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let batch = spread(&channel, 200).await;
        if batch.len() > 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "calls stay on {batch:?} with no hints"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(channel);
    drop(lb);
    for backend in backends {
        backend.stop().await;
    }
    api.shutdown().await;
}

/// Until its first list, lb-server knows no service. A Watch, a grpclb
/// stream or an ADS stream opened then is not answered (an answer would say
/// the service does not exist, and a client would drop the list it holds,
/// as lb-client does when it reconnects to a restarted lb-server); each is
/// answered with the listed endpoints as soon as the list arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_before_the_first_list_are_answered_with_it() {
    use envoy_types::pb::envoy::service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    };
    use lookaside_proto::{
        grpclb::v1::{
            InitialLoadBalanceRequest, LoadBalanceRequest,
            load_balance_request::LoadBalanceRequestType, load_balancer_client::LoadBalancerClient,
        },
        lookaside::v1::{WatchRequest, discovery_client::DiscoveryClient},
    };
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    api.apply(greeter_a("10.0.0.1"));
    api.set_failing(true);
    let lb = KubeLbProcess::start(&api.kubeconfig(dir.path()));
    let channel = tonic::transport::Channel::from_shared(lb.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let watch = {
        let mut client = DiscoveryClient::new(channel.clone());
        tokio::spawn(async move {
            let request = WatchRequest {
                target: "greeter.default:grpc".into(),
                ..Default::default()
            };
            client.watch(request).await?.into_inner().message().await
        })
    };
    let grpclb = {
        let mut client = LoadBalancerClient::new(channel.clone());
        tokio::spawn(async move {
            let initial = LoadBalanceRequest {
                load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
                    InitialLoadBalanceRequest {
                        name: "greeter.default:grpc".into(),
                    },
                )),
            };
            let requests = futures::StreamExt::chain(
                futures::stream::iter([initial]),
                futures::stream::pending(),
            );
            let mut responses = client.balance_load(requests).await?.into_inner();
            // The initial response, then the first server list (or fallback).
            responses.message().await?;
            responses.message().await
        })
    };
    let ads = {
        let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
        tokio::spawn(async move {
            let request = DiscoveryRequest {
                type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
                    .into(),
                resource_names: vec!["greeter.default:grpc".into()],
                ..Default::default()
            };
            let requests = futures::StreamExt::chain(
                futures::stream::iter([request]),
                futures::stream::pending(),
            );
            client
                .stream_aggregated_resources(requests)
                .await?
                .into_inner()
                .message()
                .await
        })
    };
    // lb-server keeps trying to list; every stream stays unanswered meanwhile.
    api.until(|c| c.failed >= 3).await;
    assert!(!watch.is_finished(), "Watch answered before the first list");
    assert!(
        !grpclb.is_finished(),
        "grpclb answered before the first list"
    );
    assert!(!ads.is_finished(), "ADS answered before the first list");

    api.set_failing(false);
    let watched = tokio::time::timeout(WAIT, watch).await.unwrap().unwrap();
    let watched = watched.unwrap().expect("a Watch response");
    assert!(watched.exists);
    assert_eq!(watched.endpoints.len(), 1, "{watched:?}");
    let listed = tokio::time::timeout(WAIT, grpclb).await.unwrap().unwrap();
    let listed = listed.unwrap().expect("a grpclb response");
    assert!(
        matches!(
            listed.load_balance_response_type,
            Some(lookaside_proto::grpclb::v1::load_balance_response::LoadBalanceResponseType::ServerList(ref list))
                if list.servers.len() == 1
        ),
        "{listed:?}"
    );
    let assigned = tokio::time::timeout(WAIT, ads).await.unwrap().unwrap();
    let assigned = assigned.unwrap().expect("an EDS response");
    assert_eq!(assigned.resources.len(), 1, "{assigned:?}");
}
