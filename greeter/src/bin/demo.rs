//! `demo`: the whole of Lookaside on one machine, no cluster.
//! Run with `cargo run --release --bin demo`.

use greeter::demo::{self, DemoOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    greeter::init_tracing("warn");
    println!("Lookaside demo: request-level gRPC balancing on loopback\n");
    let report = demo::run(DemoOptions::default(), |text| print!("{text}")).await?;
    if report.failed() > 0 {
        anyhow::bail!("{} calls failed", report.failed());
    }
    println!("\nNo call failed. Try it against a cluster: see README.md, \"Run it in a cluster\".");
    Ok(())
}
