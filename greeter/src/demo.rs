//! The local demo: lb-server on a file source, greeter backends and a
//! lookaside client, all on loopback; no cluster needed.
//!
//! It first shows the problem (one direct channel pins every call to one
//! backend), then lookaside's spread, then a scale-up and a drain while
//! traffic runs, with each phase's distribution and the failed-call count.
//! Last, one backend is slow: round-robin and weighted round robin (WRR,
//! from the backends' ORCA load reports) side by side, distribution and
//! latency. That phase runs its three backends as `greeter-server`
//! processes ([`DemoOptions::greeter_server`]), because a backend reports
//! its *process's* CPU: in-process backends would all report the same load.
//! Without the executable the phase is skipped, with a line saying how to
//! build it.
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
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use lb_client::{Policy, WrrConfig};
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use lookaside_tls::{ClientFiles, Reloading, Roots, ServerFiles, generate::Ca};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

use crate::{
    client,
    load::{self, Counts, Summary, Tally, distribution_table, open_loop},
    server::{LocalGreeter, ServerTls},
};

const TARGET: &str = "greeter.default:grpc";
/// The slow-backend phase's service: the same service (so the same
/// certificate name), another port.
const SKEW_TARGET: &str = "greeter.default:skew";
/// CPU per call of the slow-backend phase's backends: the last is 3x slower.
const SKEW_WORK_US: [(&str, u64); 3] = [("fast-1", 300), ("fast-2", 300), ("slow-3", 900)];
/// WRR's blackout in the demo: a weight counts once its backend has reported
/// for this long (A58's default is 10 s).
const WRR_BLACKOUT: Duration = Duration::from_secs(1);
/// How long WRR's channel carries traffic before it is measured: the
/// blackout, one weight update and a margin.
const WRR_WARM: Duration = Duration::from_millis(2_000);
/// Calls per second in the slow-backend phase, sent on schedule whatever is
/// in flight (open loop, as a service's users call): round-robin's third
/// keeps the slow backend (600 calls/s × about 1 ms) 60% busy on an idle
/// machine, more on a busy one, which its queue shows in the p99.
const SKEW_RATE: f64 = 1_800.0;
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
    /// The `greeter-server` executable the slow-backend phase runs its
    /// backends with, each in a process of its own so that each reports its
    /// own CPU. `None`: the one next to this program's executable (where
    /// `cargo build --release -p greeter --bins` puts it). If it does not
    /// exist the phase is skipped, with a line saying so.
    pub greeter_server: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            phase: Duration::from_secs(3),
            concurrency: 10,
            baseline_calls: 5_000,
            tls: false,
            greeter_server: None,
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
    /// The slow-backend phase; `None` if it was skipped.
    pub slow: Option<SlowBackend>,
}

/// The slow-backend phase: the same backends (one 3x slower in CPU per
/// call) under each policy in turn.
#[derive(Debug, Clone)]
pub struct SlowBackend {
    /// The slow backend's name in replies.
    pub slow: String,
    /// Round-robin.
    pub round_robin: Summary,
    /// Weighted round robin from ORCA reports, measured after its warm-up.
    pub wrr: Summary,
}

impl SlowBackend {
    /// The slow backend's share of `summary`'s successful calls (0 to 1).
    pub fn slow_share(&self, summary: &Summary) -> f64 {
        let on_slow = summary.backends.get(&self.slow).copied().unwrap_or(0);
        on_slow as f64 / summary.ok.max(1) as f64
    }
}

impl DemoReport {
    /// Calls that failed over the whole lookaside run.
    pub fn failed(&self) -> u64 {
        let slow = self.slow.as_ref().map_or(0, |slow| {
            (slow.round_robin.calls - slow.round_robin.ok) + (slow.wrr.calls - slow.wrr.ok)
        });
        self.phases.iter().map(|(_, c)| c.failed()).sum::<u64>() + slow
    }
}

/// A backend as the file source lists it.
struct Listed<'a> {
    name: &'a str,
    addr: SocketAddr,
}

impl<'a> From<&'a LocalGreeter> for Listed<'a> {
    fn from(backend: &'a LocalGreeter) -> Self {
        Listed {
            name: &backend.name,
            addr: backend.addr,
        }
    }
}

impl<'a> From<&'a SkewBackend> for Listed<'a> {
    fn from(backend: &'a SkewBackend) -> Self {
        Listed {
            name: backend.name,
            addr: backend.addr,
        }
    }
}

