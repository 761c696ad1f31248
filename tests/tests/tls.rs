//! End to end over TLS: lb-client with mTLS to lb-server and to greeter
//! backends, certificates rotating under traffic, handshake failures that
//! say which endpoint and why, and deadlines against a backend that stopped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use greeter::{
    load::{self, Tally},
    server::{LocalGreeter, ServerTls},
};
use lb_client::{Channel, ClientTls};
use lb_server::{Config, LbServer};
use lookaside_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use lookaside_tests::local::{GreeterProcess, Listed, SourceFile, TARGET};
use lookaside_tls::{
    Reloading, ServerFiles,
    generate::{Ca, Validity},
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

/// The name backends' certificates carry: the service's DNS name.
const SERVICE_NAME: &str = "greeter.default.svc";

/// A CA and the files it issued, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new(ca_name: &str) -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new(ca_name).unwrap(),
        };
        std::fs::write(pki.path("ca.crt"), pki.ca.cert()).unwrap();
        pki.issue("client", &["client.test"]);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `NAME.crt`/`NAME.key` for `names`, replacing both by rename
    /// (each file changes atomically, as a rotation writes them).
    fn issue(&self, name: &str, names: &[&str]) {
        let staging = self.dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        self.ca.issue(names).unwrap().write(&staging, name).unwrap();
        for ext in ["crt", "key"] {
            let file = format!("{name}.{ext}");
            std::fs::rename(staging.join(&file), self.path(&file)).unwrap();
        }
    }

    fn server_files(&self, name: &str) -> ServerFiles {
        ServerFiles {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            client_ca: Some(self.path("ca.crt")),
        }
    }

    fn client(&self) -> ClientTls {
        ClientTls::ca_file(self.path("ca.crt"))
            .identity(self.path("client.crt"), self.path("client.key"))
    }
}

/// A greeter backend serving mTLS from its own files, which it watches.
struct TlsBackend {
    greeter: LocalGreeter,
    tls: ServerTls,
    _watch: lookaside_tls::WatchHandle,
}

impl TlsBackend {
    async fn start(pki: &Pki, name: &str) -> Self {
        pki.issue(name, &[SERVICE_NAME]);
        let files = pki.server_files(name);
        let tls = Reloading::new(files.load().unwrap());
        let paths = files.paths();
        let watch = tls.watch(paths, move || files.load(), |_| {});
        let greeter = LocalGreeter::start_with(name, ([127, 0, 0, 1], 0).into(), Some(tls.clone()))
            .await
            .unwrap();
        Self {
            greeter,
            tls,
            _watch: watch,
        }
    }
}

