//! Fan-out benchmark: N subscribers, each on its own HTTP/2 connection as a
//! fleet of pods would be, then one endpoint change at a time: how long until
//! every subscriber has it, and the server's memory per idle subscriber.
//!
//! Run: `cargo bench -p lb-server --bench fanout` (optionally `-- 1000 10000`
//! for the subscriber counts, and `FANOUT_ROUNDS=5`). lb-server runs as its own
//! process (the release binary) so its RSS can be read from /proc.
//!
//! Protocols: `discovery` (the default: `lookaside.v1.Discovery/Watch`) and
//! `ads` (xDS: each subscriber asks for the target's Listener, Cluster and
//! ClusterLoadAssignment as a proxyless gRPC client does, ACKs every response,
//! and is timed on the EDS update). Name them among the arguments, e.g.
//! `-- ads 1000 10000` or `-- discovery ads 1000`; one table per protocol.
//!
//! Latency is measured from the moment the benchmark renames the new file into
//! place (lb-server sees it through its watch on the file's directory) to
//! when each subscriber's socket received it (the kernel's receive
//! timestamp, `SO_TIMESTAMPNS`), so it does not depend on when the
//! subscriber reads it.
//!
//! Reads: on one machine the subscribers' CPU comes out of the two cores the
//! server pushes from; in a cluster it is on other nodes. So by default the
//! Discovery subscribers' thread does not run for a while after each change
//! (`hold_for`: about three times what the fan-out needs) and then reads
//! everything; the table counts arrivals after the hold, when they did run
//! beside the server. ADS subscribers read live, as every ACK they send is
//! work the server does during the fan-out; so do subscribers on more than
//! one thread. `FANOUT_READS=live` makes Discovery subscribers read live too,
//! and the table then shows the p99 of when they read the change.
//!
//! Subscribers: by default each is a lean HTTP/2 client written for this
//! benchmark (`support/lean_client.rs`), all on one thread, so that on one
//! machine they leave the server as much of the CPU as they can.
//! `FANOUT_CLIENT=tonic` makes each a tonic client on its own hyper
//! connection instead, and `FANOUT_CLIENT_THREADS=N` gives them N threads, to
//! compare. The table shows the subscribers' CPU per push next to the server's.
//!
//! Transports: `plain` (the default) and `mtls`: lb-server serves mutual TLS
//! (`--tls-cert`, `--tls-key`, `--tls-client-ca`; ECDSA P-256 certificates
//! from one CA, made on the spot) and every subscriber, the lean client over
//! rustls, presents a client certificate. Name both, e.g.
//! `-- discovery 10000 plain mtls`, to run each count over each transport
//! in turn in one run (`FANOUT_REPEAT=N` repeats the turns); the table then
//! ends with the ratios of mTLS to plaintext.
//!
//! Connect storm: the N subscribers connect to a freshly started server as
//! after its restart, at most `FANOUT_CONNECTING` (default 256) connecting at
//! once. Each connects, does a full TLS handshake (the subscribers keep no
//! sessions to resume), opens its stream and waits for its first snapshot.
//! The table reports the rate at which they got there and the server's CPU
//! per connection.
//!
//! Churn (issue 14, `support/churn.rs`): `-- scale` compares full snapshots
//! with incremental updates in services of 10 to 5,000 endpoints, and
//! `-- restart` a rolling restart of a 1,000-pod service, with coalescing off
//! and on, over the file source and over the Kubernetes source (EndpointSlices
//! served by the API stand-in of `lookaside-tests`); see that module for what
//! they measure.
//!
//! `FANOUT_DIST=1` also prints more percentiles of both latencies, and each
//! change's percentiles with the server threads' time on a CPU and waiting
//! for one (their `schedstat`).
//! `FANOUT_PERF_CTL=FIFO` with `FANOUT_WRAPPER="perf record -D -1
//! --control=fifo:FIFO ..."` profiles the server over the changes only.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use envoy_types::pb::envoy::{
    config::{core::v3::Node, endpoint::v3::ClusterLoadAssignment},
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use lookaside_proto::lookaside::v1::WatchRequest;
use prost::Message;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;

const TARGET: &str = "bench.default:grpc";

#[path = "support/connection.rs"]
mod connection;
use connection::Connection;
#[path = "support/lean_client.rs"]
mod lean_client;
use lean_client::{LeanCall, LeanTls};
#[path = "support/churn.rs"]
mod churn;
#[path = "support/server.rs"]
mod server;
use server::{ServerProcess, process_cpu};

