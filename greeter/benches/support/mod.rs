//! What the client benchmarks share: greeter-server and Envoy as child
//! processes, the measured load, and how rounds of one transport combine
//! into one row. `client.rs` (plaintext transports) and `client_tls.rs`
//! (lb-client over mTLS against Envoy terminating and originating TLS) use
//! it, so both measure the same load the same way; `skew.rs` and `zones.rs`
//! add an open-loop load (calls at a fixed rate) for balancers compared on
//! latency.

// Each benchmark uses a part of what is here.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use greeter::load::{self, Summary, Tally};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio_util::sync::CancellationToken;

/// Calls in flight at once, for every transport.
pub(crate) const CONCURRENCY: usize = 10;
/// Rounds in which the transports take turns.
pub(crate) const ROUNDS: u64 = 3;

/// A child process, killed on drop.
pub(crate) struct Proc(Child);

impl Proc {
    /// Its CPU time so far (user + system, all its threads).
    pub(crate) fn cpu_time(&self) -> Duration {
        process_cpu_time(&self.0.id().to_string())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a greeter-server named `name` on a loopback port with `extra`
/// flags (e.g. `--tls-cert`) and returns it with its address.
pub(crate) fn start_backend(name: &str, extra: &[&std::ffi::OsStr]) -> (Proc, SocketAddr) {
    start_backend_with(name, extra, &[])
}

/// [`start_backend`] with environment variables `envs` (e.g.
/// `TOKIO_WORKER_THREADS=1`: one worker thread, so a backend serves one call
/// at a time and its capacity is one over its service time).
pub(crate) fn start_backend_with(
    name: &str,
    extra: &[&std::ffi::OsStr],
    envs: &[(&str, &str)],
) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
        .args(["--listen", "127.0.0.1:0", "--name", name])
        .args(extra)
        .envs(envs.iter().copied())
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

/// `ENVOY_BIN`, or the venv's Envoy (`scripts/test.sh` installs it).
pub(crate) fn envoy_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return Some(bin.into());
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    venv.exists().then_some(venv)
}

/// The files of an Envoy that serves mTLS to its clients and calls its
/// backends with mTLS, as a TLS-terminating and -originating proxy does.
pub(crate) struct EnvoyTls<'a> {
    /// The CA that signs every certificate here: clients' and backends'.
    pub(crate) ca: &'a Path,
    /// Envoy's own certificate and key, served to clients and presented to backends.
    pub(crate) cert: &'a Path,
    /// The key of `cert`.
    pub(crate) key: &'a Path,
    /// The name the backends' certificates carry (SNI and the checked SAN).
    pub(crate) backend_name: &'a str,
}

/// Envoy as a round-robin HTTP/2 proxy over `backends`, with TLS on both
/// sides when `tls` is set; its config goes to `dir/NAME.yaml`.
pub(crate) fn start_envoy(
    binary: &Path,
    name: &str,
    backends: &[SocketAddr],
    dir: &Path,
    tls: Option<&EnvoyTls<'_>>,
) -> (Proc, SocketAddr) {
    start_envoy_with(binary, name, backends, dir, tls, "ROUND_ROBIN")
}

/// [`start_envoy`] with the cluster's `lb_policy` (e.g. `LEAST_REQUEST`).
pub(crate) fn start_envoy_with(
    binary: &Path,
    name: &str,
    backends: &[SocketAddr],
    dir: &Path,
    tls: Option<&EnvoyTls<'_>>,
    lb_policy: &str,
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
    let (downstream_tls, upstream_tls) = match tls {
        Some(tls) => {
            let (cert, key, ca) = (tls.cert.display(), tls.key.display(), tls.ca.display());
            (
                format!(
                    r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["h2"]
            tls_certificates:
            - certificate_chain: {{filename: "{cert}"}}
              private_key: {{filename: "{key}"}}
            validation_context:
              trusted_ca: {{filename: "{ca}"}}"#
                ),
                format!(
                    r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {name}
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{filename: "{cert}"}}
            private_key: {{filename: "{key}"}}
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: {name}}}"#,
                    name = tls.backend_name
                ),
            )
        }
        None => (String::new(), String::new()),
    };
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
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router{downstream_tls}
  clusters:
  - name: greeter
    type: STATIC
    lb_policy: {lb_policy}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}{upstream_tls}
    load_assignment:
      cluster_name: greeter
      endpoints:
      - lb_endpoints:
{endpoints}"#
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    // Each Envoy on the machine needs a base id of its own (shared memory).
    let base_id = std::process::id() * 10 + u32::from(tls.is_some());
    let child = Command::new(binary)
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "2", "--log-level", "error", "--base-id"])
        .arg(base_id.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("envoy starts");
    (Proc(child), ([127, 0, 0, 1], port).into())
}

/// Waits until something listens on `addr`.
pub(crate) async fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    process_cpu_time("self")
}

/// The user + system CPU time of process `pid` (a number, or `self`), all
/// its threads, from `/proc/PID/stat` (in clock ticks of 10 ms).
fn process_cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