/// lb-server in this process serving mTLS on a file source.
struct TlsLb {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TlsLb {
    async fn start(pki: &Pki, file: &SourceFile) -> Self {
        pki.issue("lb", &["localhost"]);
        let mut config = Config::for_file(file.path());
        config.file_poll_interval = Duration::from_millis(10);
        config.tls_cert = Some(pki.path("lb.crt"));
        config.tls_key = Some(pki.path("lb.key"));
        config.tls_client_ca = Some(pki.path("ca.crt"));
        let server = LbServer::bind(config).await.expect("bind lb-server");
        let addr = server.grpc_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// The URL clients use: the certificate names `localhost`.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, &mut self.task).await;
    }
}

/// The certificate (DER) a TLS server at `addr` presents for `name`.
async fn presented(addr: SocketAddr, name: &str, pki: &Pki) -> Vec<u8> {
    let config = lookaside_tls::ClientFiles {
        roots: lookaside_tls::Roots::File(pki.path("ca.crt")),
        identity: Some((pki.path("client.crt"), pki.path("client.key"))),
    }
    .load()
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn first_cert(path: &Path) -> Vec<u8> {
    lookaside_tls::pem::certificates(path).unwrap()[0].to_vec()
}

/// Waits until `check` holds, polling every 5 ms, for at most [`WAIT`].
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn listed(backends: &[&TlsBackend]) -> Vec<Listed> {
    backends
        .iter()
        .map(|b| Listed::of_addr(b.greeter.addr, &b.greeter.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_fails_no_call_across_a_rotation_of_every_backend_and_of_lb_server() {
    let pki = Pki::new("lookaside e2e CA");
    let backends = [
        TlsBackend::start(&pki, "b1").await,
        TlsBackend::start(&pki, "b2").await,
    ];
    let file = SourceFile::new(&listed(&[&backends[0], &backends[1]]));
    let lb = TlsLb::start(&pki, &file).await;
    let channel = Channel::builder(TARGET)
        .lb(lb.url())
        .tls(pki.client())
        .connect()
        .await
        .unwrap();
    until("both backends connected over mTLS", || {
        channel.endpoints().iter().filter(|e| e.connected).count() == 2
    })
    .await;

    let tally = Tally::new(8);
    let stop = CancellationToken::new();
    let traffic = tokio::spawn(load::run(
        GreeterClient::new(channel.clone()),
        None,
        8,
        tally.clone(),
        stop.clone(),
    ));
    let lb_errors = channel.stats().lb_errors;
    let calls = |tally: &Tally| tally.counts().backends.values().sum::<u64>();
    let before = calls(&tally);
    until("traffic flows", || calls(&tally) > before + 100).await;

    // Rotate every certificate the servers present, while calls run.
    let old: Vec<_> = backends.iter().map(|b| b.tls.current()).collect();
    for backend in &backends {
        pki.issue(&backend.greeter.name, &[SERVICE_NAME]);
    }
    pki.issue("lb", &["localhost"]);
    until("every backend reloaded", || {
        backends
            .iter()
            .zip(&old)
            .all(|(b, old)| !Arc::ptr_eq(&b.tls.current(), old))
    })
    .await;
    for backend in &backends {
        let path = pki.path(&format!("{}.crt", backend.greeter.name));
        assert_eq!(
            presented(backend.greeter.addr, SERVICE_NAME, &pki).await,
            first_cert(&path),
            "{} presents its new certificate",
            backend.greeter.name
        );
    }
    let deadline = Instant::now() + WAIT;
    while presented(lb.addr, "localhost", &pki).await != first_cert(&pki.path("lb.crt")) {
        assert!(
            Instant::now() < deadline,
            "lb-server took its new certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The Watch opened before the rotation still delivers updates.
    let b3 = TlsBackend::start(&pki, "b3").await;
    file.write(&listed(&[&backends[0], &backends[1], &b3]));
    until("the new backend arrives on the open Watch", || {
        channel
            .endpoints()
            .iter()
            .any(|e| e.addr == b3.greeter.addr && e.connected)
    })
    .await;
    assert_eq!(
        channel.stats().lb_errors,
        lb_errors,
        "the Watch stayed open across lb-server's rotation"
    );

    // New connections (a fresh channel) verify the rotated certificates.
    let fresh = Channel::builder(TARGET)
        .lb(lb.url())
        .tls(pki.client())
        .connect()
        .await
        .unwrap();
    let reply = GreeterClient::new(fresh)
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap();
    assert!(!reply.into_inner().backend.is_empty());

    let before = calls(&tally);
    until("traffic flows after the rotation", || {
        calls(&tally) > before + 100
    })
    .await;
    stop.cancel();
    traffic.await.unwrap();
    let counts = tally.counts();
    assert!(
        counts.errors.is_empty(),
        "no call failed: {:?}",
        counts.errors
    );
    lb.stop().await;
    for backend in backends.into_iter().chain([b3]) {
        backend.greeter.stop().await.unwrap();
    }
}

/// The error a call through a channel to the single backend `addr` gets.
async fn call_error(addr: SocketAddr, tls: ClientTls) -> tonic::Status {
    // No LB server answers (port 1 refuses): the fallback lists the backend.
    let channel = Channel::builder(TARGET)
        .lb("http://127.0.0.1:1")
        .fallback(addr.to_string())
        .tls(tls)
        .connect()
        .await
        .unwrap();
    GreeterClient::new(channel)
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_handshake_failure_names_the_endpoint_and_the_tls_reason() {
    let pki = Pki::new("lookaside e2e CA");
    let other = Pki::new("another CA");
    let start = |pki: &Pki, name: &str, names: &[&str], validity: Validity| {
        let staging = pki.dir.path();
        pki.ca
            .issue_with(names, validity)
            .unwrap()
            .write(staging, name)
            .unwrap();
        Reloading::new(
            ServerFiles {
                cert: pki.path(&format!("{name}.crt")),
                key: pki.path(&format!("{name}.key")),
                client_ca: None,
            }
            .load()
            .or_else(|_| {
                // An expired certificate does not load through the checks;
                // build the server configuration without them.
                expired_config(pki, name)
            })
            .unwrap(),
        )
    };
    let cases = [
        (
            "unknown CA",
            start(&other, "x", &[SERVICE_NAME], Validity::Current),
            "UnknownIssuer",
        ),
        (
            "name mismatch",
            start(&pki, "y", &["other.svc"], Validity::Current),
            "not valid for name",
        ),
        (
            "expired",
            start(&pki, "z", &[SERVICE_NAME], Validity::Expired),
            "expired",
        ),
    ];
    for (what, tls, reason) in cases {
        let backend = LocalGreeter::start_with(what, ([127, 0, 0, 1], 0).into(), Some(tls))
            .await
            .unwrap();
        let status = call_error(backend.addr, ClientTls::ca_file(pki.path("ca.crt"))).await;
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        let message = status.message();
        assert!(
            message.contains(&backend.addr.to_string()) && message.contains("TLS handshake"),
            "{what}: the message names the endpoint and the TLS step: {message}"
        );
        assert!(message.contains(reason), "{what}: says {reason}: {message}");
        backend.stop().await.unwrap();
    }
    // A plaintext backend: the handshake fails too, and says so.
    let plain = LocalGreeter::start("plain", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let status = call_error(plain.addr, ClientTls::ca_file(pki.path("ca.crt"))).await;
    let message = status.message();
    assert!(
        message.contains(&plain.addr.to_string()) && message.contains("TLS handshake"),
        "plaintext peer: {message}"
    );
    plain.stop().await.unwrap();
}

/// A server configuration from `NAME.crt`/`NAME.key` without the validity
/// check (to serve an expired certificate on purpose).
fn expired_config(pki: &Pki, name: &str) -> Result<tokio_rustls::rustls::ServerConfig, ()> {
    let chain = lookaside_tls::pem::certificates(&pki.path(&format!("{name}.crt"))).unwrap();
    let key = lookaside_tls::pem::private_key(&pki.path(&format!("{name}.key"))).unwrap();
    let mut config =
        tokio_rustls::rustls::ServerConfig::builder_with_provider(lookaside_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_answering_fails_calls_at_their_deadline_and_is_ejected_after_a_streak()
 {
    let stopped = GreeterProcess::start("stopped", &[]);
    let alive = LocalGreeter::start("alive", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let file = SourceFile::new(&[
        Listed::of_addr(stopped.addr, "stopped"),
        Listed::of_addr(alive.addr, "alive"),
    ]);
    let lb = lookaside_tests::local::InProcessLb::start(&file).await;
    let channel = Channel::builder(TARGET)
        .lb(lb.url())
        .connect()
        .await
        .unwrap();
    until("both backends connected", || {
        channel.endpoints().iter().filter(|e| e.connected).count() == 2
    })
    .await;
    let mut client = GreeterClient::new(channel.clone());
    stopped.signal("-STOP");

    const DEADLINE: Duration = Duration::from_millis(300);
    let call = |client: &mut GreeterClient<Channel>| {
        let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
        request.set_timeout(DEADLINE);
        let mut client = client.clone();
        async move { client.say_hello(request).await }
    };
    // Round-robin sends every other call to the stopped backend. Each of
    // them fails at its deadline; one passed deadline is not enough to eject
    // an endpoint (a healthy backend may have one slow call), a streak of
    // them with no answer between is: the stopped backend is ejected after
    // the default streak of 5 and the calls after it go to the live one.
    const STREAK: usize = 5;
    let ejected = |channel: &Channel| {
        channel
            .endpoints()
            .iter()
            .any(|e| e.addr == stopped.addr && e.ejected)
    };
    let mut failures = 0;
    for _ in 0..4 * STREAK {
        if ejected(&channel) {
            break;
        }
        let started = Instant::now();
        let Err(status) = call(&mut client).await else {
            continue;
        };
        let took = started.elapsed();
        failures += 1;
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            took >= DEADLINE && took < DEADLINE + Duration::from_millis(100),
            "ended at its deadline: {took:?}"
        );
        assert!(
            status.message().contains(&stopped.addr.to_string()),
            "{status:?}"
        );
        assert_eq!(
            ejected(&channel),
            failures == STREAK,
            "ejected at the end of the streak, not before: {failures} failures"
        );
    }
    assert_eq!(failures, STREAK, "the stopped backend was ejected");
    // Ejected: the next calls all go to the backend that answers.
    for _ in 0..20 {
        let reply = call(&mut client).await.expect("the live backend answers");
        assert_eq!(reply.into_inner().backend, "alive");
    }
    drop(stopped);
    lb.stop().await;
    alive.stop().await.unwrap();
}