const WATCH_PATH: &str = "/lookaside.v1.Discovery/Watch";
const ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

fn file_with(endpoints: usize) -> String {
    let mut yaml = format!("services:\n  {TARGET}:\n");
    for i in 0..endpoints {
        yaml += &format!(
            "    - address: 10.0.{}.{}:8080\n      zone: zone-{}\n",
            i / 250,
            i % 250,
            i % 3
        );
    }
    yaml
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How the subscribers reach lb-server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Plain,
    /// Mutual TLS: lb-server requires a client certificate.
    Mtls,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plaintext",
            Self::Mtls => "mTLS",
        }
    }
}

/// A CA, lb-server's certificate and the subscribers' (one for all of them),
/// in a directory of their own.
struct Certs {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    server: (std::path::PathBuf, std::path::PathBuf),
    /// The subscribers' configuration: trusts the CA, presents the client
    /// certificate, resumes no session (every connection a full handshake).
    client: LeanTls,
}

impl Certs {
    fn new() -> Self {
        use lookaside_tls::generate::Ca;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("fanout-bench-ca").unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, ca.cert()).unwrap();
        let server = ca
            .issue(&["127.0.0.1"])
            .unwrap()
            .write(dir.path(), "server")
            .unwrap();
        let client = ca
            .issue(&["fanout-subscriber"])
            .unwrap()
            .write(dir.path(), "client")
            .unwrap();
        let mut config = lookaside_tls::ClientFiles {
            roots: lookaside_tls::Roots::File(ca_path.clone()),
            identity: Some(client),
        }
        .load()
        .unwrap();
        config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
        let name = std::net::IpAddr::from([127, 0, 0, 1]).into();
        Self {
            _dir: dir,
            ca: ca_path,
            server,
            client: LeanTls::new(config, name),
        }
    }
}

/// lb-server on `file`, with its defaults and `extra` flags, serving mTLS
/// with `tls`. FANOUT_WRAPPER runs it under a tool, e.g.
/// `valgrind --tool=dhat` to see where its memory goes.
fn start_server(file: &Path, tls: Option<&Certs>, extra: &[&str]) -> ServerProcess {
    let mut command = server_command();
    if let Some(certs) = tls {
        command
            .arg("--tls-cert")
            .arg(&certs.server.0)
            .arg("--tls-key")
            .arg(&certs.server.1)
            .arg("--tls-client-ca")
            .arg(&certs.ca);
    }
    ServerProcess::start(command, file, extra)
}

/// lb-server on its kube source, reading the API server named by the
/// kubeconfig at `kubeconfig`, with its defaults and `extra` flags.
fn start_kube_server(kubeconfig: &Path, extra: &[&str]) -> ServerProcess {
    let mut command = server_command();
    command
        .env("KUBECONFIG", kubeconfig)
        .args(["--source", "kube"]);
    ServerProcess::start_on(command, extra)
}

