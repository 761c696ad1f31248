//! The greeter binaries as a user runs them: greeter-server's SIGTERM drain,
//! greeter-client's modes and its `--json` summary (in plaintext and over
//! mTLS), and the demo (in plaintext and over mTLS, with its slow-backend
//! phase run on greeter-server processes).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use greeter::demo::{self, DemoOptions};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A greeter-server process, killed on drop if still running.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["--listen", "127.0.0.1:0", "--name", name])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("a log line").unwrap();
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_greeter-client"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn greeter_server_reports_serving_then_drains_and_exits_on_sigterm() {
    let mut server = Server::start("pod-a");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let greeter = lookaside_proto::helloworld::greeter_client::GreeterClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let reply = greeter
        .clone()
        .say_hello(lookaside_proto::helloworld::HelloRequest { name: "x".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.backend, "pod-a");
    assert!(reply.message.contains("pod-a"));

    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Health watchers hear NOT_SERVING before the server goes away.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    if let Ok(Some(update)) = next {
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
    // With no call left in flight, it exits well before its 10 s drain timeout.
    drop(watch);
    drop(health);
    drop(greeter);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "greeter-server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn greeter_client_direct_and_dns_modes_print_a_json_summary() {
    let a = Server::start("a");
    let b = Server::start("b");
    let output = client(&[
        "--direct",
        &a.addr.to_string(),
        "--calls",
        "200",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["calls"], 200);
    assert_eq!(summary["ok"], 200);
    assert_eq!(summary["backends"]["a"], 200);
    assert!(summary["errors"].as_object().unwrap().is_empty());
    for key in ["p50", "p90", "p99", "max"] {
        assert!(summary["latency_ms"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(summary["rps"].as_f64().unwrap() > 0.0);

    // DNS mode: every address the name resolves to (here one, localhost's).
    let output = client(&[
        "--dns",
        &format!("localhost:{}", b.addr.port()),
        "--calls",
        "50",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["backends"]["b"], 50);

    // The table form names the backend and its share.
    let output = client(&["--direct", &b.addr.to_string(), "--calls", "20"]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("b ") && table.contains("100.00%"), "{table}");
    assert!(table.contains("latency ms: p50"), "{table}");
}

#[test]
fn greeter_client_reports_errors_by_code_and_exits_non_zero() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = client(&[
        "--lb",
        &format!("http://{closed}"),
        "--calls",
        "5",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["errors"]["Unavailable"], 5);
    assert_eq!(summary["ok"], 0);
    let usage = client(&["--calls", "5"]);
    assert!(!usage.status.success());
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--lb"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_pinning_then_balance_scale_up_and_drain_without_failures() {
    let options = DemoOptions {
        phase: Duration::from_millis(600),
        concurrency: 4,
        baseline_calls: 500,
        tls: false,
        greeter_server: Some(env!("CARGO_BIN_EXE_greeter-server").into()),
    };
    let mut printed = String::new();
    let report = demo::run(options, |text| printed.push_str(text))
        .await
        .unwrap();
    assert_eq!(
        report.baseline.backends.len(),
        1,
        "one channel pins every call"
    );
    assert_eq!(report.failed(), 0, "{printed}");
    let shares = |i: usize| report.phases[i].1.backends.clone();
    assert_eq!(shares(0).len(), 3, "{printed}");
    assert!(shares(1).contains_key("backend-4"), "{printed}");
    let drain = shares(2);
    let total: u64 = drain.values().sum();
    let on_drained = drain.get("backend-2").copied().unwrap_or(0);
    assert!(
        on_drained * 20 < total,
        "backend-2 kept {on_drained} of {total} calls while draining"
    );
    assert!(!shares(3).contains_key("backend-2"), "{printed}");
    assert!(printed.contains("failed calls: 0"));

    // One backend slow: WRR, from the backends' own load reports, sends it
    // well under round-robin's third.
    let slow = report.slow.as_ref().expect("the slow-backend phase ran");
    let (rr, wrr) = (
        slow.slow_share(&slow.round_robin),
        slow.slow_share(&slow.wrr),
    );
    assert!(rr > 0.30, "round-robin gave slow-3 {rr:.3}:\n{printed}");
    assert!(wrr < 0.25, "WRR gave slow-3 {wrr:.3}:\n{printed}");
    assert_eq!(slow.round_robin.backends.len(), 3, "{printed}");
    assert!(slow.wrr.ok > 0 && slow.round_robin.ok > 0, "{printed}");
    assert!(printed.contains("weighted round robin"), "{printed}");
    assert!(printed.contains("slow-3's share"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_skips_the_slow_backend_phase_without_greeter_server_and_says_how_to_build_it() {
    let options = DemoOptions {
        phase: Duration::from_millis(200),
        concurrency: 2,
        baseline_calls: 50,
        tls: false,
        greeter_server: Some("/nonexistent/greeter-server".into()),
    };
    let mut printed = String::new();
    let report = demo::run(options, |text| printed.push_str(text))
        .await
        .unwrap();
    assert!(report.slow.is_none(), "{printed}");
    assert_eq!(report.failed(), 0, "{printed}");
    assert!(
        printed.contains("cargo build --release -p greeter --bins"),
        "{printed}"
    );
}

#[tokio::test]
async fn max_connection_age_closes_connections_so_dns_clients_re_resolve() {
    let server = Server::start_with("aged", &["--max-connection-age", "0.3"]);
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (_sender, connection) = hyper::client::conn::http2::handshake::<_, _, tonic::body::Body>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let opened = std::time::Instant::now();
    // The server ends the connection (GOAWAY) once it is 0.3 s old.
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the server closes an aged connection")
        .expect("a graceful close");
    assert!(
        opened.elapsed() >= Duration::from_millis(250),
        "{:?}",
        opened.elapsed()
    );
}

/// A CA and what it issued, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: lookaside_tls::generate::Ca,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca: lookaside_tls::generate::Ca::new("greeter test CA").unwrap(),
        };
        std::fs::write(pki.path("ca.crt"), pki.ca.cert()).unwrap();
        pki.issue("client", &["client.test"]);
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    fn issue(&self, name: &str, names: &[&str]) {
        self.ca
            .issue(names)
            .unwrap()
            .write(self.dir.path(), name)
            .unwrap();
    }

    /// greeter-server flags serving `name`'s certificate, requiring clients'.
    fn server_flags(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path(&format!("{name}.crt")),
            "--tls-key".into(),
            self.path(&format!("{name}.key")),
            "--tls-client-ca".into(),
            self.path("ca.crt"),
        ]
    }

    /// greeter-client flags: trust the CA, present the client certificate.
    fn client_flags(&self) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.path("ca.crt"),
            "--tls-cert".into(),
            self.path("client.crt"),
            "--tls-key".into(),
            self.path("client.key"),
        ]
    }
}

#[test]
fn greeter_client_dns_mode_calls_mtls_greeters_verifying_the_resolved_name() {
    let pki = Pki::new();
    // A pod's certificate names the DNS name clients resolve, not its IP.
    pki.issue("named", &["localhost"]);
    pki.issue("service", &["greeter.default.svc"]);
    let named = Server::start_with(
        "named",
        &pki.server_flags("named")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let service = Server::start_with(
        "service",
        &pki.server_flags("service")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let dns = |server: &Server, extra: &[&str]| {
        let target = format!("localhost:{}", server.addr.port());
        let mut args = vec![
            "--dns",
            &target,
            "--calls",
            "40",
            "--concurrency",
            "4",
            "--json",
        ];
        let tls = pki.client_flags();
        args.extend(tls.iter().map(String::as_str));
        args.extend(extra);
        let output = client(&args);
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
        (output.status.code(), summary)
    };

    // The name verified is the one resolved: `localhost`.
    let (code, summary) = dns(&named, &[]);
    assert_eq!(code, Some(0), "{summary}");
    assert_eq!(summary["backends"]["named"], 40, "{summary}");

    // A certificate without that name is refused: every call fails...
    let (code, summary) = dns(&service, &[]);
    assert_eq!(code, Some(2), "{summary}");
    assert_eq!(summary["ok"], 0, "{summary}");
    assert_eq!(summary["errors"]["Unavailable"], 40, "{summary}");
    // ... unless --tls-server-name says which name to expect.
    let (code, summary) = dns(&service, &["--tls-server-name", "greeter.default.svc"]);
    assert_eq!(code, Some(0), "{summary}");
    assert_eq!(summary["backends"]["service"], 40, "{summary}");

    // Without a client certificate the server refuses the handshake; in
    // plaintext it refuses the connection.
    let target = format!("localhost:{}", named.addr.port());
    let ca = pki.path("ca.crt");
    for args in [
        vec!["--dns", &target, "--calls", "3", "--json", "--tls-ca", &ca],
        vec!["--dns", &target, "--calls", "3", "--json"],
    ] {
        let output = client(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(summary["ok"], 0, "{args:?}: {summary}");
    }
}

/// `future`'s output; panics naming `what` if it takes over 10 s.
async fn within_10s<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 10 s"))
}

/// What a user reaches with the command `demo --tls` prints, and who is
/// refused, checked while the demo holds its servers up.
async fn probe_tls_demo(printed: &str) {
    use greeter::client::{self, Tls};
    use lookaside_proto::{
        helloworld::{HelloRequest, greeter_client::GreeterClient},
        lookaside::v1::{ListServicesRequest, admin_client::AdminClient},
    };
    use lookaside_tls::{ClientFiles, Roots};

    let command = printed
        .lines()
        .find_map(|line| line.trim().strip_prefix("grpcurl "))
        .unwrap_or_else(|| panic!("no grpcurl command in:\n{printed}"));
    let words: Vec<&str> = command.split_whitespace().collect();
    let flag = |name: &str| {
        let at = words.iter().position(|w| *w == name).unwrap();
        std::path::PathBuf::from(words[at + 1])
    };
    let (ca, cert, key) = (flag("-cacert"), flag("-cert"), flag("-key"));
    let lb = words[words.len() - 2];
    assert_eq!(words[words.len() - 1], "lookaside.v1.Admin/ListServices");
    let backend_1 = printed
        .split("greeter backends on ")
        .nth(1)
        .and_then(|rest| rest.split([',', '\n']).next())
        .unwrap()
        .trim();
    let tls = |identity: bool, server_name: Option<&str>| Tls {
        files: ClientFiles {
            roots: Roots::File(ca.clone()),
            identity: identity.then(|| (cert.clone(), key.clone())),
        },
        server_name: server_name.map(str::to_owned),
    };
    let list = async |tls: Option<Tls>| -> anyhow::Result<String> {
        let channel = client::direct(lb, tls.as_ref()).await?;
        let reply = AdminClient::new(channel)
            .list_services(ListServicesRequest::default())
            .await?;
        Ok(format!("{:?}", reply.into_inner()))
    };
    let hello = async |tls: Option<Tls>| -> anyhow::Result<String> {
        let channel = client::direct(backend_1, tls.as_ref()).await?;
        let reply = GreeterClient::new(channel)
            .say_hello(HelloRequest {
                name: "probe".into(),
            })
            .await?;
        Ok(reply.into_inner().backend)
    };

    // What the printed command does: verify lb-server as its address, present the client certificate.
    let services = within_10s("ListServices", list(Some(tls(true, None))))
        .await
        .expect("ListServices over mTLS with the printed files");
    assert!(services.contains("greeter.default:grpc"), "{services}");
    for (what, tls) in [
        ("plaintext", None),
        ("TLS without a client certificate", Some(tls(false, None))),
    ] {
        let refused = within_10s(what, list(tls)).await;
        assert!(refused.is_err(), "lb-server answered {what}");
    }
    // The backends serve only mTLS, as the service's name.
    let named = within_10s(
        "SayHello",
        hello(Some(tls(true, Some("greeter.default.svc")))),
    )
    .await
    .expect("SayHello over mTLS");
    assert_eq!(named, "backend-1");
    for (what, tls) in [
        ("plaintext", None),
        (
            "TLS without a client certificate",
            Some(tls(false, Some("greeter.default.svc"))),
        ),
    ] {
        let refused = within_10s(what, hello(tls)).await;
        assert!(refused.is_err(), "backend-1 answered {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_demo_balances_over_mtls_and_removes_its_certificates_at_the_end() {
    let options = DemoOptions {
        phase: Duration::from_millis(600),
        concurrency: 4,
        baseline_calls: 500,
        tls: true,
        greeter_server: Some(env!("CARGO_BIN_EXE_greeter-server").into()),
    };
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let hold = {
        let printed = printed.clone();
        async move {
            let text = printed.lock().unwrap().clone();
            probe_tls_demo(&text).await;
        }
    };
    let report = demo::run_holding(options, |text| printed.lock().unwrap().push_str(text), hold)
        .await
        .unwrap();
    let printed = printed.lock().unwrap().clone();
    assert_eq!(report.baseline.backends.len(), 1, "{printed}");
    assert_eq!(report.failed(), 0, "{printed}");
    let first = &report.phases[0].1.backends;
    assert_eq!(first.len(), 3, "{printed}");
    let total: u64 = first.values().sum();
    assert!(
        first.values().all(|n| n * 4 > total),
        "each of 3 backends gets over a quarter of the calls: {first:?}"
    );
    assert!(
        report.phases[1].1.backends.contains_key("backend-4"),
        "{printed}"
    );
    // The slow-backend phase's greeter-server processes serve mTLS too.
    let slow = report.slow.as_ref().expect("the slow-backend phase ran");
    assert_eq!(slow.round_robin.backends.len(), 3, "{printed}");
    assert!(slow.wrr.ok > 0, "{printed}");
    // The files are gone with the demo.
    let ca = printed
        .split("-cacert ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    let dir = std::path::Path::new(ca).parent().unwrap();
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[tokio::test]
async fn cross_zone_delay_applies_only_to_calls_that_name_another_zone() {
    use lookaside_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
    const DELAY: Duration = Duration::from_millis(300);
    let server = Server::start_with("z", &["--zone", "a", "--cross-zone-delay-us", "300000"]);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut greeter = GreeterClient::new(channel);
    let mut timed = async |zone: Option<&'static str>| {
        let mut request = tonic::Request::new(HelloRequest::default());
        if let Some(zone) = zone {
            request.metadata_mut().insert(
                greeter::server::CLIENT_ZONE_HEADER,
                tonic::metadata::MetadataValue::from_static(zone),
            );
        }
        let started = std::time::Instant::now();
        greeter.say_hello(request).await.unwrap();
        started.elapsed()
    };
    let from_b = timed(Some("b")).await;
    let from_a = timed(Some("a")).await;
    let unnamed = timed(None).await;
    assert!(from_b >= DELAY, "a call from zone b took {from_b:?}");
    assert!(from_a < DELAY, "a call from zone a took {from_a:?}");
    assert!(unnamed < DELAY, "a call naming no zone took {unnamed:?}");
}
