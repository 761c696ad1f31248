//! Delta vs state-of-the-world ADS (issue 14, benchmark 3): a rolling restart
//! of a 1,000-pod service watched by 100 Envoy-style ADS subscribers, once
//! over `StreamAggregatedResources` and once over `DeltaAggregatedResources`,
//! in one run; the server's CPU and the bytes it wrote, and their ratios.
//!
//! Run: `cargo bench -p lb-server --bench delta_ads` (the release lb-server
//! binary runs as its own process on a file source, so its CPU time is read
//! from /proc). `DELTA_ADS_SUBSCRIBERS`, `DELTA_ADS_PODS` and
//! `DELTA_ADS_OTHERS` change the sizes.
//!
//! Each subscriber is a tonic ADS client on its own HTTP/2 connection, as an
//! Envoy is: wildcard CDS, and EDS for every cluster it gets, ACKing every
//! response. Besides the restarted service there are other services (50 by
//! default, 10 endpoints each) that the subscribers hold and that do not change.
//!
//! The restart: 25% surge, in waves of a quarter of the pods; per wave, new
//! pods become ready 50 at a time, then the old ones drain 50 at a time, then
//! go 50 at a time (15 versions per wave, 60 in all). After each change the
//! benchmark waits until every subscriber holds it (its endpoint and draining
//! counts), so no version is skipped by coalescing and both protocols carry
//! the same versions.
//!
//! Then every subscriber opens a new stream, as after a broken connection:
//! over state of the world it is sent everything again, over delta it states
//! the versions it holds (`initial_resource_versions`) and is sent nothing
//! it has.
//!
//! Bytes are the gRPC messages the server wrote (each message's encoded
//! length plus its 5-byte prefix, counted by the subscribers; HTTP/2 framing
//! excluded). CPU is the server's user + system time over the restart.

#[path = "support/connection.rs"]
mod connection;
#[path = "support/server.rs"]
mod server;