/// The lb-server command, under FANOUT_WRAPPER's tool if it names one.
fn server_command() -> Command {
    let wrapper = std::env::var("FANOUT_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(tool) => {
            let mut command = Command::new(tool);
            command.args(words).arg(env!("CARGO_BIN_EXE_lb-server"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_lb-server")),
    };
    command.env("LB_LOG", "warn,lb_server=info");
    command
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which API the subscribers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Discovery,
    Ads,
}

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Where subscribers note when they saw the change of the current round:
/// one slot each, and one wake-up for the benchmark when the last one has
/// it, so that timing 10,000 subscribers costs them no channel traffic.
struct Tally {
    base: Instant,
    /// The wall-clock time at `base`: kernel receive timestamps are wall-clock.
    base_wall: SystemTime,
    /// The endpoint count of the current round's change.
    awaited: AtomicUsize,
    /// Subscribers still to see it.
    remaining: AtomicUsize,
    /// When each subscriber's socket received it, in nanoseconds since `base`.
    arrived_at: Vec<AtomicU64>,
    /// When each subscriber read it, in nanoseconds since `base`.
    read_at: Vec<AtomicU64>,
    /// HTTP/2 bytes the subscribers received after their first snapshot.
    bytes: AtomicU64,
    done: Notify,
}

impl Tally {
    fn new(subscribers: usize) -> Self {
        let slots = || (0..subscribers).map(|_| AtomicU64::new(0)).collect();
        Self {
            base: Instant::now(),
            base_wall: SystemTime::now(),
            awaited: AtomicUsize::new(usize::MAX),
            remaining: AtomicUsize::new(0),
            arrived_at: slots(),
            read_at: slots(),
            bytes: AtomicU64::new(0),
            done: Notify::new(),
        }
    }

    /// Subscriber `id` read a list of `count` endpoints at `read`; its
    /// socket received it at `arrived` (the kernel's timestamp), if known.
    fn saw(&self, id: usize, count: usize, read: Instant, arrived: Option<SystemTime>) {
        if count == self.awaited.load(Ordering::Acquire) {
            let read = (read - self.base).as_nanos() as u64;
            let arrived = arrived
                .and_then(|at| at.duration_since(self.base_wall).ok())
                .map_or(read, |at| at.as_nanos() as u64);
            self.read_at[id].store(read, Ordering::Relaxed);
            self.arrived_at[id].store(arrived, Ordering::Relaxed);
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.done.notify_one();
            }
        }
    }

    /// Starts a round that waits for `count` endpoints.
    fn expect(&self, count: usize) {
        self.remaining.store(self.read_at.len(), Ordering::Release);
        self.awaited.store(count, Ordering::Release);
    }

    /// Each subscriber's latency from `started` to its socket receiving the
    /// change, and to its reading it.
    fn latencies(&self, started: Instant) -> (Vec<Duration>, Vec<Duration>) {
        let started = (started - self.base).as_nanos() as u64;
        let since = |slots: &[AtomicU64]| {
            slots
                .iter()
                .map(|at| Duration::from_nanos(at.load(Ordering::Relaxed).saturating_sub(started)))
                .collect()
        };
        (since(&self.arrived_at), since(&self.read_at))
    }
}

/// `lookaside.v1.WatchResponse` with its endpoints left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct WatchResponseLite {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(bool, tag = "2")]
    exists: bool,
    /// Whole (a full snapshot), or added and changed (a diff).
    #[prost(bytes = "bytes", repeated, tag = "3")]
    endpoints: Vec<bytes::Bytes>,
    /// A diff from `base_version` rather than a full snapshot.
    #[prost(bool, tag = "5")]
    incremental: bool,
    #[prost(uint64, tag = "6")]
    base_version: u64,
    /// The endpoints a diff removes (`EndpointKey`s, left encoded).
    #[prost(bytes = "bytes", repeated, tag = "7")]
    removed: Vec<bytes::Bytes>,
}

/// `envoy.service.discovery.v3.DiscoveryResponse` with its resources left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct DiscoveryResponseLite {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, repeated, tag = "2")]
    resources: Vec<AnyLite>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// `google.protobuf.Any`, its value only.
#[derive(Clone, PartialEq, prost::Message)]
struct AnyLite {
    #[prost(bytes = "bytes", tag = "2")]
    value: bytes::Bytes,
}

/// `ClusterLoadAssignment` down to its localities' endpoints, left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct AssignmentLite {
    #[prost(message, repeated, tag = "2")]
    endpoints: Vec<LocalityLite>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LocalityLite {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    lb_endpoints: Vec<bytes::Bytes>,
}

/// Which client each subscriber is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// `support/lean_client.rs`: one task, one socket, no HTTP/2 library.
    Lean,
    /// tonic over its own hyper HTTP/2 connection.
    Tonic,
}

/// A lean Discovery subscriber: reports the endpoint count of every update,
/// and the bytes it received. With `incremental` it asks for diffs and
/// counts from them: the changes these rounds make only add endpoints, so a
/// diff's endpoints are all new ones (the restart benchmark's subscribers,
/// in `churn.rs`, hold the whole list instead).
async fn lean_discovery_subscriber(
    addr: SocketAddr,
    tls: Option<LeanTls>,
    id: usize,
    incremental: bool,
    ready: impl FnOnce(),
    seen: Arc<Tally>,
) {
    let request = WatchRequest {
        target: TARGET.into(),
        incremental,
        ..Default::default()
    };
    let mut call = LeanCall::start(addr, tls.as_ref(), WATCH_PATH, &request, false)
        .await
        .unwrap();
    let first = call.next().await.unwrap().expect("the first snapshot");
    let mut count = WatchResponseLite::decode(first).unwrap().endpoints.len();
    let mut received = call.received();
    ready();
    while let Ok(Some(message)) = call.next().await {
        let update = WatchResponseLite::decode(message).unwrap();
        count = if update.incremental {
            count + update.endpoints.len() - update.removed.len()
        } else {
            update.endpoints.len()
        };
        seen.bytes
            .fetch_add(call.received() - received, Ordering::Relaxed);
        received = call.received();
        seen.saw(id, count, Instant::now(), call.arrived());
    }
}

