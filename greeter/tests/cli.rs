//! The greeter binaries as a user runs them: greeter-server's SIGTERM drain,
//! greeter-client's modes and its `--json` summary, and the demo.

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
