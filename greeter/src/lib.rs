//! The greeter: Lookaside's example service and the tools that prove the balance.
//!
//! # Layout
//! - [`server`]: `helloworld.Greeter` that names the backend serving each call,
//!   with health, reflection, `MaxConnectionAge` and graceful drain on shutdown.
//! - [`demo`]: the whole system on loopback: lb-server, backends, a client;
//!   with `tls`, all of it over mTLS on certificates it makes for itself.
//! - [`client`]: the channels that do not use lookaside (one direct channel,
//!   DNS balancing), in plaintext or over TLS.
//! - [`load`]: the load generator and its summary (calls per backend, latency, errors).

pub mod client;
pub mod demo;
pub mod load;
pub mod server;

/// Logs to stderr, filtered by `RUST_LOG` (default: `default_filter`),
/// without colours when stderr is not a terminal.
pub fn init_tracing(default_filter: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
}