/// A lean ADS subscriber, shaped like [`ads_subscriber`].
async fn lean_ads_subscriber(
    addr: SocketAddr,
    tls: Option<LeanTls>,
    id: usize,
    ready: impl FnOnce(),
    seen: Arc<Tally>,
) {
    let node = Node {
        id: format!("bench-{id}"),
        ..Node::default()
    };
    let first = ads_request(LDS, "", "", Some(node));
    let mut call = LeanCall::start(addr, tls.as_ref(), ADS_PATH, &first, true)
        .await
        .unwrap();
    for type_url in [CDS, EDS] {
        call.send(&ads_request(type_url, "", "", None))
            .await
            .unwrap();
    }
    let mut ready = Some(ready);
    while let Ok(Some(message)) = call.next().await {
        let (at, arrived) = (Instant::now(), call.arrived());
        let response = DiscoveryResponseLite::decode(message).unwrap();
        let ack = ads_request(
            &response.type_url,
            &response.version_info,
            &response.nonce,
            None,
        );
        if call.send(&ack).await.is_err() {
            return;
        }
        if response.type_url != EDS {
            continue;
        }
        let Some(any) = response.resources.first() else {
            continue;
        };
        let assignment = AssignmentLite::decode(any.value.clone()).unwrap();
        let count = assignment
            .endpoints
            .iter()
            .map(|l| l.lb_endpoints.len())
            .sum();
        match ready.take() {
            Some(ready) => ready(),
            None => {
                seen.saw(id, count, at, arrived);
            }
        }
    }
}

/// One Discovery subscriber: reports the endpoint count of every update.
async fn discovery_subscriber(
    (channel, origin): (Connection, http::Uri),
    id: usize,
    ready: impl FnOnce(),
    seen: Arc<Tally>,
) {
    // Decoded as `WatchResponseLite`: the same wire message, endpoints kept as
    // undecoded bytes, so the client side of this one-machine benchmark does
    // not spend the CPU the server needs on strings it never reads.
    let mut grpc = tonic::client::Grpc::with_origin(channel, origin);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<WatchRequest, WatchResponseLite>::default();
    let path = http::uri::PathAndQuery::from_static("/lookaside.v1.Discovery/Watch");
    let request = tonic::Request::new(WatchRequest {
        target: TARGET.into(),
        ..Default::default()
    });
    let mut stream = grpc
        .server_streaming(request, path, codec)
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    ready();
    while let Ok(Some(update)) = stream.message().await {
        seen.saw(id, update.endpoints.len(), Instant::now(), None);
    }
}

/// A request for the target's resource of one type; with the version and
/// nonce of a response, its ACK.
fn ads_request(type_url: &str, version: &str, nonce: &str, node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: vec![TARGET.into()],
        version_info: version.into(),
        response_nonce: nonce.into(),
        node,
        ..DiscoveryRequest::default()
    }
}