use std::{
    collections::HashMap,
    fmt::Write as _,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::{
    config::{cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment},
    service::discovery::v3::{
        DeltaDiscoveryRequest, DiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use connection::Connection;
use server::ServerProcess;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SERVICE: &str = "big.default:grpc";
/// Pods that change state per version.
const STEP: usize = 50;
/// The most a change may take to reach every subscriber before the run fails.
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    Sotw,
    Delta,
}

/// What one subscriber holds of the restarted service: (endpoints, draining).
type Held = Arc<Mutex<(usize, usize)>>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The service file: the restarted service's pods (id → draining) and the others.
fn render(pods: &std::collections::BTreeMap<usize, bool>, others: usize) -> String {
    let mut text = String::from("services:\n");
    writeln!(text, "  {SERVICE}:").unwrap();
    for (id, draining) in pods {
        let address = format!("10.{}.{}.{}", id / 65_536, (id / 256) % 256, id % 256);
        write!(text, "    - {{address: \"{address}:8080\", pod: p{id}").unwrap();
        text.push_str(if *draining {
            ", draining: true}\n"
        } else {
            "}\n"
        });
    }
    for service in 0..others {
        writeln!(text, "  other{service}.default:grpc:").unwrap();
        for i in 0..10 {
            writeln!(text, "    - address: \"10.200.{service}.{i}:8080\"").unwrap();
        }
    }
    text
}

fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn counts(cla: &ClusterLoadAssignment) -> (usize, usize) {
    let endpoints = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints);
    let (mut all, mut draining) = (0, 0);
    for endpoint in endpoints {
        all += 1;
        // envoy.config.core.v3.HealthStatus DRAINING = 3.
        if endpoint.health_status == 3 {
            draining += 1;
        }
    }
    (all, draining)
}

fn node(i: usize) -> Node {
    Node {
        id: format!("envoy-{i}"),
        cluster: "bench".into(),
        user_agent_name: "envoy".into(),
        ..Node::default()
    }
}

/// What a subscriber needs besides its connection: where to count bytes,
/// what it holds of the restarted service, when to reconnect (a new stream,
/// as after a broken one) and which reconnection it has its EDS answer for.
#[derive(Clone)]
struct Subscriber {
    i: usize,
    bytes: Arc<AtomicU64>,
    held: Held,
    reconnect: watch::Receiver<u64>,
    synced: Arc<AtomicU64>,
}

impl Subscriber {
    fn count(&self, message: &impl Message) {
        self.bytes
            .fetch_add(message.encoded_len() as u64 + 5, Ordering::Relaxed);
    }
}

/// One state-of-the-world subscriber: wildcard CDS, EDS for every cluster.
async fn sotw(connection: Connection, origin: http::Uri, mut sub: Subscriber) {
    loop {
        let generation = *sub.reconnect.borrow_and_update();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(DiscoveryRequest {
            node: Some(node(sub.i)),
            type_url: CDS.into(),
            ..DiscoveryRequest::default()
        })
        .unwrap();
        let mut stream =
            AggregatedDiscoveryServiceClient::with_origin(connection.clone(), origin.clone())
                .max_decoding_message_size(64 << 20)
                .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
        let mut clusters: Vec<String> = Vec::new();
        loop {
            let response = tokio::select! {
                response = stream.message() => match response {
                    Ok(Some(response)) => response,
                    _ => return,
                },
                _ = sub.reconnect.changed() => break,
            };
            sub.count(&response);
            let cds = response.type_url == CDS;
            if cds {
                clusters = response
                    .resources
                    .iter()
                    .map(|any| Cluster::decode(any.value.as_slice()).unwrap().name)
                    .collect();
            } else {
                for any in &response.resources {
                    let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                    if cla.cluster_name == SERVICE {
                        *sub.held.lock().unwrap() = counts(&cla);
                    }
                }
                sub.synced.store(generation, Ordering::Relaxed);
            }
            let ack = DiscoveryRequest {
                version_info: response.version_info.clone(),
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                resource_names: if cds { Vec::new() } else { clusters.clone() },
                ..DiscoveryRequest::default()
            };
            // Envoy asks for the clusters' assignments once it has the clusters.
            let eds = cds.then(|| DiscoveryRequest {
                type_url: EDS.into(),
                resource_names: clusters.clone(),
                ..DiscoveryRequest::default()
            });
            if tx.send(ack).is_err() || eds.is_some_and(|eds| tx.send(eds).is_err()) {
                return;
            }
        }
    }
}

/// One delta subscriber: wildcard CDS, EDS for every cluster it is sent; on
/// a new stream it states what it holds, as Envoy does.
async fn delta(connection: Connection, origin: http::Uri, mut sub: Subscriber) {
    // Per type: name → version held.
    let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
    loop {
        let generation = *sub.reconnect.borrow_and_update();
        let (tx, rx) = mpsc::unbounded_channel();
        let versions = |type_url: &str| held.get(type_url).cloned().unwrap_or_default();
        tx.send(DeltaDiscoveryRequest {
            node: Some(node(sub.i)),
            type_url: CDS.into(),
            initial_resource_versions: versions(CDS),
            ..DeltaDiscoveryRequest::default()
        })
        .unwrap();
        let assignments = versions(EDS);
        if !assignments.is_empty() {
            tx.send(DeltaDiscoveryRequest {
                type_url: EDS.into(),
                resource_names_subscribe: assignments.keys().cloned().collect(),
                initial_resource_versions: assignments,
                ..DeltaDiscoveryRequest::default()
            })
            .unwrap();
        }
        let mut stream =
            AggregatedDiscoveryServiceClient::with_origin(connection.clone(), origin.clone())
                .max_decoding_message_size(64 << 20)
                .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
        loop {
            let response = tokio::select! {
                response = stream.message() => match response {
                    Ok(Some(response)) => response,
                    _ => return,
                },
                _ = sub.reconnect.changed() => break,
            };
            sub.count(&response);
            let ack = DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            };
            if tx.send(ack).is_err() {
                return;
            }
            let of_type = held.entry(response.type_url.clone()).or_default();
            for name in &response.removed_resources {
                of_type.remove(name);
            }
            for resource in &response.resources {
                of_type.insert(resource.name.clone(), resource.version.clone());
            }
            if response.type_url == CDS {
                let new: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
                if (!new.is_empty() || !response.removed_resources.is_empty())
                    && tx
                        .send(DeltaDiscoveryRequest {
                            type_url: EDS.into(),
                            resource_names_subscribe: new,
                            resource_names_unsubscribe: response.removed_resources.clone(),
                            ..DeltaDiscoveryRequest::default()
                        })
                        .is_err()
                {
                    return;
                }
            } else {
                for resource in &response.resources {
                    if resource.name == SERVICE {
                        let any = resource.resource.as_ref().unwrap();
                        let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                        *sub.held.lock().unwrap() = counts(&cla);
                    }
                }
                sub.synced.store(generation, Ordering::Relaxed);
            }
        }
    }
}

struct Outcome {
    cpu: Duration,
    bytes: u64,
    versions: usize,
    took: Duration,
    /// Every subscriber opening a new stream after the restart.
    reconnect_cpu: Duration,
    reconnect_bytes: u64,
    rss_kib: u64,
}

