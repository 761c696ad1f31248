//! The harness lb-server's integration tests share: an in-process server on
//! loopback ports the OS picks, on a file source, stopped by its handle.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use lb_server::{Config, LbServer, store::Store};
use lookaside_proto::lookaside::v1::{
    ListSubscribersRequest, Subscriber, WatchRequest, WatchResponse, admin_client::AdminClient,
    discovery_client::DiscoveryClient,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::{Streaming, transport::Channel};

/// How long any wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// A Watch of `greeter.default:grpc` on `channel`, past its first message
/// (which must say the service exists).
pub async fn watch_greeter(channel: Channel) -> Streaming<WatchResponse> {
    let mut watch = DiscoveryClient::new(channel)
        .watch(WatchRequest {
            target: "greeter.default:grpc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().unwrap().exists);
    watch
}

/// The next message of `watch`, within [`WAIT`].
pub async fn next_update(watch: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("an update within WAIT")
        .unwrap()
        .expect("the stream is open")
}

/// A running lb-server on loopback with a file source, stopped by its handle.
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub store: Arc<Store>,
    file: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, |_| {}).await
    }

    pub async fn start_with(yaml: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lb.yaml");
        std::fs::write(&file, yaml).unwrap();
        let mut config = Config::for_file(&file);
        tweak(&mut config);
        let server = LbServer::bind(config).await.unwrap();
        let (grpc, http, store) = (server.grpc_addr(), server.metrics_addr(), server.store());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            grpc,
            http,
            store,
            file,
            _dir: dir,
            stop: Some(stop),
            task,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Every open subscriber stream, as Admin lists it.
    pub async fn subscribers(&self) -> Vec<Subscriber> {
        AdminClient::new(self.channel().await)
            .list_subscribers(ListSubscribersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .subscribers
    }

    /// Replaces the file atomically, as an editor or a ConfigMap update would.
    pub fn write_file(&self, yaml: &str) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    /// `GET path` on the metrics port: status code and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    /// The Prometheus text on `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http_get("/metrics").await.1
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task).await??
    }
}

/// The release binary, started on `file` with `extra` flags, killed when
/// dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl ServerProcess {
    pub fn start(file: &std::path::Path, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lb-server"))
            .args(["--source", "file", "--file"])
            .arg(file)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("LB_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut log = String::new();
        while let Some(Ok(line)) = lines.next() {
            log += &line;
            log.push('\n');
            if line.contains("lb-server listening") {
                let addr = |key: &str| -> SocketAddr {
                    let start = line.find(key).unwrap() + key.len();
                    line[start..]
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                let (grpc, http) = (addr("grpc="), addr("metrics="));
                // Keep reading so the pipe never fills.
                std::thread::spawn(move || for _ in lines {});
                return Self { child, grpc, http };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("lb-server ended before listening:\n{log}");
    }

    /// The process's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kib * 1024
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
