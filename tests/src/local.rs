//! Process helpers for end-to-end scenarios on loopback: greeter backends,
//! lb-server in-process or as a real process, and the file source they share.
//!
//! Every server binds `127.0.0.1:0` (or a port it had before, to restart in
//! place) and is stopped by its own handle.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use greeter::{
    load::{self, Counts, Tally},
    server::LocalGreeter,
};
use lb_client::Channel;
use lb_server::{Config, LbServer, store::Store};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// The service every scenario balances.
pub const TARGET: &str = "greeter.default:grpc";

/// A greeter backend running in this process (see
/// [`LocalGreeter`]); its calls panic on failure, as test fixtures do.
#[derive(Debug)]
pub struct Backend(LocalGreeter);

impl std::ops::Deref for Backend {
    type Target = LocalGreeter;

    fn deref(&self) -> &LocalGreeter {
        &self.0
    }
}

impl Backend {
    /// Starts a backend on a port the OS picks.
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, ([127, 0, 0, 1], 0).into()).await
    }

    /// Starts a backend on `addr` (to bring a backend back where it was).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Self {
        Self(
            LocalGreeter::start(name, addr)
                .await
                .expect("start backend"),
        )
    }

    /// Stops gracefully: NOT_SERVING, no new connections, calls in flight finish.
    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.0.stop())
            .await
            .expect("backend stops within its drain timeout")
            .expect("backend serves cleanly");
    }
}

/// One backend line in the file source.
#[derive(Debug, Clone)]
pub struct Listed {
    addr: SocketAddr,
    name: String,
    draining: bool,
    weight: u32,
    zone: String,
}

impl Listed {
    /// Lists a backend by its address and name (one not started as a [`Backend`]).
    pub fn of_addr(addr: SocketAddr, name: &str) -> Self {
        Self {
            addr,
            name: name.into(),
            draining: false,
            weight: 1,
            zone: String::new(),
        }
    }

    /// Lists a backend.
    pub fn of(backend: &Backend) -> Self {
        Self {
            addr: backend.addr,
            name: backend.name.clone(),
            draining: false,
            weight: 1,
            zone: String::new(),
        }
    }

    /// Lists it as draining.
    pub fn draining(mut self) -> Self {
        self.draining = true;
        self
    }

    /// Lists it in a zone.
    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = zone.into();
        self
    }

    /// Lists it with a weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// The YAML file lb-server reads.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SourceFile {
    /// A file listing `backends` under [`TARGET`].
    pub fn new(backends: &[Listed]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Self {
            path: dir.path().join("lb.yaml"),
            _dir: dir,
        };
        file.write(backends);
        file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the list atomically (write a temporary file, rename it in place).
    pub fn write(&self, backends: &[Listed]) {
        let mut yaml = format!("services:\n  {TARGET}:\n");
        for b in backends {
            let _ = writeln!(
                yaml,
                "    - address: {}\n      pod: {}\n      weight: {}\n      draining: {}",
                b.addr, b.name, b.weight, b.draining
            );
            if !b.zone.is_empty() {
                let _ = writeln!(yaml, "      zone: {}", b.zone);
            }
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write source file");
        std::fs::rename(&tmp, &self.path).expect("rename source file");
    }
}

/// lb-server in this process, on a file source.
pub struct InProcessLb {
    /// gRPC address.
    pub addr: SocketAddr,
    store: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcessLb {
    /// Starts it on `file`, polling every 10 ms.
    pub async fn start(file: &SourceFile) -> Self {
        let mut config = Config::for_file(file.path());
        config.file_poll_interval = Duration::from_millis(10);
        let server = LbServer::bind(config).await.expect("bind lb-server");
        let (addr, store) = (server.grpc_addr(), server.store());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            store,
            stop: Some(stop),
            task,
        }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The store the file source publishes into.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stops gracefully.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// The real `lb-server` binary as a child process, so it can be killed.
#[derive(Debug)]
pub struct LbProcess {
    /// gRPC address.
    pub addr: SocketAddr,
    child: Child,
}

/// The binary `name` that `cargo build --workspace --bins` produces, in the
/// profile these tests were built with.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let binary = target.join(profile).join(name);
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build --workspace --bins` (with --release for release tests) first; scripts/test.sh does",
        binary.display()
    );
    binary
}

/// The lb-server binary (see [`binary`]).
pub fn lb_server_binary() -> PathBuf {
    binary("lb-server")
}

/// Reads `child`'s stderr log until a line has `key=ADDRESS` and returns the
/// address; the rest of the log is drained in a thread so the pipe never
/// fills. The child must have been spawned with `stderr(Stdio::piped())`.
pub fn logged_addr(child: &mut Child, key: &str) -> SocketAddr {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let key = format!("{key}=");
    let addr = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the process exited before logging {key}ADDRESS"))
            .expect("read the process's log");
        if let Some(rest) = line.split(key.as_str()).nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("address")
                .parse()
                .expect("socket address");
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    addr
}

/// A greeter-server child process, killed on drop (a stopped one too).
/// Where a backend must be a process of its own: load reports measure the
/// process's CPU, and a process can be stopped with SIGSTOP.
#[derive(Debug)]
pub struct GreeterProcess {
    /// Its `--name`.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

impl GreeterProcess {
    /// Starts `greeter-server --name NAME` on a port the OS picks, with
    /// `extra` flags (e.g. `--cpu-work-us=300`).
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(binary("greeter-server"))
            .args(["--listen", "127.0.0.1:0", "--name", name])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start greeter-server");
        let addr = logged_addr(&mut child, "addr");
        Self {
            name: name.into(),
            addr,
            child,
        }
    }

    /// Sends `signal` (as `kill` takes it, e.g. `-STOP`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for GreeterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LbProcess {
    /// Starts lb-server on `file`, on `addr` (port 0: the OS picks).
    pub fn start(file: &SourceFile, addr: SocketAddr) -> Self {
        let mut child = Command::new(lb_server_binary())
            .args(["--source", "file", "--file"])
            .arg(file.path())
            .args(["--file-poll-interval", "10ms", "--listen"])
            .arg(addr.to_string())
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("LB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lb-server");
        let addr = logged_addr(&mut child, "grpc");
        Self { addr, child }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one in-process backend per name.
pub async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut out = Vec::new();
    for name in names {
        out.push(Backend::start(name).await);
    }
    out
}

/// Background traffic through a channel, with a tally readable while it runs.
#[derive(Debug)]
pub struct Traffic {
    /// The calls so far, per backend name, and the failures.
    pub tally: Arc<Tally>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Traffic {
    /// Starts `concurrency` callers on `channel`.
    pub fn start(channel: &Channel, concurrency: usize) -> Self {
        let tally = Tally::new(concurrency);
        let stop = CancellationToken::new();
        let task = tokio::spawn(load::run(
            GreeterClient::new(channel.clone()),
            None,
            concurrency,
            tally.clone(),
            stop.clone(),
        ));
        Self { tally, stop, task }
    }

    /// Stops the callers; every call they made.
    pub async fn finish(self) -> Counts {
        self.stop.cancel();
        self.task.await.expect("the traffic task");
        self.tally.counts()
    }
}

/// `calls` calls on `channel` at concurrency 4; their counts.
pub async fn run_calls(channel: &Channel, calls: u64) -> Counts {
    let tally = Tally::new(4);
    load::run(
        GreeterClient::new(channel.clone()),
        Some(calls),
        4,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    tally.counts()
}

/// Waits until `check` holds, polling every 5 ms, for at most `wait`.
pub async fn until(what: &str, wait: Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + wait;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
