//! The `lb-server` binary: parse flags, load the source, serve until SIGTERM/SIGINT.

use std::io::IsTerminal;

use clap::Parser;
use lb_server::{Config, LbServer, runtime, signal};
use tracing_subscriber::EnvFilter;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    let workers = runtime::worker_count();
    let allowed = runtime::allowed_cpus();
    let cpus = runtime::plan(config.pin_workers, workers, &allowed);
    let result = runtime::build(workers, cpus.clone())
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            match &cpus {
                Some(cpus) => tracing::info!(workers, ?cpus, "worker threads pinned, one per CPU"),
                None => tracing::info!(
                    workers,
                    ?allowed,
                    "worker threads free to run on any allowed CPU"
                ),
            }
            rt.block_on(run(config))
        });
    if let Err(error) = result {
        eprintln!(
            "lb-server: error: {}",
            lb_server::server::error_text(&error)
        );
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Before the ports open: a SIGTERM from then on drains.
    let shutdown = signal::shutdown();
    let server = LbServer::bind(config).await?;
    tracing::info!(
        grpc = %server.grpc_addr(),
        metrics = %server.metrics_addr(),
        admin = ?server.admin_addr(),
        "lb-server listening"
    );
    server.run(shutdown).await
}
