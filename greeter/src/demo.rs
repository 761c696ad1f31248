//! The local demo: lb-server on a file source, greeter backends and a
//! lookaside client, all on loopback; no cluster needed.
//!
//! It first shows the problem (one direct channel pins every call to one
//! backend), then lookaside's spread, then a scale-up and a drain while
//! traffic runs, with each phase's distribution and the failed-call count.

use std::{fmt::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{
    load::{self, Counts, Tally, distribution_table},
    server::LocalGreeter,
};

const TARGET: &str = "greeter.default:grpc";
const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// How long each phase runs and how hard.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Traffic per phase.
    pub phase: Duration,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Calls in the direct-channel baseline.
    pub baseline_calls: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            phase: Duration::from_secs(3),
            concurrency: 10,
            baseline_calls: 5_000,
        }
    }
}

/// What the demo saw, phase by phase.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The direct-channel baseline.
    pub baseline: Counts,
    /// `(title, counts)` for each lookaside phase.
    pub phases: Vec<(String, Counts)>,
}

impl DemoReport {
    /// Calls that failed over the whole lookaside run.
    pub fn failed(&self) -> u64 {
        self.phases.iter().map(|(_, c)| c.failed()).sum()
    }
}

fn file_for(backends: &[&LocalGreeter], draining: &[&str]) -> String {
    let mut yaml = format!("services:\n  {TARGET}:\n");
    for backend in backends {
        let _ = writeln!(yaml, "    - address: {}", backend.addr);
        let _ = writeln!(yaml, "      pod: {}", backend.name);
        if draining.contains(&backend.name.as_str()) {
            yaml += "      draining: true\n";
        }
    }
    yaml
}

fn write_atomic(path: &PathBuf, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs the demo, printing as it goes through `out`.
pub async fn run(options: DemoOptions, mut out: impl FnMut(&str)) -> anyhow::Result<DemoReport> {
    let dir = tempfile_dir()?;
    let file = dir.join("lookaside-demo.yaml");
    let mut backends = Vec::new();
    for name in ["backend-1", "backend-2", "backend-3"] {
        backends.push(LocalGreeter::start(name, LOOPBACK).await?);
    }
    write_atomic(&file, &file_for(&backends.iter().collect::<Vec<_>>(), &[]))?;
    let mut config = Config::for_file(&file);
    config.file_poll_interval = Duration::from_millis(20);
    let lb = LbServer::bind(config).await?;
    let lb_addr = lb.grpc_addr();
    let (lb_stop, lb_stopped) = oneshot::channel::<()>();
    let lb_task = tokio::spawn(lb.run(async {
        let _ = lb_stopped.await;
    }));
    out(&format!(
        "lb-server on {lb_addr} (file source {}), 3 greeter backends on {}, {}, {}\n",
        file.display(),
        backends[0].addr,
        backends[1].addr,
        backends[2].addr
    ));

    // The problem: one HTTP/2 connection, every call on one backend.
    let direct = tonic::transport::Endpoint::from_shared(format!("http://{}", backends[0].addr))?
        .connect()
        .await?;
    let tally = Tally::new(options.concurrency);
    load::run(
        GreeterClient::new(direct),
        Some(options.baseline_calls),
        options.concurrency,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let baseline = tally.counts();
    out(&format!(
        "\n== Without lookaside: one channel (what a ClusterIP Service gives), {} calls\n{}",
        options.baseline_calls,
        distribution_table(&baseline.backends)
    ));

    // Lookaside: a channel that balances every call.
    let channel = lb_client::Channel::builder(TARGET)
        .lb(format!("http://{lb_addr}"))
        .connect()
        .await
        .context("lookaside channel")?;
    let tally = Tally::new(options.concurrency);
    let stop = CancellationToken::new();
    let traffic = tokio::spawn(load::run(
        GreeterClient::new(channel.clone()),
        None,
        options.concurrency,
        tally.clone(),
        stop.clone(),
    ));
    let mut phases = Vec::new();
    let mut mark = tally.counts();
    let mut phase = |title: &str, out: &mut dyn FnMut(&str), mark: &mut Counts| {
        let now = tally.counts();
        let counts = now.since(mark);
        *mark = now;
        out(&format!(
            "\n== {title}\n{}failed calls: {}\n",
            distribution_table(&counts.backends),
            counts.failed()
        ));
        phases.push((title.to_owned(), counts));
    };

    tokio::time::sleep(options.phase).await;
    phase(
        "Lookaside: 3 backends, round-robin per call",
        &mut out,
        &mut mark,
    );

    backends.push(LocalGreeter::start("backend-4", LOOPBACK).await?);
    write_atomic(&file, &file_for(&backends.iter().collect::<Vec<_>>(), &[]))?;
    tokio::time::sleep(options.phase).await;
    phase(
        "Scale-up: backend-4 added while traffic runs",
        &mut out,
        &mut mark,
    );

    write_atomic(
        &file,
        &file_for(&backends.iter().collect::<Vec<_>>(), &["backend-2"]),
    )?;
    tokio::time::sleep(options.phase).await;
    phase(
        "Drain: backend-2 marked draining (no new calls; calls in flight finish)",
        &mut out,
        &mut mark,
    );

    // Remove the drained backend and stop it gracefully, still under traffic.
    let drained = backends.remove(1);
    write_atomic(&file, &file_for(&backends.iter().collect::<Vec<_>>(), &[]))?;
    drained.stop().await?;
    tokio::time::sleep(options.phase / 2).await;
    phase("backend-2 removed and stopped", &mut out, &mut mark);

    stop.cancel();
    traffic.await?;
    let summary = tally.summary();
    let failed: u64 = phases.iter().map(|(_, c)| c.failed()).sum();
    out(&format!(
        "\nLookaside total: {} calls, {:.0} calls/s, p50 {:.3} ms, p99 {:.3} ms, failed calls: {failed}\n",
        summary.calls, summary.rps, summary.latency_ms.p50, summary.latency_ms.p99
    ));

    drop(channel);
    let _ = lb_stop.send(());
    lb_task.await??;
    for backend in backends {
        backend.stop().await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DemoReport { baseline, phases })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lookaside-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