/// One ADS subscriber shaped like a proxyless gRPC client: LDS, CDS and EDS
/// for the target, every response ACKed; reports the endpoint count of every
/// EDS update after the first.
async fn ads_subscriber(
    (channel, origin): (Connection, http::Uri),
    id: usize,
    ready: impl FnOnce(),
    seen: Arc<Tally>,
) {
    let (tx, requests) = mpsc::unbounded_channel();
    let node = Node {
        id: format!("bench-{id}"),
        ..Node::default()
    };
    for (i, type_url) in [LDS, CDS, EDS].into_iter().enumerate() {
        let node = (i == 0).then(|| node.clone());
        tx.send(ads_request(type_url, "", "", node)).unwrap();
    }
    let mut stream = AggregatedDiscoveryServiceClient::with_origin(channel, origin)
        .stream_aggregated_resources(UnboundedReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let mut ready = Some(ready);
    while let Ok(Some(response)) = stream.message().await {
        let at = Instant::now();
        let _ = tx.send(ads_request(
            &response.type_url,
            &response.version_info,
            &response.nonce,
            None,
        ));
        if response.type_url != EDS {
            continue;
        }
        let Some(any) = response.resources.first() else {
            continue;
        };
        let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
        let count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
        match ready.take() {
            Some(ready) => ready(),
            None => {
                seen.saw(id, count, at, None);
            }
        }
    }
}

/// With `FANOUT_PERF_CTL=FIFO`, tells `perf record --control=fifo:FIFO -D -1`
/// (as FANOUT_WRAPPER) to sample only while the changes are pushed, not while
/// the subscribers connect.
fn perf_control(command: &str) {
    if let Ok(fifo) = std::env::var("FANOUT_PERF_CTL") {
        std::fs::write(fifo, format!("{command}\n")).expect("perf control FIFO");
    }
}

struct Row {
    transport: Transport,
    service: Service,
    subscribers: usize,
    /// HTTP/2 bytes each subscriber received per change.
    bytes_per_push: f64,
    /// With [`Service::source_cost`]: the server's CPU per change with one
    /// subscriber (reading the file, publishing, one push).
    source_cpu_per_change: Option<Duration>,
    /// The server's CPU per change over the rounds.
    server_cpu_per_change: Duration,
    server_cpu_per_push: Duration,
    subscriber_cpu_per_push: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// p99 of the time until the subscriber's thread read the change, when
    /// it read live.
    p99_read: Option<Duration>,
    /// With held reads, how many arrivals came after the hold (the server
    /// had not finished by then, and the subscribers ran beside it).
    after_hold: Option<usize>,
    kib_per_subscriber: f64,
    storm: Storm,
}

/// How the N subscribers connected to the fresh server (the connect storm).
#[derive(Debug, Clone, Copy)]
struct Storm {
    /// Subscribers that got their first snapshot per second, from the first
    /// connect to the last first snapshot.
    per_second: f64,
    /// The server's CPU time over the storm, per subscriber.
    server_cpu: Duration,
    /// The subscribers' CPU time (this process) over the storm, per subscriber.
    client_cpu: Duration,
    /// Connections whose handshake the kernel dropped because the server's
    /// accept queue was full (machine-wide `ListenOverflows`); each such
    /// client retries after a second.
    listen_overflows: u64,
}

/// The machine's count of connections dropped on a full accept queue
/// (`TcpExt: ListenOverflows` in /proc/net/netstat).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if names.starts_with("TcpExt:") {
            return names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "ListenOverflows")
                .and_then(|(_, value)| value.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// How the subscribers read during a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// They read as soon as their sockets have data, on the cores the server
    /// is pushing from.
    Live,
    /// Their thread does not run for this long after each change, then reads
    /// everything; the kernel's receive timestamps are the same either way.
    Held(Duration),
}

/// The service the rounds change, and how subscribers watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Service {
    /// Its endpoints before the first round (each round adds one).
    endpoints: usize,
    /// The subscribers ask for diffs.
    incremental: bool,
    /// Before the N subscribers connect, the same changes with one
    /// subscriber: what a change costs the server besides its pushes.
    source_cost: bool,
}

impl Service {
    /// The fan-out benchmark's own: 10 endpoints, full snapshots.
    const FANOUT: Self = Self {
        endpoints: 10,
        incremental: false,
        source_cost: false,
    };
}

/// How long held subscribers leave the cores to the server after a change:
/// about three times what the server needs for the whole fan-out.
fn hold_for(subscribers: usize) -> Duration {
    Duration::from_millis(30) + Duration::from_micros(20) * subscribers as u32
}