async fn wait_all(held: &[Held], want: (usize, usize)) {
    let started = Instant::now();
    while !held.iter().all(|h| *h.lock().unwrap() == want) {
        assert!(
            started.elapsed() < DEADLINE,
            "subscribers did not get {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn run(protocol: Protocol, subscribers: usize, pods: usize, others: usize) -> Outcome {
    let dir = std::env::temp_dir().join(format!("delta-ads-{}-{protocol:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("services.yaml");
    let mut state: std::collections::BTreeMap<usize, bool> =
        (0..pods).map(|id| (id, false)).collect();
    write(&file, &render(&state, others));
    let server = ServerProcess::start(
        Command::new(env!("CARGO_BIN_EXE_lb-server")),
        &file,
        &["--file-poll-interval", "1s"],
    );
    let bytes = Arc::new(AtomicU64::new(0));
    let (reconnect, reconnect_rx) = watch::channel(0);
    let subs: Vec<Subscriber> = (0..subscribers)
        .map(|i| Subscriber {
            i,
            bytes: bytes.clone(),
            held: Held::default(),
            reconnect: reconnect_rx.clone(),
            synced: Arc::default(),
        })
        .collect();
    let held: Vec<Held> = subs.iter().map(|sub| sub.held.clone()).collect();
    let mut tasks = Vec::new();
    for sub in &subs {
        let (connection, origin) = Connection::open(server.grpc).await;
        let sub = sub.clone();
        tasks.push(tokio::spawn(async move {
            match protocol {
                Protocol::Sotw => sotw(connection, origin, sub).await,
                Protocol::Delta => delta(connection, origin, sub).await,
            }
        }));
    }
    wait_all(&held, (pods, 0)).await;
    // Let the start-up ACKs settle before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, bytes0, started) = (server.cpu(), bytes.load(Ordering::Relaxed), Instant::now());

    let surge = pods / 4;
    let mut next_id = pods;
    let mut versions = 0;
    let mut change = |state: &mut std::collections::BTreeMap<usize, bool>| {
        versions += 1;
        write(&file, &render(state, others));
        let draining = state.values().filter(|d| **d).count();
        (state.len(), draining)
    };
    for wave in 0..4 {
        let old: Vec<usize> = (wave * surge..(wave + 1) * surge).collect();
        for _ in (0..surge).step_by(STEP) {
            for _ in 0..STEP {
                state.insert(next_id, false);
                next_id += 1;
            }
            let want = change(&mut state);
            wait_all(&held, want).await;
        }
        for chunk in old.chunks(STEP) {
            for id in chunk {
                state.insert(*id, true);
            }
            let want = change(&mut state);
            wait_all(&held, want).await;
        }
        for chunk in old.chunks(STEP) {
            for id in chunk {
                state.remove(id);
            }
            let want = change(&mut state);
            wait_all(&held, want).await;
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu1, bytes1) = (server.cpu(), bytes.load(Ordering::Relaxed));

    // Every subscriber opens a new stream, as after a broken connection.
    reconnect.send(1).unwrap();
    let started = Instant::now();
    while !subs
        .iter()
        .all(|sub| sub.synced.load(Ordering::Relaxed) == 1)
    {
        assert!(started.elapsed() < DEADLINE, "subscribers did not resync");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = Outcome {
        cpu: cpu1 - cpu0,
        bytes: bytes1 - bytes0,
        versions,
        took,
        reconnect_cpu: server.cpu() - cpu1,
        reconnect_bytes: bytes.load(Ordering::Relaxed) - bytes1,
        rss_kib: server.rss_kib(),
    };
    drop(server);
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn main() {
    let subscribers = env("DELTA_ADS_SUBSCRIBERS", 100);
    let pods = env("DELTA_ADS_PODS", 1_000);
    let others = env("DELTA_ADS_OTHERS", 50);
    // Subscribers on one thread: on one machine they share the cores with the server.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sotw = runtime.block_on(run(Protocol::Sotw, subscribers, pods, others));
    let delta = runtime.block_on(run(Protocol::Delta, subscribers, pods, others));
    println!(
        "rolling restart of {pods} pods (25% surge, {STEP} pods per version), \
         {subscribers} ADS subscribers, {others} other services"
    );
    println!(
        "| protocol | versions | server CPU (ms) | CPU per pod replaced (µs) | bytes written (MiB) | bytes per subscriber per version (KiB) | wall (s) | reconnect: CPU (ms) | reconnect: bytes (KiB) | server RSS (MiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, o) in [("state of the world", &sotw), ("delta", &delta)] {
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            o.versions,
            o.cpu.as_secs_f64() * 1e3,
            o.cpu.as_secs_f64() * 1e6 / pods as f64,
            o.bytes as f64 / (1 << 20) as f64,
            o.bytes as f64 / 1024.0 / subscribers as f64 / o.versions as f64,
            o.took.as_secs_f64(),
            o.reconnect_cpu.as_secs_f64() * 1e3,
            o.reconnect_bytes as f64 / 1024.0,
            o.rss_kib as f64 / 1024.0,
        );
    }
    let ratio = |d: f64, s: f64| d / s;
    println!(
        "| delta / SotW | | {:.2} | | {:.3} | | | {:.2} | {:.4} | |",
        ratio(delta.cpu.as_secs_f64(), sotw.cpu.as_secs_f64()),
        ratio(delta.bytes as f64, sotw.bytes as f64),
        ratio(
            delta.reconnect_cpu.as_secs_f64(),
            sotw.reconnect_cpu.as_secs_f64()
        ),
        ratio(delta.reconnect_bytes as f64, sotw.reconnect_bytes as f64),
    );
}
