//! The limits that keep one client from exhausting lb-server: each test
//! reproduces an attack seen against the server (half-sent messages, streams
//! and connections that never send, connection floods) and shows the bound.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use common::{ServerProcess, TestServer, WAIT};
use futures::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ONE: &str = "services:\n  greeter.default:grpc:\n    - address: 10.0.0.1:50051\n";

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const WATCH: &str = "/lookaside.v1.Discovery/Watch";
const ADS: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// A bare HTTP/2 connection, to send what no well-behaved gRPC client would.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Opens a gRPC call on `path` and sends `data` without ending the stream.
async fn open_call(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    data: Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://lb{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = client.clone().ready().await.unwrap();
    let (response, mut send) = ready.send_request(request, false).unwrap();
    if !data.is_empty() {
        send.send_data(data, false).unwrap();
    }
    (response, send)
}

/// A unary call on `path` with an empty request message.
async fn unary_call(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> h2::client::ResponseFuture {
    let (response, mut send) = open_call(client, path, Bytes::new()).await;
    send.send_data(partial_message(0, 0), true).unwrap();
    response
}

/// The 5-byte gRPC prefix of a message of `len` bytes, then `sent` bytes of it.
fn partial_message(len: u32, sent: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + sent);
    buf.put_u8(0);
    buf.put_u32(len);
    buf.put_bytes(b'x', sent);
    buf.freeze()
}

/// The `grpc-status` a call ended with (trailers-only or trailers).
async fn grpc_status(response: h2::client::ResponseFuture) -> (i32, String) {
    let response = response.await.unwrap();
    let get = |headers: &http::HeaderMap| {
        tonic::Status::from_header_map(headers)
            .map(|status| (status.code() as i32, status.message().to_owned()))
    };
    if let Some(status) = get(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    get(&trailers).expect("grpc-status in trailers")
}

fn metric(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map_or(0, |v| v.trim().parse().unwrap())
}

const RESOURCE_EXHAUSTED: i32 = 8;
const DEADLINE_EXCEEDED: i32 = 4;

#[tokio::test]
async fn a_message_over_its_limit_is_refused_from_its_prefix() {
    let server = TestServer::start(ONE).await;
    let mut client = h2_connect(server.grpc).await;
    // The attack: 4,000,000 bytes declared, a few sent. Refused at once,
    // not after the rest arrives.
    let (response, _send) =
        open_call(&mut client, HEALTH_CHECK, partial_message(4_000_000, 10)).await;
    let (code, message) = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap();
    assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
    assert!(message.contains("limit of 65536 bytes"), "{message}");
    // ADS takes larger requests, up to its own limit.
    let (response, _send) = open_call(&mut client, ADS, partial_message(64 << 20, 10)).await;
    let (code, message) = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap();
    assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "lookaside_rejected_requests_total{api=\"health\",reason=\"too_large\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &metrics,
            "lookaside_rejected_requests_total{api=\"xds\",reason=\"too_large\"}"
        ),
        1
    );
    server.shutdown().await.unwrap();
}

/// Opens `calls` Health/Check calls on one connection, each declaring a
/// 60,000-byte message and sending all but its last byte, and returns how
/// many were refused (waiting until `refusals` are).
async fn half_sent_calls(
    addr: SocketAddr,
    calls: usize,
    refusals: usize,
) -> (h2::client::SendRequest<Bytes>, Vec<h2::SendStream<Bytes>>) {
    let mut client = h2_connect(addr).await;
    let response = unary_call(&mut client, HEALTH_CHECK).await;
    let _ = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    let mut responses = FuturesUnordered::new();
    let mut sends = Vec::new();
    for _ in 0..calls {
        let (response, send) =
            open_call(&mut client, HEALTH_CHECK, partial_message(60_000, 59_999)).await;
        responses.push(grpc_status(response));
        sends.push(send);
    }
    for _ in 0..refusals {
        let (code, message) = tokio::time::timeout(WAIT, responses.next())
            .await
            .expect("a refusal")
            .unwrap();
        assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
    }
    (client, sends)
}

