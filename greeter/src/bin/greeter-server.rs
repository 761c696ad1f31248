//! `greeter-server`: the example backend. Its replies name the backend that served them.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use greeter::server::{self, ServerOptions};

/// The example gRPC backend.
#[derive(Debug, Parser)]
#[command(name = "greeter-server", version)]
struct Args {
    /// Listen address.
    #[arg(long, env = "GREETER_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// The name replies carry (default: POD_NAME, then the hostname).
    #[arg(long, env = "GREETER_NAME")]
    name: Option<String>,
    /// Close connections after this many seconds (like grpc-go's MaxConnectionAge).
    #[arg(long, env = "GREETER_MAX_CONNECTION_AGE", value_parser = parse_seconds)]
    max_connection_age: Option<Duration>,
    /// Seconds to keep serving after SIGTERM while reporting NOT_SERVING, so
    /// endpoint updates reach clients before the listener closes.
    #[arg(long, env = "GREETER_SHUTDOWN_DELAY", default_value = "0", value_parser = parse_seconds)]
    shutdown_delay: Duration,
    /// Seconds to finish calls in flight once the listener has closed.
    #[arg(long, env = "GREETER_DRAIN_TIMEOUT", default_value = "10", value_parser = parse_seconds)]
    drain_timeout: Duration,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let text = text.trim_end_matches('s');
    text.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|_| format!("bad duration {text:?}: expected seconds, e.g. 30 or 0.5"))
}

fn default_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "greeter".to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    greeter::init_tracing("info");
    let args = Args::parse();
    let name = args.name.unwrap_or_else(default_name);
    let (listener, addr) = server::bind(args.listen).await?;
    tracing::info!(%addr, %name, "greeter-server listening");
    let options = ServerOptions {
        name,
        max_connection_age: args.max_connection_age,
        shutdown_delay: args.shutdown_delay,
        drain_timeout: args.drain_timeout,
    };
    server::serve(listener, options, shutdown()).await
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received; draining");
}