/// The file source's YAML: [`TARGET`] with `backends` (those named in
/// `draining` draining), and [`SKEW_TARGET`] with `skew` if any.
fn file_for(backends: &[&LocalGreeter], draining: &[&str], skew: &[SkewBackend]) -> String {
    let mut yaml = "services:\n".to_owned();
    let mut service = |target: &str, listed: Vec<Listed<'_>>| {
        let _ = writeln!(yaml, "  {target}:");
        for backend in listed {
            let _ = writeln!(yaml, "    - address: {}", backend.addr);
            let _ = writeln!(yaml, "      pod: {}", backend.name);
            if draining.contains(&backend.name) {
                yaml += "      draining: true\n";
            }
        }
    };
    service(TARGET, backends.iter().map(|b| Listed::from(*b)).collect());
    if !skew.is_empty() {
        service(SKEW_TARGET, skew.iter().map(Listed::from).collect());
    }
    yaml
}

/// A `greeter-server` process of the slow-backend phase, killed when
/// dropped (so also when the demo is interrupted).
struct SkewBackend {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl SkewBackend {
    /// Starts `exe` as `name` on a loopback port, spending `work_us` of CPU
    /// per call on one tokio worker thread (one call at a time, as a pod
    /// with one CPU), and waits for it to log its address.
    async fn start(
        exe: &Path,
        name: &'static str,
        work_us: u64,
        tls: Option<&ServerFiles>,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(exe);
        command
            .args(["--listen", "127.0.0.1:0", "--name", name])
            .arg(format!("--cpu-work-us={work_us}"))
            .env("TOKIO_WORKER_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(files) = tls {
            command.arg("--tls-cert").arg(&files.cert);
            command.arg("--tls-key").arg(&files.key);
            if let Some(ca) = &files.client_ca {
                command.arg("--tls-client-ca").arg(ca);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stderr = child.stderr.take().context("greeter-server's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                {
                    return Ok(addr.parse::<SocketAddr>()?);
                }
            }
            anyhow::bail!("greeter-server {name} exited before listening")
        })
        .await
        .with_context(|| format!("greeter-server {name} did not log its address in 10 s"))??;
        // Keep reading its log, so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { name, addr, child })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// `greeter-server` next to this program's executable.
fn sibling_greeter_server() -> Option<PathBuf> {
    Some(
        std::env::current_exe()
            .ok()?
            .with_file_name("greeter-server"),
    )
}

/// Round-robin and WRR side by side: calls and share per backend, then
/// throughput, latency and failures.
fn side_by_side(round_robin: &Summary, wrr: &Summary) -> String {
    let mut out = format!(
        "{:<16} {:>22} {:>22}\n",
        "", "round-robin", "weighted round robin"
    );
    let cell = |summary: &Summary, name: &str| {
        let n = summary.backends.get(name).copied().unwrap_or(0);
        let share = 100.0 * n as f64 / summary.ok.max(1) as f64;
        format!("{n:>8} calls {share:>6.2}%")
    };
    for (name, work_us) in SKEW_WORK_US {
        let label = format!("{name} ({work_us} µs)");
        let _ = writeln!(
            out,
            "{label:<16} {:>22} {:>22}",
            cell(round_robin, name),
            cell(wrr, name)
        );
    }
    let row = |out: &mut String, label: &str, f: &dyn Fn(&Summary) -> String| {
        let _ = writeln!(out, "{label:<16} {:>22} {:>22}", f(round_robin), f(wrr));
    };
    row(&mut out, "calls/s", &|s| format!("{:.0}", s.rps));
    row(&mut out, "p50 ms", &|s| format!("{:.3}", s.latency_ms.p50));
    row(&mut out, "p99 ms", &|s| format!("{:.3}", s.latency_ms.p99));
    row(&mut out, "failed calls", &|s| format!("{}", s.calls - s.ok));
    out
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
    /// The same as files, for the `greeter-server` processes.
    backend_files: ServerFiles,
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
        let backend_files = server("greeter", &[SERVICE_NAME])?;
        let backend = Reloading::new(backend_files.load()?);
        let (client_cert, client_key) = ca.issue(&["demo-client"])?.write(dir, "client")?;
        Ok(Self {
            ca: ca_file,
            lb,
            backend,
            backend_files,
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
    // The slow-backend phase's processes start now, so that lb-server reads
    // them with the rest; they are idle until their phase.
    let exe = options
        .greeter_server
        .clone()
        .or_else(sibling_greeter_server);
    let mut skew = Vec::new();
    match exe.filter(|exe| exe.is_file()) {
        Some(exe) => {
            for (name, work_us) in SKEW_WORK_US {
                let tls = pki.as_ref().map(|pki| &pki.backend_files);
                skew.push(SkewBackend::start(&exe, name, work_us, tls).await?);
            }
        }
        None => out(&format!(
            "(The slow-backend phase will be skipped: it runs greeter-server processes, and there \
             is none at {}. Build it with `cargo build --release -p greeter --bins`.)\n",
            sibling_greeter_server().map_or_else(
                || "this program's directory".to_owned(),
                |p| p.display().to_string()
            )
        )),
    }
    let listed = |backends: &[LocalGreeter], draining: &[&str], skew: &[SkewBackend]| {
        file_for(&backends.iter().collect::<Vec<_>>(), draining, skew)
    };
    write_atomic(&file, &listed(&backends, &[], &skew))?;
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
    let lookaside = |target: &str| {
        let builder = lb_client::Channel::builder(target);
        match &pki {
            None => builder.lb(format!("http://{lb_addr}")),
            Some(pki) => builder
                .lb(format!("https://{lb_addr}"))
                .tls(pki.client_tls()),
        }
    };
    let channel = lookaside(TARGET)
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

    backends.push(LocalGreeter::start_with("backend-4", LOOPBACK, backend_tls.clone()).await?);
    write_atomic(&file, &listed(&backends, &[], &skew))?;
    tokio::time::sleep(options.phase).await;
    phase(
        "Scale-up: backend-4 added while traffic runs",
        &mut out,
        &mut mark,
    );

    write_atomic(&file, &listed(&backends, &["backend-2"], &skew))?;
    tokio::time::sleep(options.phase).await;
    phase(
        "Drain: backend-2 marked draining (no new calls; calls in flight finish)",
        &mut out,
        &mut mark,
    );

    // Remove the drained backend and stop it gracefully, still under traffic.
    let drained = backends.remove(1);
    write_atomic(&file, &listed(&backends, &[], &skew))?;
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

    let slow = if skew.is_empty() {
        out("\n== One backend slow: skipped (no greeter-server executable; see above)\n");
        None
    } else {
        let slow = slow_backend_phase(&options, &skew, &lookaside, &mut out).await?;
        // The phase's processes go; the demo's own backends stay for `hold`.
        write_atomic(&file, &listed(&backends, &[], &[]))?;
        for backend in skew {
            backend.stop().await?;
        }
        Some(slow)
    };

    hold.await;
    let _ = lb_stop.send(());
    lb_task.await??;
    for backend in backends {
        backend.stop().await?;
    }
    dir.close()?;
    Ok(DemoReport {
        baseline,
        phases,
        slow,
    })
}

/// One backend 3x slower than the others: the same load through a
/// round-robin channel, then through a WRR channel (after its warm-up).
async fn slow_backend_phase(
    options: &DemoOptions,
    skew: &[SkewBackend],
    lookaside: &dyn Fn(&str) -> lb_client::Builder,
    out: &mut dyn FnMut(&str),
) -> anyhow::Result<SlowBackend> {
    let (slow, slow_us) = SKEW_WORK_US[2];
    let (_, fast_us) = SKEW_WORK_US[0];
    out(&format!(
        "\n== One backend slow: {slow} spends {slow_us} µs of CPU per call, the others {fast_us} µs\n\
         Three greeter-server processes ({}, {}, {}), one tokio worker each (a pod with one CPU),\n\
         each reporting its own load (ORCA: CPU utilization, calls/s) in every response.\n\
         {SKEW_RATE} calls/s sent on schedule (open loop; latency counts from when a call was sent);\n\
         round-robin for {:.1} s, then weighted round robin (WRR) from those reports, with a {} s\n\
         blackout (a weight counts once its backend has reported that long; gRPC's default is\n\
         10 s): {:.1} s of warm-up, then measured for {:.1} s.\n",
        skew[0].addr,
        skew[1].addr,
        skew[2].addr,
        options.phase.as_secs_f64(),
        WRR_BLACKOUT.as_secs(),
        WRR_WARM.as_secs_f64(),
        options.phase.as_secs_f64(),
    ));
    let round_robin = lookaside(SKEW_TARGET)
        .policy(Policy::RoundRobin)
        .connect()
        .await
        .context("round-robin channel")?;
    let round_robin = open_loop(GreeterClient::new(round_robin), SKEW_RATE, options.phase).await;
    let wrr = lookaside(SKEW_TARGET)
        .policy(Policy::WeightedRoundRobin)
        .wrr(WrrConfig {
            blackout_period: WRR_BLACKOUT,
            weight_update_period: Duration::from_millis(250),
            ..WrrConfig::default()
        })
        .connect()
        .await
        .context("WRR channel")?;
    let wrr = GreeterClient::new(wrr);
    open_loop(wrr.clone(), SKEW_RATE, WRR_WARM).await;
    let wrr = open_loop(wrr, SKEW_RATE, options.phase).await;
    out(&side_by_side(&round_robin, &wrr));
    let phase = SlowBackend {
        slow: slow.to_owned(),
        round_robin,
        wrr,
    };
    out(&format!(
        "{slow}'s share: {:.1}% under round-robin, {:.1}% under WRR: its reports show it loaded, \
         so WRR sends it less.\n",
        100.0 * phase.slow_share(&phase.round_robin),
        100.0 * phase.slow_share(&phase.wrr)
    ));
    Ok(phase)
}