/// One transport's result.
pub(crate) struct Row {
    /// The transport.
    pub(crate) name: &'static str,
    /// Throughput and latency.
    pub(crate) summary: Summary,
    /// The benchmark process's CPU time per call.
    pub(crate) cpu_per_call: Duration,
    /// The CPU time per call of the processes that serve the calls (the
    /// backends, and a proxy in between), when they were measured.
    pub(crate) servers_cpu_per_call: Option<Duration>,
}

/// Warms `client` up, then makes `calls` calls at [`CONCURRENCY`].
pub(crate) async fn measure<T>(name: &'static str, client: GreeterClient<T>, calls: u64) -> Row
where
    T: greeter::load::Transport,
{
    measure_with(name, client, 5_000, calls).await
}

/// [`measure`], also counting the CPU time of `servers` (the processes that
/// serve the calls: backends, and a proxy in between), which share the
/// machine with the client: on one machine, calls/s is bounded by the
/// cores over the client's and the servers' CPU time per call together.
pub(crate) async fn measure_servers<T>(
    name: &'static str,
    client: GreeterClient<T>,
    calls: u64,
    servers: &[&Proc],
) -> Row
where
    T: greeter::load::Transport,
{
    measure_inner(name, client, 5_000, calls, servers).await
}

/// [`measure`] with `warm` warm-up calls.
pub(crate) async fn measure_with<T>(
    name: &'static str,
    client: GreeterClient<T>,
    warm: u64,
    calls: u64,
) -> Row
where
    T: greeter::load::Transport,
{
    measure_inner(name, client, warm, calls, &[]).await
}

/// [`measure_with`], counting the CPU time of `servers` too if any.
async fn measure_inner<T>(
    name: &'static str,
    client: GreeterClient<T>,
    warm: u64,
    calls: u64,
    servers: &[&Proc],
) -> Row
where
    T: greeter::load::Transport,
{
    let servers_cpu = || servers.iter().map(|p| p.cpu_time()).sum::<Duration>();
    // Warm up: connections, HTTP/2 windows, latency estimates.
    let tally = Tally::new(CONCURRENCY);
    load::run(
        client.clone(),
        Some(warm),
        CONCURRENCY,
        tally,
        CancellationToken::new(),
    )
    .await;
    let tally = Tally::new(CONCURRENCY);
    let cpu = cpu_time();
    let before = servers_cpu();
    load::run(
        client,
        Some(calls),
        CONCURRENCY,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let cpu = cpu_time() - cpu;
    let servers_cpu = servers_cpu() - before;
    let summary = tally.summary();
    assert_eq!(summary.ok, calls, "{name}: {:?}", summary.errors);
    Row {
        name,
        cpu_per_call: cpu / calls as u32,
        servers_cpu_per_call: (!servers.is_empty()).then(|| servers_cpu / calls as u32),
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
    let servers_cpu: Option<Duration> = rounds
        .iter()
        .map(|r| Some(r.servers_cpu_per_call? * r.summary.calls as u32))
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
        servers_cpu_per_call: servers_cpu.map(|cpu| cpu / calls as u32),
    }
}

/// Combines `runs` (one `Vec<Row>` per round, transports in the same
/// order) and prints them as a table, with throughput relative to row
/// `baseline`, headed `vs LABEL`. When every row measured its servers'
/// CPU time too ([`measure_servers`]), two more columns show it and the
/// client's and servers' together.
pub(crate) fn table(runs: &[Vec<Row>], baseline: usize, label: &str) -> Vec<Row> {
    let rows: Vec<Row> = (0..runs[0].len())
        .map(|i| combine(runs.iter().map(|r| &r[i]).collect()))
        .collect();
    let base = rows[baseline].summary.rps;
    let servers = rows.iter().all(|r| r.servers_cpu_per_call.is_some());
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    if servers {
        println!(
            "| transport | calls/s | vs {label} | p50 ms | p99 ms | client CPU µs/call | servers CPU µs/call | client + servers CPU µs/call |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("| transport | calls/s | vs {label} | p50 ms | p99 ms | client CPU µs/call |");
        println!("|---|---:|---:|---:|---:|---:|");
    }
    for row in &rows {
        let mut line = format!(
            "| {} | {:.0} | {:.2}× | {:.3} | {:.3} | {:.1} |",
            row.name,
            row.summary.rps,
            row.summary.rps / base,
            row.summary.latency_ms.p50,
            row.summary.latency_ms.p99,
            micros(row.cpu_per_call)
        );
        if let (true, Some(servers)) = (servers, row.servers_cpu_per_call) {
            line += &format!(
                " {:.1} | {:.1} |",
                micros(servers),
                micros(row.cpu_per_call + servers)
            );
        }
        println!("{line}");
    }
    rows
}

/// The calls per transport: `CLIENT_BENCH_CALLS`, default 200,000.
pub(crate) fn calls_per_transport() -> u64 {
    std::env::var("CLIENT_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// The load average over the last minute (`/proc/loadavg`), for a
/// benchmark to print before and after it runs: other work on the machine
/// shows in its numbers.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