fn run(
    runtime: &tokio::runtime::Runtime,
    protocol: Protocol,
    client: Client,
    (transport, certs): (Transport, Option<&Certs>),
    (subscribers, rounds, reads): (usize, usize, Reads),
    service: Service,
) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    let mut endpoints = service.endpoints;
    write_atomic(&file, &file_with(endpoints));
    let tls = certs.map(|certs| certs.client.clone());
    let server = start_server(&file, certs, &[]);
    let source_cpu_per_change = service.source_cost.then(|| {
        runtime.block_on(source_cost(
            &server,
            &file,
            &mut endpoints,
            rounds,
            service.incremental,
        ))
    });
    let tally = Arc::new(Tally::new(subscribers));
    let (warm, kib_per_subscriber, storm) = runtime.block_on(subscribe(
        &server,
        protocol,
        client,
        tls,
        service.incremental,
        tally.clone(),
    ));

    let mut latencies = Vec::with_capacity(subscribers * rounds);
    let mut read_latencies = Vec::with_capacity(subscribers * rounds);
    let mut after_hold = 0;
    let dist = std::env::var("FANOUT_DIST").is_ok();
    perf_control("enable");
    let cpu_before = server.cpu();
    let own_cpu_before = process_cpu(std::process::id());
    for _ in 0..rounds {
        endpoints += 1;
        tally.expect(endpoints);
        let threads_before = if dist { server.threads() } else { Vec::new() };
        let started = Instant::now();
        write_atomic(&file, &file_with(endpoints));
        // The subscribers' runtime has one thread and runs only inside
        // `block_on`: while this thread sleeps, none of them runs.
        if let Reads::Held(hold) = reads {
            std::thread::sleep(hold);
        }
        let held_until = Instant::now() - started;
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), tally.done.notified())
                .await
                .expect("every subscriber gets the change within 30 s");
        });
        let (arrived, read) = tally.latencies(started);
        if dist {
            let mut round = arrived.clone();
            round.sort();
            let threads: Vec<String> = server
                .threads()
                .iter()
                .filter_map(|(name, run, wait)| {
                    let (_, run_before, wait_before) =
                        threads_before.iter().find(|(n, _, _)| n == name)?;
                    let run = ms(*run - *run_before);
                    (run >= 0.1).then(|| {
                        format!("{name} run={run:.1} wait={:.1}", ms(*wait - *wait_before))
                    })
                })
                .collect();
            eprintln!(
                "ROUND {subscribers}: p50={:.2} p99={:.2} max={:.2} | {}",
                ms(percentile(&round, 0.5)),
                ms(percentile(&round, 0.99)),
                ms(*round.last().unwrap()),
                threads.join(", ")
            );
        }
        if reads != Reads::Live {
            after_hold += arrived.iter().filter(|at| **at > held_until).count();
        }
        latencies.extend(arrived);
        read_latencies.extend(read);
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    }
    // The server is idle between changes, so its CPU time over the rounds is
    // the cost of the pushes (and of reading ACKs, for ADS).
    perf_control("disable");
    let pushes = (subscribers * rounds) as u32;
    let server_cpu = server.cpu() - cpu_before;
    let server_cpu_per_push = server_cpu / pushes;
    let bytes_per_push = tally.bytes.load(Ordering::Relaxed) as f64 / f64::from(pushes);
    let subscriber_cpu_per_push = (process_cpu(std::process::id()) - own_cpu_before) / pushes;
    latencies.sort();
    read_latencies.sort();
    if dist {
        for (what, sorted) in [("arrived", &latencies), ("read", &read_latencies)] {
            let ps = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99];
            let text: Vec<String> = ps
                .iter()
                .map(|p| format!("p{}={:.2}", p * 100.0, ms(percentile(sorted, *p))))
                .collect();
            eprintln!("DIST {what} {subscribers}: {}", text.join(" "));
        }
    }
    runtime.block_on(async move { drop(warm) });
    Row {
        transport,
        service,
        subscribers,
        bytes_per_push,
        source_cpu_per_change,
        server_cpu_per_change: server_cpu / rounds as u32,
        server_cpu_per_push,
        subscriber_cpu_per_push,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: *latencies.last().unwrap(),
        p99_read: (reads == Reads::Live).then(|| percentile(&read_latencies, 0.99)),
        after_hold: (reads != Reads::Live).then_some(after_hold),
        kib_per_subscriber,
        storm,
    }
}

