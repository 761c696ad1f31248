//! lb-server's gRPC and HTTP APIs, driven over loopback through tonic clients.

use std::time::{Duration, Instant};

use lb_server::model::{Endpoint, parse_target};
use lookaside_proto::{
    grpclb::v1::{
        ClientStats, InitialLoadBalanceRequest, LoadBalanceRequest, load_balance_request,
        load_balance_response::LoadBalanceResponseType, load_balancer_client::LoadBalancerClient,
    },
    lookaside::v1::{
        GetServiceRequest, ListServicesRequest, WatchRequest, WatchResponse,
        admin_client::AdminClient, discovery_client::DiscoveryClient,
    },
};
use tonic::{Code, transport::Channel};

mod common;

use common::{TestServer, WAIT};

const TWO: &str = "services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50051\n      zone: zone-a\n      weight: 2\n    - address: 127.0.0.1:50052\n      draining: true\n";

async fn watch(
    channel: Channel,
    target: &str,
) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    let mut client = DiscoveryClient::new(channel);
    let request = WatchRequest {
        target: target.into(),
        ..Default::default()
    };
    Ok(client.watch(request).await?.into_inner())
}

async fn next(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an update in time")
        .unwrap()
        .expect("stream open")
}

#[tokio::test]
async fn watch_sends_the_snapshot_at_once_then_every_change() {
    let server = TestServer::start(TWO).await;
    let mut stream = watch(
        server.channel().await,
        "dns:///greeter.default.svc.cluster.local:grpc",
    )
    .await
    .unwrap();
    let first = next(&mut stream).await;
    assert!(first.exists);
    assert_eq!(first.target, "greeter.default:grpc");
    assert_eq!(first.endpoints.len(), 2);
    assert_eq!(first.endpoints[0].zone, "zone-a");
    assert_eq!(first.endpoints[0].weight, 2);
    assert!(first.endpoints[1].draining);

    server.write_file("services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50053\n");
    let second = next(&mut stream).await;
    assert!(second.version > first.version);
    assert_eq!(second.endpoints.len(), 1);
    assert_eq!(second.endpoints[0].port, 50053);

    server.write_file("services: {}\n");
    let gone = next(&mut stream).await;
    assert!(!gone.exists && gone.endpoints.is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_service_reads_exists_false_until_it_appears() {
    let server = TestServer::start(TWO).await;
    let mut stream = watch(server.channel().await, "late.default:8080")
        .await
        .unwrap();
    let first = next(&mut stream).await;
    assert!(!first.exists);
    server.write_file(&format!(
        "{TWO}  late.default:8080:\n    - address: 10.1.2.3:8080\n"
    ));
    let appeared = next(&mut stream).await;
    assert!(appeared.exists);
    assert_eq!(appeared.endpoints[0].address, "10.1.2.3");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_targets_are_invalid_argument_with_the_reason() {
    let server = TestServer::start(TWO).await;
    let channel = server.channel().await;
    for (target, reason) in [
        ("greeter", "missing port"),
        ("greeter.default:GRPC", "bad port"),
        ("http://greeter.default:grpc", "unsupported scheme"),
        (&"x".repeat(300), "limit is 255"),
    ] {
        let status = watch(channel.clone(), target).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{target}");
        assert!(status.message().contains(reason), "{}", status.message());
        let status = AdminClient::new(channel.clone())
            .get_service(GetServiceRequest {
                target: target.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    // A request far above the limit is refused before it is decoded, with
    // gRPC's code for a message over the receiver's limit.
    let status = watch(channel.clone(), &"x".repeat(100_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 65536 bytes"),
        "{status:?}"
    );
    let status = AdminClient::new(channel.clone())
        .get_service(GetServiceRequest {
            target: "nope.default:grpc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // A Watch call that ends without its request, and a method Discovery
    // does not have.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .streaming(
            tonic::Request::new(tokio_stream::empty::<WatchRequest>()),
            http::uri::PathAndQuery::from_static("/lookaside.v1.Discovery/Watch"),
            tonic_prost::ProstCodec::<WatchRequest, WatchResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(WatchRequest::default()),
            http::uri::PathAndQuery::from_static("/lookaside.v1.Discovery/Nope"),
            tonic_prost::ProstCodec::<WatchRequest, WatchResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // Everyone else is still served.
    let mut stream = watch(channel, "greeter.default:grpc").await.unwrap();
    assert!(next(&mut stream).await.exists);
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics
            .contains("lookaside_rejected_requests_total{api=\"discovery\",reason=\"too_long\"} 1")
    );
    assert!(
        metrics.contains(
            "lookaside_rejected_requests_total{api=\"discovery\",reason=\"too_large\"} 1"
        ),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_lists_services_and_subscribers() {
    let server = TestServer::start(TWO).await;
    let channel = server.channel().await;
    let mut stream = watch(channel.clone(), "greeter.default:grpc")
        .await
        .unwrap();
    let first = next(&mut stream).await;
    let mut admin = AdminClient::new(channel);
    let services = admin
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].target, "greeter.default:grpc");
    assert_eq!(
        (
            services[0].endpoints,
            services[0].draining,
            services[0].subscribers
        ),
        (2, 1, 1)
    );
    let subscribers = server.subscribers().await;
    assert_eq!(subscribers.len(), 1);
    assert_eq!(subscribers[0].protocol, "discovery");
    assert_eq!(subscribers[0].last_version_sent, first.version);
    assert!(subscribers[0].peer.starts_with("127.0.0.1:"));
    drop(stream);
    // The registry forgets a stream once the client has gone.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = server.subscribers().await;
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "subscriber still listed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown().await.unwrap();
}

fn initial(name: &str) -> LoadBalanceRequest {
    LoadBalanceRequest {
        load_balance_request_type: Some(
            load_balance_request::LoadBalanceRequestType::InitialRequest(
                InitialLoadBalanceRequest { name: name.into() },
            ),
        ),
    }
}

#[tokio::test]
async fn grpclb_sends_initial_response_then_server_lists_and_records_stats() {
    let server =
        TestServer::start_with(TWO, |c| c.grpclb_stats_interval = Duration::from_secs(2)).await;
    let channel = server.channel().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(initial("greeter.default:grpc")).await.unwrap();
    let mut responses = LoadBalancerClient::new(channel.clone())
        .balance_load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next_lb = async || {
        tokio::time::timeout(WAIT, responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .load_balance_response_type
            .unwrap()
    };
    let LoadBalanceResponseType::InitialResponse(initial_response) = next_lb().await else {
        panic!("initial_response first");
    };
    assert_eq!(
        initial_response
            .client_stats_report_interval
            .unwrap()
            .seconds,
        2
    );
    let LoadBalanceResponseType::ServerList(list) = next_lb().await else {
        panic!("then a server list");
    };
    // The draining endpoint is left out; a lone weight reduces to one entry.
    let ports: Vec<i32> = list.servers.iter().map(|s| s.port).collect();
    assert_eq!(ports, [50051]);
    assert_eq!(list.servers[0].ip_address, [127, 0, 0, 1]);

    tx.send(LoadBalanceRequest {
        load_balance_request_type: Some(load_balance_request::LoadBalanceRequestType::ClientStats(
            ClientStats {
                num_calls_started: 10,
                num_calls_finished: 9,
                num_calls_finished_known_received: 9,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    server.write_file("services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50055\n");
    let LoadBalanceResponseType::ServerList(list) = next_lb().await else {
        panic!("a new server list on change");
    };
    assert_eq!(list.servers.len(), 1);
    assert_eq!(list.servers[0].port, 50055);

    // A count that would overflow saturates; a negative one is refused
    // whole (it would lower the totals).
    for started in [i64::MAX, -5] {
        tx.send(LoadBalanceRequest {
            load_balance_request_type: Some(
                load_balance_request::LoadBalanceRequestType::ClientStats(ClientStats {
                    num_calls_started: started,
                    num_calls_finished: 1,
                    ..Default::default()
                }),
            ),
        })
        .await
        .unwrap();
    }
    let negative = "lookaside_rejected_requests_total{api=\"grpclb\",reason=\"negative_stats\"} 1";
    let deadline = Instant::now() + WAIT;
    while !server.metrics().await.contains(negative) {
        assert!(
            Instant::now() < deadline,
            "the negative report was never refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = server
        .subscribers()
        .await
        .iter()
        .find_map(|s| s.grpclb_stats)
        .expect("client stats recorded");
    assert_eq!(
        (
            stats.reports,
            stats.num_calls_started,
            stats.num_calls_finished
        ),
        (2, i64::MAX, 10)
    );
    let (_, metrics) = server.http_get("/metrics").await;
    let started: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lookaside_grpclb_client_calls_total{kind=\"started\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(started, 10.0 + i64::MAX as f64);
    assert!(metrics.contains("lookaside_subscribers{protocol=\"grpclb\"} 1"));
    assert!(metrics.contains("lookaside_push_latency_seconds_count{protocol=\"grpclb\"} 1"));
    drop(tx);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn grpclb_rejects_bad_names_and_falls_back_for_unknown_services() {
    let server = TestServer::start(TWO).await;
    let channel = server.channel().await;
    let mut client = LoadBalancerClient::new(channel);
    let long = format!("{}.default:grpc", "a".repeat(243));
    assert_eq!(long.len(), 256);
    for (name, reason) in [(long.as_str(), "under 256"), ("nonsense", "missing port")] {
        let status = client
            .balance_load(tokio_stream::iter([initial(name)]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(reason), "{}", status.message());
    }
    let status = client
        .balance_load(tokio_stream::iter([LoadBalanceRequest::default()]))
        .await
        .unwrap_err();
    assert!(status.message().contains("initial_request"));

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(initial("unknown.default:8080")).await.unwrap();
    let mut responses = client
        .balance_load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let _initial = responses.message().await.unwrap().unwrap();
    let fallback = responses.message().await.unwrap().unwrap();
    assert!(matches!(
        fallback.load_balance_response_type,
        Some(LoadBalanceResponseType::FallbackResponse(_))
    ));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_hold_up_anyone() {
    let shutdown_timeout = Duration::from_secs(2);
    let server =
        TestServer::start_with(TWO, |config| config.shutdown_timeout = shutdown_timeout).await;
    let key = parse_target("big.default:grpc").unwrap();
    let big = |round: u16| -> Vec<Endpoint> {
        (0..500u16)
            .map(|i| {
                Endpoint::new(
                    format!("10.{}.{}.{}", round % 250, i / 250, i % 250)
                        .parse()
                        .unwrap(),
                    8080,
                )
                .pod(format!("pod-with-a-long-name-{round}-{i}"))
            })
            .collect()
    };
    server.store.publish(&key, big(0), Instant::now());
    // A client that opens streams and never reads them: HTTP/2 flow control
    // stops the server's writes, and the store never queues for it. A small
    // stream window (64 KiB: two messages of this service) keeps what flow
    // control lets through while it stalls far below the versions published.
    let stalled_channel = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .connect()
        .await
        .unwrap();
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(
            watch(stalled_channel.clone(), "big.default:grpc")
                .await
                .unwrap(),
        );
    }
    let mut reader = watch(server.channel().await, "big.default:grpc")
        .await
        .unwrap();
    let mut last = next(&mut reader).await.version;
    for round in 1..=200u16 {
        server.store.publish(&key, big(round), Instant::now());
        let got = next(&mut reader).await;
        assert!(got.version > last);
        last = got.version;
        assert_eq!(got.endpoints.len(), 500);
    }
    // A stalled stream, once it reads, skips to the newest version: it gets
    // what its window held, at most one more, then the newest; not the 200.
    let stream = &mut stalled[0];
    let mut received = 0;
    let mut newest = 0;
    while newest < last {
        newest = next(stream).await.version;
        received += 1;
    }
    assert_eq!(newest, last);
    assert!(
        received <= 10,
        "a stalled stream read {received} messages to reach the newest of 200 versions"
    );
    let mut admin = AdminClient::new(server.channel().await);
    assert!(
        admin
            .list_services(ListServicesRequest::default())
            .await
            .is_ok()
    );
    // Nor does it hold up shutdown: the other stalled streams still hold
    // data their window has no room for, so their end cannot be written.
    // Their connection is closed at half the deadline, and the shutdown is
    // clean (an error would say calls were still in flight at the deadline).
    let started = Instant::now();
    server.shutdown().await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= shutdown_timeout / 2 && took < shutdown_timeout,
        "shutdown took {took:?}"
    );
    drop(stalled);
}

#[tokio::test]
async fn health_readiness_metrics_and_shutdown_end_streams_cleanly() {
    let server = TestServer::start(TWO).await;
    let (status, body) = server.http_get("/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(server.http_get("/healthz").await.0, 200);
    let channel = server.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lookaside.v1.Discovery".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let mut stream = watch(channel, "greeter.default:grpc").await.unwrap();
    next(&mut stream).await;
    server.write_file("services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50059\n");
    next(&mut stream).await;
    let (_, metrics) = server.http_get("/metrics").await;
    for line in [
        "lookaside_services 1",
        "lookaside_endpoints 1",
        "lookaside_subscribers{protocol=\"discovery\"} 1",
        "lookaside_pushes_total{protocol=\"discovery\"} 1",
        "lookaside_push_latency_seconds_count{protocol=\"discovery\"} 1",
        "lookaside_file_reloads_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }

    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(started.elapsed() < WAIT);
    // The stream ends cleanly (no error), rather than being cut.
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[test]
fn a_broken_file_at_start_exits_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(
        &file,
        "services:\n  greeter.default:grpc:\n    - address: not-an-address\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lb-server"))
        .args(["--source", "file", "--file"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lb-server: error:"), "{stderr}");
    assert!(
        stderr.contains("\"not-an-address\" is not IP:PORT"),
        "{stderr}"
    );
}

/// lb-server as a child process on `file`, killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPUs `pid` may run on, and each of its threads' name and CPUs.
fn cpus_of(pid: u32) -> (String, Vec<(String, String)>) {
    let allowed = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|list| list.trim().to_string())
    };
    let process = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(list) = allowed(&status) {
            threads.push((name.trim().to_string(), list));
        }
    }
    threads.sort();
    (allowed(&process).unwrap(), threads)
}

#[test]
fn worker_threads_get_a_cpu_each_when_pinned_and_any_cpu_when_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(&file, "services: {}\n").unwrap();
    let allowed = lb_server::runtime::allowed_cpus();
    let start = |pin: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lb-server"))
            .args(["--source", "file", "--file"])
            .arg(&file)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--pin-workers", pin])
            .env("TOKIO_WORKER_THREADS", "2")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let child = Child(child);
        let mut log = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap();
            log += &line;
            log.push('\n');
            if line.contains("lb-server listening") {
                return (child, log);
            }
        }
        panic!("lb-server ended before listening:\n{log}");
    };

    let (child, log) = start("on");
    assert!(log.contains("worker threads pinned, one per CPU"), "{log}");
    if allowed.len() >= 2 {
        // Each worker takes a CPU of its own when it first goes idle, right
        // after start; the blocking pool's threads (if any) keep them all.
        let mut expected = vec![allowed[0].to_string(), allowed[1].to_string()];
        expected.sort();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (all, threads) = cpus_of(child.0.id());
            let pinned: Vec<&(String, String)> = threads.iter().filter(|t| t.1 != all).collect();
            let workers = ["tokio-rt-worker", "tokio-rt-worker"];
            if pinned.iter().map(|t| t.0.as_str()).eq(workers)
                && pinned.iter().map(|t| &t.1).eq(&expected)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "threads on {threads:?}: expected two workers, one on each of {expected:?}, \
                 and every other thread on {all}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    drop(child);

    let (child, log) = start("off");
    assert!(log.contains("worker threads free to run"), "{log}");
    // A new thread takes its name when it first runs, which may be after
    // the server is listening.
    let deadline = std::time::Instant::now() + WAIT;
    let (all, threads) = loop {
        let (all, threads) = cpus_of(child.0.id());
        let workers = threads.iter().filter(|t| t.0 == "tokio-rt-worker").count();
        if workers >= 2 {
            break (all, threads);
        }
        assert!(std::time::Instant::now() < deadline, "{threads:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(threads.iter().all(|t| t.1 == all), "{threads:?} vs {all}");
}

/// Sends hand-made protobuf bytes as they are.
struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

/// Requests as raw bytes, responses decoded as `M`.
struct RawCodec<M>(std::marker::PhantomData<M>);

impl<M: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<M> {
    type Encode = Vec<u8>;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<M>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

fn raw<M>() -> RawCodec<M> {
    RawCodec(std::marker::PhantomData)
}

/// A length-delimited protobuf field: tag, length, bytes.
fn field(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![(tag << 3) | 2, u8::try_from(value.len()).unwrap()];
    out.extend_from_slice(value);
    out
}

#[tokio::test]
async fn a_target_that_is_not_utf8_is_invalid_argument_on_every_api() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use lookaside_proto::{grpclb::v1::LoadBalanceResponse, lookaside::v1::Service};

    let server = TestServer::start(TWO).await;
    let channel = server.channel().await;
    // A target with one byte that is not UTF-8 (0xff), where each API
    // takes a target.
    let target: &[u8] = b"greeter.default:gr\xffc";
    let watch_request = field(1, target);
    let initial = field(1, &field(1, target));
    let mut ads = field(3, target);
    ads.extend(field(
        4,
        b"type.googleapis.com/envoy.config.listener.v3.Listener",
    ));
    let path = http::uri::PathAndQuery::from_static;
    let mut grpc = tonic::client::Grpc::new(channel.clone());

    let mut statuses = Vec::new();
    grpc.ready().await.unwrap();
    statuses.push((
        "discovery",
        "WatchRequest.target",
        grpc.server_streaming(
            tonic::Request::new(watch_request),
            path("/lookaside.v1.Discovery/Watch"),
            raw::<WatchResponse>(),
        )
        .await
        .unwrap_err(),
    ));
    grpc.ready().await.unwrap();
    statuses.push((
        "admin",
        "GetServiceRequest.target",
        grpc.unary(
            tonic::Request::new(field(1, target)),
            path("/lookaside.v1.Admin/GetService"),
            raw::<Service>(),
        )
        .await
        .unwrap_err(),
    ));
    grpc.ready().await.unwrap();
    statuses.push((
        "grpclb",
        "InitialLoadBalanceRequest.name",
        grpc.streaming(
            tonic::Request::new(tokio_stream::iter(vec![initial])),
            path("/grpc.lb.v1.LoadBalancer/BalanceLoad"),
            raw::<LoadBalanceResponse>(),
        )
        .await
        .unwrap_err(),
    ));
    grpc.ready().await.unwrap();
    // ADS answers with headers at once; the status ends the stream.
    let (requests, rx) = tokio::sync::mpsc::unbounded_channel();
    requests.send(ads).unwrap();
    let mut responses = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
            path(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            ),
            raw::<DiscoveryResponse>(),
        )
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap();
    statuses.push(("xds", "DiscoveryRequest.resource_names", end.unwrap_err()));
    drop(requests);

    let metrics = server.metrics().await;
    for (api, field, status) in statuses {
        assert_eq!(status.code(), Code::InvalidArgument, "{api}: {status:?}");
        assert_eq!(
            status.message(),
            format!("invalid request: {field} is not valid UTF-8"),
            "{api}"
        );
        let line =
            format!("lookaside_rejected_requests_total{{api=\"{api}\",reason=\"not_utf8\"}} 1");
        assert!(metrics.contains(&line), "missing {line}:\n{metrics}");
    }
    // Everyone else is still served.
    let mut stream = watch(channel, "greeter.default:grpc").await.unwrap();
    assert!(next(&mut stream).await.exists);
    server.shutdown().await.unwrap();
}
