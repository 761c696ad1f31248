//! The local demo: lb-server on a file source, greeter backends and a
//! lookaside client, all on loopback; no cluster needed.
//!
//! It first shows the problem (one direct channel pins every call to one
//! backend), then lookaside's spread, then a scale-up and a drain while
//! traffic runs, with each phase's distribution and the failed-call count.
//!
//! With [`DemoOptions::tls`] every connection is mutual TLS: lb-server's gRPC
//! port, every backend, and both clients, on certificates from a CA made for
//! the run. They are written to the run's temporary directory (removed when
//! the run ends, with everything else in it) and the grpcurl command that
//! reaches lb-server with them is printed. A backend's certificate names the
//! service (`greeter.default.svc`, what lb-client verifies), lb-server's
//! `localhost` and `127.0.0.1`.

use std::{
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use lookaside_tls::{ClientFiles, Reloading, Roots, ServerFiles, generate::Ca};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{
    client,
    load::{self, Counts, Tally, distribution_table},
    server::{LocalGreeter, ServerTls},
};

const TARGET: &str = "greeter.default:grpc";
/// The name a backend's certificate carries: the service's DNS name, which
/// lb-client verifies (`NAME.NAMESPACE.svc` of [`TARGET`]).
const SERVICE_NAME: &str = "greeter.default.svc";
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
    /// Run everything over mutual TLS, on certificates made for the run.
    pub tls: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            phase: Duration::from_secs(3),
            concurrency: 10,
            baseline_calls: 5_000,
            tls: false,
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

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The certificates of a TLS run, written to its directory.
struct Pki {
    /// The CA every peer trusts.
    ca: PathBuf,
    /// lb-server's gRPC port.
    lb: ServerFiles,
    /// Every backend's (they all serve as `greeter.default.svc`).
    backend: ServerTls,
    /// What both clients present.
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    /// A CA and the certificates it issues for lb-server, the backends and
    /// the clients, written to `dir`. Each server requires a client
    /// certificate from the CA.
    fn make(dir: &Path) -> anyhow::Result<Self> {
        let ca = Ca::new("Lookaside demo CA")?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca.cert())?;
        let server = |name: &str, names: &[&str]| -> anyhow::Result<ServerFiles> {
            let (cert, key) = ca.issue(names)?.write(dir, name)?;
            Ok(ServerFiles {
                cert,
                key,
                client_ca: Some(ca_file.clone()),
            })
        };
        let lb = server("lb", &["localhost", "127.0.0.1"])?;
        let backend = Reloading::new(server("greeter", &[SERVICE_NAME])?.load()?);
        let (client_cert, client_key) = ca.issue(&["demo-client"])?.write(dir, "client")?;
        Ok(Self {
            ca: ca_file,
            lb,
            backend,
            client_cert,
            client_key,
        })
    }

    /// What the direct channel trusts and presents.
    fn client_files(&self) -> ClientFiles {
        ClientFiles {
            roots: Roots::File(self.ca.clone()),
            identity: Some((self.client_cert.clone(), self.client_key.clone())),
        }
    }

    /// The same for the lookaside channel.
    fn client_tls(&self) -> lb_client::ClientTls {
        lb_client::ClientTls::ca_file(&self.ca).identity(&self.client_cert, &self.client_key)
    }

    /// The grpcurl command that asks lb-server at `lb_addr` for its services.
    fn grpcurl(&self, lb_addr: SocketAddr) -> String {
        format!(
            "grpcurl -cacert {} -cert {} -key {} {lb_addr} lookaside.v1.Admin/ListServices",
            self.ca.display(),
            self.client_cert.display(),
            self.client_key.display()
        )
    }
}

/// Runs the demo, printing as it goes through `out`.
pub async fn run(options: DemoOptions, out: impl FnMut(&str)) -> anyhow::Result<DemoReport> {
    run_holding(options, out, std::future::ready(())).await
}

/// Runs the demo as [`run`] does, but after the last phase keeps lb-server
/// and the backends serving until `hold` completes (for a user to try them
/// with grpcurl), then stops them and removes the run's files.
pub async fn run_holding(
    options: DemoOptions,
    mut out: impl FnMut(&str),
    hold: impl Future<Output = ()>,
) -> anyhow::Result<DemoReport> {
    // Removed when this returns, early or not, and when the future is dropped.
    let dir = tempfile::Builder::new()
        .prefix("lookaside-demo-")
        .tempdir()?;
    let pki = options.tls.then(|| Pki::make(dir.path())).transpose()?;
    let file = dir.path().join("lookaside-demo.yaml");
    let backend_tls = pki.as_ref().map(|pki| pki.backend.clone());
    let mut backends = Vec::new();
    for name in ["backend-1", "backend-2", "backend-3"] {
        backends.push(LocalGreeter::start_with(name, LOOPBACK, backend_tls.clone()).await?);
    }
    write_atomic(&file, &file_for(&backends.iter().collect::<Vec<_>>(), &[]))?;
    let mut config = Config::for_file(&file);
    config.file_poll_interval = Duration::from_millis(20);
    if let Some(pki) = &pki {
        config.tls_cert = Some(pki.lb.cert.clone());
        config.tls_key = Some(pki.lb.key.clone());
        config.tls_client_ca = pki.lb.client_ca.clone();
    }
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
    if let Some(pki) = &pki {
        out(&format!(
            "mTLS on every connection: lb-server, the backends and both clients present\n\
             certificates from a CA made for this run, in {} (removed when the demo ends).\n\
             While the demo runs (`demo --tls --hold` keeps it up at the end), ask lb-server:\n  {}\n",
            dir.path().display(),
            pki.grpcurl(lb_addr)
        ));
    }

    // The problem: one HTTP/2 connection, every call on one backend.
    // Over TLS it verifies the service's name, as a client of a ClusterIP
    // Service (`greeter.default.svc`) would.
    let direct_tls = pki.as_ref().map(|pki| client::Tls {
        files: pki.client_files(),
        server_name: Some(SERVICE_NAME.to_owned()),
    });
    let direct = client::direct(&backends[0].addr.to_string(), direct_tls.as_ref()).await?;
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
    let mut builder = lb_client::Channel::builder(TARGET);
    builder = match &pki {
        None => builder.lb(format!("http://{lb_addr}")),
        Some(pki) => builder
            .lb(format!("https://{lb_addr}"))
            .tls(pki.client_tls()),
    };
    let channel = builder.connect().await.context("lookaside channel")?;
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

    backends.push(LocalGreeter::start_with("backend-4", LOOPBACK, backend_tls.clone()).await?);
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
    hold.await;
    let _ = lb_stop.send(());
    lb_task.await??;
    for backend in backends {
        backend.stop().await?;
    }
    dir.close()?;
    Ok(DemoReport { baseline, phases })
}