/// The server's CPU per change with one subscriber, over `rounds` changes
/// that each add an endpoint: reading the file, publishing, one push.
async fn source_cost(
    server: &ServerProcess,
    file: &Path,
    endpoints: &mut usize,
    rounds: usize,
    incremental: bool,
) -> Duration {
    let request = WatchRequest {
        target: TARGET.into(),
        incremental,
        ..Default::default()
    };
    let mut call = LeanCall::start(server.grpc, None, WATCH_PATH, &request, false)
        .await
        .unwrap();
    let first = call.next().await.unwrap().expect("the first snapshot");
    let mut count = WatchResponseLite::decode(first).unwrap().endpoints.len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = server.cpu();
    for _ in 0..rounds {
        *endpoints += 1;
        write_atomic(file, &file_with(*endpoints));
        while count != *endpoints {
            let message = call.next().await.unwrap().expect("an update");
            let update = WatchResponseLite::decode(message).unwrap();
            count = if update.incremental {
                count + update.endpoints.len() - update.removed.len()
            } else {
                update.endpoints.len()
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (server.cpu() - before) / rounds as u32
}

/// Warms the server up with one subscriber, then connects N more, each on
/// its own connection and reporting to `tally` when it sees the endpoint
/// count it waits for. Returns the warm-up call (kept open), the server's
/// RSS growth per idle subscriber, and how the N connected.
async fn subscribe(
    server: &ServerProcess,
    protocol: Protocol,
    client: Client,
    tls: Option<LeanTls>,
    incremental: bool,
    tally: Arc<Tally>,
) -> (LeanCall, f64, Storm) {
    let subscribers = tally.read_at.len();
    let request = WatchRequest {
        target: TARGET.into(),
        incremental,
        ..Default::default()
    };
    let mut warm = LeanCall::start(server.grpc, tls.as_ref(), WATCH_PATH, &request, false)
        .await
        .unwrap();
    warm.next().await.unwrap().expect("the first snapshot");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = server.rss_kib();

    let connecting_at_once = std::env::var("FANOUT_CONNECTING")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let connecting = Arc::new(Semaphore::new(connecting_at_once));
    let (cpu_before, own_cpu_before) = (server.cpu(), process_cpu(std::process::id()));
    let overflows_before = listen_overflows();
    let started = Instant::now();
    for id in 0..subscribers {
        let permit = connecting.clone().acquire_owned().await.unwrap();
        let seen = tally.clone();
        let ready_tx = ready_tx.clone();
        let addr = server.grpc;
        let tls = tls.clone();
        tokio::spawn(async move {
            let ready = move || {
                drop(permit);
                ready_tx.send(()).unwrap();
            };
            match (client, protocol) {
                (Client::Lean, Protocol::Discovery) => {
                    lean_discovery_subscriber(addr, tls, id, incremental, ready, seen).await
                }
                (Client::Lean, Protocol::Ads) => {
                    lean_ads_subscriber(addr, tls, id, ready, seen).await
                }
                (Client::Tonic, Protocol::Discovery) => {
                    discovery_subscriber(Connection::open(addr).await, id, ready, seen).await
                }
                (Client::Tonic, Protocol::Ads) => {
                    ads_subscriber(Connection::open(addr).await, id, ready, seen).await
                }
            }
        });
    }
    for _ in 0..subscribers {
        ready_rx.recv().await.unwrap();
    }
    let storm = Storm {
        per_second: subscribers as f64 / started.elapsed().as_secs_f64(),
        server_cpu: (server.cpu() - cpu_before) / subscribers as u32,
        client_cpu: (process_cpu(std::process::id()) - own_cpu_before) / subscribers as u32,
        listen_overflows: listen_overflows() - overflows_before,
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = server.rss_kib();
    let kib_per_subscriber = (rss_idle.saturating_sub(rss_before)) as f64 / subscribers as f64;
    (warm, kib_per_subscriber, storm)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "scale") {
        return churn::scale(&args);
    }
    if args.iter().any(|a| a == "restart") {
        return churn::restart(&args);
    }
    let counts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let mut protocols: Vec<Protocol> = args
        .iter()
        .filter_map(|a| match a.as_str() {
            "discovery" => Some(Protocol::Discovery),
            "ads" | "xds" => Some(Protocol::Ads),
            _ => None,
        })
        .collect();
    if protocols.is_empty() {
        protocols.push(Protocol::Discovery);
    }
    let mut transports: Vec<Transport> = args
        .iter()
        .filter_map(|a| match a.as_str() {
            "plain" | "plaintext" => Some(Transport::Plain),
            "mtls" => Some(Transport::Mtls),
            _ => None,
        })
        .collect();
    if transports.is_empty() {
        transports.push(Transport::Plain);
    }
    let repeat: usize = std::env::var("FANOUT_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let certs = transports.contains(&Transport::Mtls).then(Certs::new);
    let counts = if counts.is_empty() {
        vec![1_000, 10_000]
    } else {
        counts
    };
    let rounds: usize = std::env::var("FANOUT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    assert!(
        limit as usize > counts.iter().max().unwrap() + 100,
        "open-file limit {limit} is too low for the subscriber count"
    );
    let client = match std::env::var("FANOUT_CLIENT").as_deref() {
        Ok("tonic") => Client::Tonic,
        Ok("lean") | Err(_) => Client::Lean,
        Ok(other) => panic!("FANOUT_CLIENT is lean or tonic, not {other}"),
    };
    // The subscribers share one thread by default (FANOUT_CLIENT_THREADS=N
    // for more): on this machine one thread costs them the least CPU per
    // update, which leaves the most for the server being measured.
    let threads = std::env::var("FANOUT_CLIENT_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1);
    let runtime = match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
    }
    .enable_all()
    .build()
    .unwrap();
    let live = match std::env::var("FANOUT_READS").as_deref() {
        Ok("live") => true,
        Ok("held") | Err(_) => false,
        Ok(other) => panic!("FANOUT_READS is held or live, not {other}"),
    };
    assert!(
        client == Client::Lean || certs.is_none(),
        "FANOUT_CLIENT=tonic subscribers are plaintext only"
    );
    for protocol in protocols {
        // ADS subscribers answer every push with an ACK the server must read
        // during the fan-out, and a runtime on more threads cannot be held:
        // those read live.
        let held = !live && protocol == Protocol::Discovery && threads <= 1;
        // Each count over each transport in turn, `repeat` times.
        let mut rows: Vec<Row> = Vec::new();
        for &n in &counts {
            let reads = if held {
                Reads::Held(hold_for(n))
            } else {
                Reads::Live
            };
            for _ in 0..repeat {
                for &transport in &transports {
                    let tls = (transport == Transport::Mtls).then(|| certs.as_ref().unwrap());
                    rows.push(run(
                        &runtime,
                        protocol,
                        client,
                        (transport, tls),
                        (n, rounds, reads),
                        Service::FANOUT,
                    ));
                }
            }
        }
        let who = match protocol {
            Protocol::Discovery => "Discovery subscribers",
            Protocol::Ads => "xDS ADS subscribers (LDS+CDS+EDS, timed on EDS)",
        };
        let clients = match client {
            Client::Lean => "lean HTTP/2 clients",
            Client::Tonic => "tonic clients",
        };
        let reads = if held {
            "reads held during the fan-out"
        } else {
            "live reads"
        };
        let clients = format!("{clients} on {} thread(s), {reads}", threads.max(1));
        println!(
            "\nfan-out: one endpoint change to N {who}, each on its own connection ({clients}, {rounds} changes each)\n"
        );
        println!(
            "| transport | subscribers | p50 ms | p99 ms | max ms | p99 read ms | arrived after hold | server CPU µs / push | subscribers' CPU µs / push | server RSS KiB / idle subscriber | connect storm: subscribers / s | server CPU µs / connect | subscribers' CPU µs / connect | SYNs dropped (accept queue full) |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let dash = || "–".to_string();
        let micros = |d: Duration| d.as_secs_f64() * 1e6;
        for row in &rows {
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
                row.transport.name(),
                row.subscribers,
                ms(row.p50),
                ms(row.p99),
                ms(row.max),
                row.p99_read.map_or_else(dash, |d| format!("{:.2}", ms(d))),
                row.after_hold.map_or_else(dash, |n| n.to_string()),
                micros(row.server_cpu_per_push),
                micros(row.subscriber_cpu_per_push),
                row.kib_per_subscriber,
                row.storm.per_second,
                micros(row.storm.server_cpu),
                micros(row.storm.client_cpu),
                row.storm.listen_overflows,
            );
        }
        if transports.len() > 1 {
            print_tls_ratios(&rows, &counts);
        }
    }
}

/// mTLS against plaintext for each count: the medians of the runs of each.
fn print_tls_ratios(rows: &[Row], counts: &[usize]) {
    println!(
        "\n| subscribers | mTLS / plaintext: p99 | memory / idle subscriber | connect storm rate | server CPU / push |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for &n in counts {
        let median = |transport: Transport, f: &dyn Fn(&Row) -> f64| {
            let mut v: Vec<f64> = rows
                .iter()
                .filter(|r| r.subscribers == n && r.transport == transport)
                .map(f)
                .collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ratio =
            |f: &dyn Fn(&Row) -> f64| median(Transport::Mtls, f) / median(Transport::Plain, f);
        println!(
            "| {n} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            ratio(&|r| ms(r.p99)),
            ratio(&|r| r.kib_per_subscriber),
            ratio(&|r| r.storm.per_second),
            ratio(&|r| r.server_cpu_per_push.as_secs_f64()),
        );
    }
}
