//! lb-server as a child process, shared by the fan-out benchmark and the
//! `connection_memory` example: started on a file source (or, for the
//! restart over Kubernetes, any source its caller sets), its gRPC address
//! read from its log, its RSS and CPU time read from /proc, stopped on drop.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The lb-server process; SIGTERM on drop, then SIGKILL if it lingers.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) grpc: SocketAddr,
}

impl ServerProcess {
    /// Runs `command` (lb-server, or a tool wrapping it) on `file`, listening
    /// on loopback ports the OS picks, with `extra` flags.
    pub(crate) fn start(mut command: Command, file: &Path, extra: &[&str]) -> Self {
        command.args(["--source", "file", "--file"]).arg(file);
        Self::start_on(command, extra)
    }

    /// Runs `command`, whose source flags (and environment, e.g.
    /// `KUBECONFIG`) are already set, as [`ServerProcess::start`] does.
    pub(crate) fn start_on(mut command: Command, extra: &[&str]) -> Self {
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("lb-server starts (build it first: cargo build --release --bin lb-server)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let grpc = loop {
            let line = lines.next().expect("lb-server logs its address").unwrap();
            if let Some(rest) = line.split("grpc=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining the log so the pipe never fills.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, grpc }
    }

    /// The server's user + system CPU time so far.
    #[allow(dead_code)] // the fan-out benchmark reads it; the memory example does not
    pub(crate) fn cpu(&self) -> Duration {
        process_cpu(self.child.id())
    }

    /// The server's threads' time on a CPU and waiting for one.
    #[allow(dead_code)] // the fan-out benchmark reads it; the memory example does not
    pub(crate) fn threads(&self) -> Vec<(String, Duration, Duration)> {
        thread_times(self.child.id())
    }

    /// The server's resident memory.
    pub(crate) fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

/// Each thread of a process: its name, and its time on a CPU and waiting
/// for one so far (the scheduler's `schedstat`, in nanoseconds).
#[allow(dead_code)] // the fan-out benchmark reads it; the memory example does not
pub(crate) fn thread_times(pid: u32) -> Vec<(String, Duration, Duration)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<(String, Duration, Duration)> = tasks
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
            let (run, wait) = (fields.next()??, fields.next()??);
            let tid = dir.file_name()?.to_string_lossy().into_owned();
            Some((
                format!("{}/{tid}", name.trim()),
                Duration::from_nanos(run),
                Duration::from_nanos(wait),
            ))
        })
        .collect();
    threads.sort();
    threads
}

/// A process's user + system CPU time so far.
pub(crate) fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGTERM first (lb-server drains and exits, and a wrapping tool such
        // as valgrind writes its report), SIGKILL if it is still there after 30 s.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
