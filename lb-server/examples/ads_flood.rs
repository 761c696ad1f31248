//! What one hostile ADS stream costs lb-server in CPU: it sends REQUESTS
//! EDS requests of NAMES resource names each as fast as the server takes
//! them, reading every response, and prints the server's CPU time and the
//! wall time. Two floods: the same names every time (an Envoy re-sending
//! its cluster list), and new names every time (each request replaces
//! every subscription).
//!
//! Run: `cargo run --release -p lb-server --example ads_flood -- 10000 1000 [same|new]`
//! (needs `cargo build --release --bin lb-server` first; `LB_SERVER=PATH` runs
//! another build). Requests past the stream's burst wait for its rate, so a
//! long flood measures the rate limit; a flood within the burst measures the
//! cost of a request.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[allow(dead_code)] // the memory readings are for the other tools
#[path = "../benches/support/server.rs"]
mod server;
use server::ServerProcess;

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// One flood on a fresh stream: (server CPU, wall time, responses read, how the stream ended).
async fn flood(
    server: &ServerProcess,
    requests: usize,
    names: usize,
    fresh: bool,
) -> (Duration, Duration, usize, String) {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reader = tokio::spawn(async move {
        let mut read = 0;
        // Every request names a new subscription, so each is owed one response.
        let end = loop {
            if read == requests {
                break "open".to_owned();
            }
            match responses.message().await {
                Ok(Some(_)) => read += 1,
                Ok(None) => break "ended OK".to_owned(),
                Err(status) => break format!("ended {:?}: {}", status.code(), status.message()),
            }
        };
        (read, end)
    });
    let cpu_before = server.cpu();
    let start = Instant::now();
    for i in 0..requests {
        let base = if fresh { i * names } else { 0 };
        let request = DiscoveryRequest {
            type_url: EDS.into(),
            resource_names: (base..base + names)
                .map(|n| format!("svc-{n}.flood:80"))
                .collect(),
            ..DiscoveryRequest::default()
        };
        if tx.send(request).await.is_err() {
            break;
        }
    }
    let (read, end) = reader.await.unwrap();
    drop(tx);
    (server.cpu() - cpu_before, start.elapsed(), read, end)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default| args.get(i).map_or(default, |v| v.parse().unwrap());
    let requests = number(0, 10_000);
    let names = number(1, 1_000);
    let only = args.get(2).map(String::as_str);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(
        &file,
        "services:\n  svc-0.flood:80:\n    - address: 10.0.0.1:80\n",
    )
    .unwrap();
    let binary = std::env::var_os("LB_SERVER").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-server"),
        Into::into,
    );
    let server = ServerProcess::start(Command::new(binary), &file, &[]);
    println!("\none ADS stream: {requests} EDS requests of {names} names each\n");
    println!("| names | server CPU s | wall s | CPU share | CPU µs / request | responses | end |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (label, fresh) in [("same each time", false), ("new each time", true)] {
        if only.is_some_and(|only| !label.starts_with(only)) {
            continue;
        }
        let (cpu, wall, read, end) = flood(&server, requests, names, fresh).await;
        println!(
            "| {label} | {:.2} | {:.2} | {:.0}% | {:.0} | {read} | {end} |",
            cpu.as_secs_f64(),
            wall.as_secs_f64(),
            cpu.as_secs_f64() * 100.0 / wall.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / requests as f64,
        );
    }
}
