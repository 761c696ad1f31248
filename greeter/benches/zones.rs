//! Zones benchmark: the share of calls kept in the caller's zone, and the
//! latency, with lb-client's zone-aware routing on and off, side by side in
//! one run.
//!
//! Four greeter-server processes, two in zone `a` and two in zone `b`
//! (lb-server's file source lists their zones). A cross-zone network hop is
//! emulated on loopback: each backend runs with `--zone Z
//! --cross-zone-delay-us N` and delays (by a timer, not CPU) every call whose
//! `x-client-zone` metadata names another zone; the benchmark's clients set
//! that metadata to their zone in both modes. Two clients run at once, one
//! per zone, each at the same open-loop rate (calls arrive at a fixed rate
//! whatever is in flight):
//!
//! - on: each client's lb-client channel has `.zone(..)`, so lb-server sends
//!   it its zone's shares (equal capacity and equal clients per zone: all
//!   local);
//! - off: channels without a zone: round-robin over all four backends.
//!
//! Run: `cargo bench -p greeter --bench zones`. `ZONES_DELAY_US` sets the
//! cross-zone delay (default 1000: 1 ms), `ZONES_RATE` each client's calls
//! per second (default 1000), `ZONES_SECONDS` the seconds per mode and round
//! (default 6).

use std::time::{Duration, Instant};

use greeter::load::Summary;
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
};

mod support;
use greeter::load::open_loop;
use support::{load_average, start_backend};

const TARGET: &str = "greeter.default:grpc";
const ROUNDS: usize = 2;
const ZONES: [&str; 2] = ["a", "b"];

/// Adds the caller's zone to every call, as the emulated network needs it.
#[derive(Clone)]
struct ZoneHeader(&'static str);

impl Interceptor for ZoneHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(
            greeter::server::CLIENT_ZONE_HEADER,
            MetadataValue::from_static(self.0),
        );
        Ok(request)
    }
}

type Client = GreeterClient<InterceptedService<lb_client::Channel, ZoneHeader>>;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let delay_us: u64 = env_or("ZONES_DELAY_US", 1_000);
    let rate: f64 = env_or("ZONES_RATE", 1_000.0);
    let seconds = Duration::from_secs(env_or("ZONES_SECONDS", 6));
    println!("load average before: {}", load_average());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let delay = delay_us.to_string();
        let mut procs = Vec::new();
        let mut yaml = format!("services:\n  {TARGET}:\n");
        for name in ["a1", "a2", "b1", "b2"] {
            let zone = &name[..1];
            let (proc, addr) = start_backend(
                name,
                &[
                    "--zone".as_ref(),
                    zone.as_ref(),
                    "--cross-zone-delay-us".as_ref(),
                    delay.as_ref(),
                ],
            );
            procs.push(proc);
            yaml += &format!("    - address: {addr}\n      pod: {name}\n      zone: {zone}\n");
        }
        let file = dir.path().join("lb.yaml");
        std::fs::write(&file, yaml).unwrap();
        let lb = LbServer::bind(Config::for_file(&file)).await.unwrap();
        let lb_url = format!("http://{}", lb.grpc_addr());
        let stop = CancellationToken::new();
        let lb_stop = stop.clone();
        let lb_task = tokio::spawn(lb.run(async move { lb_stop.cancelled().await }));

        // Each mode: one channel per zone, with or without `.zone(..)`.
        let mut modes: Vec<(&str, Vec<(lb_client::Channel, Client)>)> = Vec::new();
        for aware in [true, false] {
            let mut clients = Vec::new();
            for zone in ZONES {
                let mut builder = lb_client::Channel::builder(TARGET).lb(&lb_url);
                builder = builder.zone(if aware { zone } else { "" });
                let channel = builder.connect().await.unwrap();
                let client = GreeterClient::new(InterceptedService::new(channel.clone(), ZoneHeader(zone)));
                clients.push((channel, client));
            }
            modes.push((if aware { "on" } else { "off" }, clients));
        }
        // lb-server sends shares once it knows both zones' clients.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !modes[0].1.iter().all(|(c, _)| !c.zone_shares().is_empty()) {
            assert!(Instant::now() < deadline, "no zone shares arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // results[mode][zone] per round.
        let mut results: Vec<Vec<Vec<Summary>>> = vec![vec![Vec::new(); 2]; 2];
        for _ in 0..ROUNDS {
            for (m, (_, clients)) in modes.iter().enumerate() {
                let both = |secs: Duration| {
                    futures::future::join_all(
                        clients.iter().map(|(_, client)| open_loop(client.clone(), rate, secs)),
                    )
                };
                both(Duration::from_secs(1)).await;
                for (z, summary) in both(seconds).await.into_iter().enumerate() {
                    results[m][z].push(summary);
                }
            }
        }

        for (mode, clients) in &modes {
            for ((channel, _), zone) in clients.iter().zip(ZONES) {
                println!(
                    "zone-aware {mode}, client in zone {zone}: zone shares at the end {:?}",
                    channel.zone_shares()
                );
            }
        }
        println!(
            "\nzones: 4 greeter-server processes (2 in zone a, 2 in b), cross-zone hop emulated as a {delay_us} µs delay; one client per zone, each {rate:.0} calls/s open loop for {} s per mode and round, {ROUNDS} rounds\n",
            seconds.as_secs()
        );
        println!("| zone-aware routing | client zone | calls kept local | calls/s | p50 ms | p99 ms | failed |");
        println!("|---|---|---:|---:|---:|---:|---:|");
        let mut p99s = [0.0f64; 2];
        let mut local_shares = [0.0f64; 2];
        for (m, (mode, _)) in modes.iter().enumerate() {
            let mut local_all = 0;
            let mut ok_all = 0;
            for (z, zone) in ZONES.iter().enumerate() {
                let runs = &results[m][z];
                let ok: u64 = runs.iter().map(|s| s.ok).sum();
                let local: u64 = runs
                    .iter()
                    .flat_map(|s| s.backends.iter())
                    .filter(|(b, _)| b.starts_with(zone))
                    .map(|(_, n)| n)
                    .sum();
                local_all += local;
                ok_all += ok;
                let calls: u64 = runs.iter().map(|s| s.calls).sum();
                let secs: f64 = runs.iter().map(|s| s.elapsed_s).sum();
                let p99 = median(runs.iter().map(|s| s.latency_ms.p99).collect());
                p99s[m] = p99s[m].max(p99);
                println!(
                    "| {mode} | {zone} | {:.1}% | {:.0} | {:.3} | {:.3} | {} |",
                    100.0 * local as f64 / ok.max(1) as f64,
                    calls as f64 / secs,
                    median(runs.iter().map(|s| s.latency_ms.p50).collect()),
                    p99,
                    calls - ok
                );
            }
            local_shares[m] = local_all as f64 / ok_all.max(1) as f64;
        }
        println!(
            "\nkept local: {:.1}% with zone-aware routing, {:.1}% without; worse client's p99 {:.3} ms vs {:.3} ms",
            local_shares[0] * 100.0,
            local_shares[1] * 100.0,
            p99s[0],
            p99s[1]
        );
        stop.cancel();
        let _ = lb_task.await;
    });
    drop(runtime);
    println!("load average after: {}", load_average());
}
