//! The `lb-server` binary: parse flags, load the source, serve until SIGTERM/SIGINT.

use std::io::IsTerminal;

use clap::Parser;
use lb_server::{Config, LbServer, signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    if let Err(error) = run(config).await {
        eprintln!("lb-server: error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let server = LbServer::bind(config).await?;
    tracing::info!(
        grpc = %server.grpc_addr(),
        metrics = %server.metrics_addr(),
        "lb-server listening"
    );
    server.run(signal::shutdown()).await
}
