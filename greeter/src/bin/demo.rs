//! `demo`: the whole of Lookaside on one machine, no cluster.
//! Run with `cargo build --release -p greeter --bins && target/release/demo [--tls] [--hold]`
//! (its slow-backend phase runs the `greeter-server` next to it).

use std::{cell::Cell, process::ExitCode};

use clap::Parser;
use greeter::demo::{self, DemoOptions};
use tokio_util::sync::CancellationToken;

/// Request-level gRPC balancing on loopback: the pinning problem, then lookaside.
#[derive(Debug, Parser)]
#[command(name = "demo", version)]
struct Args {
    /// Run everything over mutual TLS (lb-server, the backends, the clients), on certificates
    /// made for this run in a temporary directory that is removed when the demo ends.
    #[arg(long)]
    tls: bool,
    /// After the last phase keep lb-server and the backends running until Ctrl-C, to try
    /// them with grpcurl.
    #[arg(long)]
    hold: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    greeter::init_tracing("warn");
    let args = Args::parse();
    println!("Lookaside demo: request-level gRPC balancing on loopback\n");
    let options = DemoOptions {
        tls: args.tls,
        ..DemoOptions::default()
    };
    let ctrl_c = CancellationToken::new();
    tokio::spawn({
        let ctrl_c = ctrl_c.clone();
        async move {
            signal().await;
            ctrl_c.cancel();
        }
    });
    let holding = Cell::new(false);
    let hold = async {
        if args.hold {
            holding.set(true);
            println!("\nlb-server and the backends keep running; Ctrl-C stops them.");
            ctrl_c.cancelled().await;
        }
    };
    let run = demo::run_holding(options, |text| print!("{text}"), hold);
    // Ctrl-C (or SIGTERM) while holding ends the hold and the demo stops in
    // order; before that it drops the demo, which removes its files.
    let interrupted = async {
        ctrl_c.cancelled().await;
        if holding.get() {
            std::future::pending::<()>().await;
        }
    };
    let report = tokio::select! {
        report = run => report?,
        () = interrupted => {
            println!("\ninterrupted");
            return Ok(ExitCode::from(130));
        }
    };
    if report.failed() > 0 {
        anyhow::bail!("{} calls failed", report.failed());
    }
    println!("\nNo call failed. Try it against a cluster: see README.md, \"Run it in a cluster\".");
    Ok(ExitCode::SUCCESS)
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
