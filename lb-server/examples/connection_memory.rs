//! How much of lb-server's memory per subscriber is the HTTP/2 connection
//! itself: N connections that only shake hands, that made one unary call, or
//! that hold one Discovery Watch stream. Each line is the growth of the
//! server's RSS divided by N.
//!
//! Run: `cargo run --release -p lb-server --example connection_memory -- 5000`
//! (needs `cargo build --release --bin lb-server` first).

use std::{path::Path, process::Command, time::Duration};

use lookaside_proto::lookaside::v1::{
    ListServicesRequest, WatchRequest, admin_client::AdminClient, discovery_client::DiscoveryClient,
};

#[path = "../benches/support/connection.rs"]
mod connection;
use connection::Connection;
#[path = "../benches/support/server.rs"]
mod server;
use server::ServerProcess;

async fn measure(mode: &str, n: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(
        &file,
        "services:\n  a.b:grpc:\n    - address: 10.0.0.1:80\n",
    )
    .unwrap();
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-server");
    let server = ServerProcess::start(Command::new(binary), &file, &[]);
    let addr = server.grpc;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let origin: http::Uri = format!("http://{addr}").parse().unwrap();
    let mut open = Vec::new();
    for _ in 0..n {
        let (mut connection, _) = Connection::open(addr).await;
        match mode {
            "unary call" => {
                AdminClient::with_origin(connection.clone(), origin.clone())
                    .list_services(ListServicesRequest::default())
                    .await
                    .unwrap();
            }
            "Watch stream" => {
                let mut stream = DiscoveryClient::with_origin(connection.clone(), origin.clone())
                    .watch(WatchRequest {
                        target: "a.b:grpc".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                stream.message().await.unwrap();
                open.push(Box::new(stream) as Box<dyn Send>);
            }
            _ => connection.sender.ready().await.unwrap(),
        }
        open.push(Box::new(connection));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss_kib();
    after.saturating_sub(before) as f64 / n as f64
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    println!("\nlb-server RSS per HTTP/2 connection ({n} connections)\n");
    println!("| each connection has | KiB |");
    println!("|---|---:|");
    for mode in ["handshake only", "unary call", "Watch stream"] {
        println!("| {mode} | {:.1} |", measure(mode, n).await);
    }
}