#[tokio::test]
async fn half_sent_messages_are_bounded_per_connection() {
    let server = TestServer::start_with(ONE, |config| {
        config.request_timeout = Duration::from_secs(60);
    })
    .await;
    // 2 MiB per connection hold 34 messages of 60,000 bytes: of 40 calls, 6
    // are refused, and the rest wait for their last byte.
    let (client, sends) = half_sent_calls(server.grpc, 40, 6).await;
    let key =
        "lookaside_rejected_requests_total{api=\"health\",reason=\"connection_request_memory\"}";
    assert_eq!(metric(&server.metrics().await, key), 6);
    // Another connection has its own share.
    let (other, other_sends) = half_sent_calls(server.grpc, 40, 6).await;
    assert_eq!(metric(&server.metrics().await, key), 12);
    // A connection's share comes back when its calls end.
    drop((client, sends, other, other_sends));
    let (client, sends) = half_sent_calls(server.grpc, 40, 6).await;
    assert_eq!(metric(&server.metrics().await, key), 18);
    // Shutdown waits for calls in flight; these would hold it for 60 s.
    drop((client, sends));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn half_sent_messages_are_bounded_for_the_whole_server() {
    let server = TestServer::start_with(ONE, |config| {
        config.request_timeout = Duration::from_secs(60);
        config.request_memory = 1 << 20;
    })
    .await;
    // 1 MiB holds 17 messages of 60,000 bytes over all connections.
    let a = half_sent_calls(server.grpc, 10, 0).await;
    let b = half_sent_calls(server.grpc, 10, 3).await;
    let metrics = server.metrics().await;
    let key = "lookaside_rejected_requests_total{api=\"health\",reason=\"request_memory\"}";
    assert_eq!(metric(&metrics, key), 3, "{metrics}");
    drop((a, b));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connection_may_open_only_so_many_streams() {
    let server = TestServer::start(ONE).await;
    let mut client = h2_connect(server.grpc).await;
    // The server's SETTINGS arrive before the first response.
    let response = unary_call(&mut client, HEALTH_CHECK).await;
    let _ = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    assert_eq!(client.current_max_send_streams(), 100);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn streams_that_never_send_their_request_are_closed() {
    let server = TestServer::start_with(ONE, |config| {
        config.request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = h2_connect(server.grpc).await;
    for path in [WATCH, ADS, HEALTH_CHECK] {
        let (response, _send) = open_call(&mut client, path, Bytes::new()).await;
        let (code, message) = tokio::time::timeout(WAIT, grpc_status(response))
            .await
            .unwrap();
        assert_eq!(code, DEADLINE_EXCEEDED, "{path}: {message}");
    }
    // A message begun and never finished is cut too.
    let (response, _send) = open_call(&mut client, WATCH, partial_message(100, 50)).await;
    let (code, _) = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap();
    assert_eq!(code, DEADLINE_EXCEEDED);
    let metrics = server.metrics().await;
    for api in ["discovery", "xds", "health"] {
        let key = format!(
            "lookaside_rejected_requests_total{{api=\"{api}\",reason=\"request_timeout\"}}"
        );
        assert!(metric(&metrics, &key) >= 1, "{key} in {metrics}");
    }
    // A Watch that sent its request is not cut by the timeout: it outlives
    // it and still gets the next change.
    let mut watch = common::watch_greeter(server.channel().await).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    server.write_file("services:\n  greeter.default:grpc:\n    - address: 10.0.0.2:50051\n");
    let update = common::next_update(&mut watch).await;
    assert_eq!(update.endpoints[0].address, "10.0.0.2");
    server.shutdown().await.unwrap();
}

/// True once the server closed `tcp` (EOF or reset).
async fn closed(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn connections_that_never_finish_their_handshake_are_closed() {
    let server = TestServer::start_with(ONE, |config| {
        config.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // Connects and sends nothing.
    let mut silent = TcpStream::connect(server.grpc).await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, closed(&mut silent))
            .await
            .unwrap()
    );
    // Sends something that is not HTTP/2.
    let mut http1 = TcpStream::connect(server.grpc).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(WAIT, closed(&mut http1))
            .await
            .unwrap()
    );
    let metrics = server.metrics().await;
    for reason in ["handshake_timeout", "not_http2"] {
        let key = format!(
            "lookaside_rejected_connections_total{{listener=\"grpc\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(&metrics, &key), 1, "{key}: {metrics}");
    }
    // A real client is served meanwhile and after.
    let _ = server.subscribers().await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_and_slots_come_back() {
    let server = TestServer::start_with(ONE, |config| {
        config.max_connections = 2;
    })
    .await;
    let first = h2_connect(server.grpc).await;
    let mut second = h2_connect(server.grpc).await;
    // Both are served (a call answers on each).
    let response = unary_call(&mut second, HEALTH_CHECK).await;
    let _ = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    let mut third = TcpStream::connect(server.grpc).await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, closed(&mut third))
            .await
            .unwrap()
    );
    let key = "lookaside_rejected_connections_total{listener=\"grpc\",reason=\"max_connections\"}";
    assert_eq!(metric(&server.metrics().await, key), 1);
    // A closed connection frees its slot.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut client = h2_connect(server.grpc).await;
        let response = unary_call(&mut client, HEALTH_CHECK).await;
        if tokio::time::timeout(Duration::from_millis(500), response)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_metrics_port_closes_idle_connections() {
    let server = TestServer::start_with(ONE, |config| {
        config.metrics_header_timeout = Duration::from_millis(300);
    })
    .await;
    let mut idle = TcpStream::connect(server.http).await.unwrap();
    assert!(tokio::time::timeout(WAIT, closed(&mut idle)).await.unwrap());
    // Half a request line, never finished.
    let mut slow = TcpStream::connect(server.http).await.unwrap();
    slow.write_all(b"GET /metr").await.unwrap();
    assert!(tokio::time::timeout(WAIT, closed(&mut slow)).await.unwrap());
    assert_eq!(server.http_get("/healthz").await.0, 200);
    server.shutdown().await.unwrap();
}

/// The attack from the hardening issue against the release binary: one
/// connection with 300 calls each declaring 4,000,000 bytes and sending all
/// but the last byte took lb-server from 9 MB to 1.18 GB. Now each is
/// refused from its prefix, and calls that stay under the message limit are
/// held to the connection's share.
#[tokio::test]
async fn half_sent_messages_leave_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(&file, ONE).unwrap();
    let server = ServerProcess::start(&file, &["--request-timeout", "60s"]);
    let before = server.rss();
    let mut client = h2_connect(server.grpc).await;
    // Once the server's SETTINGS are in, the client keeps to its 100 streams.
    let response = unary_call(&mut client, HEALTH_CHECK).await;
    let _ = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    let mut refused = FuturesUnordered::new();
    let mut sends = Vec::new();
    for _ in 0..300 {
        let (response, send) = open_call(
            &mut client,
            HEALTH_CHECK,
            partial_message(4_000_000, 16_000),
        )
        .await;
        refused.push(grpc_status(response));
        sends.push(send);
    }
    for _ in 0..300 {
        let (code, message) = tokio::time::timeout(WAIT, refused.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
    }
    // Calls under the message limit: 10 connections × 100 calls × 60,000
    // declared bytes would be 60 MB; each connection holds 34 of them (its
    // 2 MiB share) and the other 66 are refused.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(half_sent_calls(server.grpc, 100, 66).await);
    }
    let during = server.rss();
    let growth = during.saturating_sub(before);
    println!(
        "RSS before {} KiB, under attack {} KiB, growth {} KiB",
        before / 1024,
        during / 1024,
        growth / 1024
    );
    // The 340 held messages are 20 MB of data the clients really sent.
    assert!(growth < 48 << 20, "lb-server grew by {} KiB", growth / 1024);
    drop((client, sends, held));
}

/// Runs the binary with `args` until it exits; its exit code and stderr.
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lb-server"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn a_start_up_error_says_its_cause_once() {
    let (code, stderr) = run_to_exit(&[], &[("KUBECONFIG", "/nonexistent/kubeconfig")]);
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap();
    assert!(
        line.starts_with("lb-server: error: no Kubernetes configuration"),
        "{line}"
    );
    assert_eq!(line.matches("/nonexistent/kubeconfig").count(), 1, "{line}");
    assert_eq!(line.matches("os error 2").count(), 1, "{line}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(&file, ONE).unwrap();
    let file = file.to_str().unwrap();
    let (code, stderr) = run_to_exit(
        &[
            "--source",
            "file",
            "--file",
            file,
            "--tls-cert",
            "/nonexistent.crt",
            "--tls-key",
            "/k",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap();
    assert_eq!(
        line,
        "lb-server: error: TLS: cannot read /nonexistent.crt: No such file or directory (os error 2)"
    );
}

#[tokio::test]
async fn a_shutdown_with_calls_still_in_flight_at_its_deadline_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(&file, ONE).unwrap();
    let mut server = ServerProcess::start(
        &file,
        &["--shutdown-timeout", "300ms", "--request-timeout", "60s"],
    );
    let mut client = h2_connect(server.grpc).await;
    let response = unary_call(&mut client, HEALTH_CHECK).await;
    let _ = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    // A call whose request never completes is in flight until its client goes.
    let (_response, _send) = open_call(&mut client, HEALTH_CHECK, partial_message(100, 10)).await;
    // Wait until the server holds it: a second call on the same connection
    // is answered after the first was taken up.
    let response = unary_call(&mut client, HEALTH_CHECK).await;
    let _ = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lb-server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
}

/// The gRPC port queues a reconnecting fleet's SYNs: its listen backlog is
/// `GRPC_BACKLOG` (or the kernel's `somaxconn`, if lower), not the standard
/// library's 128. `ss` reports a listening socket's backlog as its Send-Q.
#[tokio::test]
async fn the_grpc_port_listens_with_a_backlog_for_a_fleet() {
    let server = TestServer::start(ONE).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let output = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", server.grpc.port())])
        .output()
        .expect("ss (iproute2) lists listening sockets");
    let text = String::from_utf8_lossy(&output.stdout);
    // State, Recv-Q, Send-Q (the backlog), local address, peer address.
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket in {text:?}"));
    assert_eq!(
        backlog,
        lb_server::server::GRPC_BACKLOG.min(somaxconn),
        "{text}"
    );
    server.shutdown().await.unwrap();
}
