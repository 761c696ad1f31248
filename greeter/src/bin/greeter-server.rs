//! `greeter-server`: the example backend. Its replies name the backend that served them.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use greeter::server::{self, ServerOptions};
use lookaside_tls::{Reloading, ServerFiles};

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
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. The
    /// files are watched and reloaded when they change.
    #[arg(long, env = "GREETER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "GREETER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS); needs --tls-cert.
    #[arg(long, env = "GREETER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Microseconds of CPU each call spends before it answers: makes this
    /// backend slow in a way its load reports (ORCA) show.
    #[arg(long, env = "GREETER_CPU_WORK_US", default_value = "0")]
    cpu_work_us: u64,
    /// The zone this backend is in, for --cross-zone-delay-us.
    #[arg(long, env = "GREETER_ZONE", requires = "cross_zone_delay_us")]
    zone: Option<String>,
    /// Microseconds to delay each call whose `x-client-zone` metadata names a
    /// zone other than --zone: a cross-zone hop emulated on one machine, for
    /// benchmarks (calls without that metadata are not delayed).
    #[arg(long, env = "GREETER_CROSS_ZONE_DELAY_US", requires = "zone")]
    cross_zone_delay_us: Option<u64>,
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
async fn main() -> anyhow::Result<ExitCode> {
    greeter::init_tracing("info");
    let args = Args::parse();
    let name = args.name.unwrap_or_else(default_name);
    let files = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        _ => None,
    };
    let tls = match &files {
        Some(files) => match files.load() {
            Ok(config) => Some(Reloading::new(config)),
            Err(error) => {
                eprintln!("greeter-server: TLS: {error}");
                return Ok(ExitCode::FAILURE);
            }
        },
        None => None,
    };
    // New handshakes use the rotated files; a broken rotation keeps the last
    // good certificate.
    let _watch = tls.as_ref().zip(files).map(|(tls, files)| {
        let paths = files.paths();
        tls.watch(
            paths,
            move || files.load(),
            |result| match result {
                Ok(()) => tracing::info!("TLS files reloaded"),
                Err(error) => {
                    tracing::warn!(%error, "TLS files changed but cannot be used; keeping the previous ones")
                }
            },
        )
    });
    // Before the port opens: a SIGTERM from then on drains.
    let shutdown = lb_server::signal::shutdown();
    let (listener, addr) = server::bind(args.listen).await?;
    tracing::info!(%addr, %name, "greeter-server listening");
    let options = ServerOptions {
        name,
        max_connection_age: args.max_connection_age,
        shutdown_delay: args.shutdown_delay,
        drain_timeout: args.drain_timeout,
        tls,
        cpu_work: Duration::from_micros(args.cpu_work_us),
        cross_zone: args
            .zone
            .zip(args.cross_zone_delay_us)
            .map(|(zone, us)| (zone, Duration::from_micros(us))),
    };
    server::serve(listener, options, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
