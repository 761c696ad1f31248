//! lb-server's xDS ADS endpoint driven by raw ADS clients (envoy-types' tonic
//! client) over loopback: ACK/NACK handling, wildcard and named subscriptions,
//! and that a misbehaving client never disturbs the others.
//!
//! Envoy and proxyless grpcio are exercised in `tests/interop/test_xds.py`.

use std::time::Duration;

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster,
            core::v3::{Node, transport_socket::ConfigType},
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener,
        },
        extensions::transport_sockets::tls::v3::{
            UpstreamTlsContext, common_tls_context::ValidationContextType,
            subject_alt_name_matcher::SanType,
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        r#type::matcher::v3::string_matcher::MatchPattern,
    },
    google::rpc::Status as RpcStatus,
};
use lookaside_proto::lookaside::v1::Subscriber;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Streaming};

mod common;

use common::{TestServer, WAIT};

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const GREETER: &str = "greeter.default:grpc";

fn file_with(services: &[(&str, &[u16])]) -> String {
    let mut yaml = String::from("services:\n");
    for (target, ports) in services {
        yaml += &format!("  {target}:\n");
        for port in *ports {
            yaml += &format!("    - address: 127.0.0.1:{port}\n      zone: zone-a\n");
        }
    }
    yaml
}

/// The xDS subscriber with this node id, once `ready` holds for it.
async fn xds_subscriber(
    server: &TestServer,
    node: &str,
    ready: impl Fn(&Subscriber) -> bool,
) -> Subscriber {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let subscribers = server.subscribers().await;
        let found = subscribers
            .into_iter()
            .find(|s| s.xds.as_ref().is_some_and(|x| x.node_id == node));
        match found {
            Some(subscriber) if ready(&subscriber) => return subscriber,
            found if tokio::time::Instant::now() > deadline => {
                panic!("subscriber {node} not as expected: {found:#?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A raw ADS client: sends what the test says, reads what the server sends.
struct Ads {
    node: String,
    user_agent: String,
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    first: bool,
}

impl Ads {
    async fn connect(server: &TestServer, node: &str) -> Self {
        Self::connect_as(server, node, "raw-test-client").await
    }

    /// A client whose node says `user_agent_name: user_agent`.
    async fn connect_as(server: &TestServer, node: &str, user_agent: &str) -> Self {
        let (tx, requests) = mpsc::unbounded_channel();
        let rx = AggregatedDiscoveryServiceClient::new(server.channel().await)
            .stream_aggregated_resources(UnboundedReceiverStream::new(requests))
            .await
            .unwrap()
            .into_inner();
        Self {
            node: node.into(),
            user_agent: user_agent.into(),
            tx,
            rx,
            first: true,
        }
    }

    fn send(&mut self, mut request: DiscoveryRequest) {
        if std::mem::take(&mut self.first) {
            request.node = Some(Node {
                id: self.node.clone(),
                user_agent_name: self.user_agent.clone(),
                ..Node::default()
            });
        }
        self.tx.send(request).unwrap();
    }

    fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(request(type_url, names, "", ""));
    }

    fn ack(&mut self, response: &DiscoveryResponse, names: &[&str]) {
        self.send(request(
            &response.type_url,
            names,
            &response.version_info,
            &response.nonce,
        ));
    }

    fn nack(&mut self, response: &DiscoveryResponse, names: &[&str], message: &str) {
        let mut nack = request(&response.type_url, names, "", &response.nonce);
        nack.error_detail = Some(RpcStatus {
            code: Code::InvalidArgument as i32,
            message: message.into(),
            details: vec![],
        });
        self.send(nack);
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream healthy")
            .expect("stream open")
    }

    async fn recv_type(&mut self, type_url: &str) -> DiscoveryResponse {
        let response = self.recv().await;
        assert_eq!(response.type_url, type_url, "{response:?}");
        response
    }

    /// Asserts nothing arrives for a short while.
    async fn quiet(&mut self) {
        if let Ok(message) =
            tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await
        {
            panic!("unexpected message: {message:?}");
        }
    }
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..DiscoveryRequest::default()
    }
}

fn decoded<M: Message + Default>(response: &DiscoveryResponse) -> Vec<M> {
    response
        .resources
        .iter()
        .map(|any| M::decode(any.value.as_slice()).unwrap())
        .collect()
}

fn cluster_names(response: &DiscoveryResponse) -> Vec<String> {
    decoded::<Cluster>(response)
        .into_iter()
        .map(|c| c.name)
        .collect()
}

fn listener_names(response: &DiscoveryResponse) -> Vec<String> {
    decoded::<Listener>(response)
        .into_iter()
        .map(|l| l.name)
        .collect()
}

/// (cluster name, endpoint count) of each assignment.
fn assignments(response: &DiscoveryResponse) -> Vec<(String, usize)> {
    decoded::<ClusterLoadAssignment>(response)
        .into_iter()
        .map(|cla| {
            let count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            (cla.cluster_name, count)
        })
        .collect()
}

#[tokio::test]
async fn a_nacking_client_does_not_disturb_others() {
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;

    let mut good = Ads::connect(&server, "good-client").await;
    good.subscribe(CDS, &[GREETER]);
    let cds = good.recv_type(CDS).await;
    assert_eq!(cluster_names(&cds), [GREETER]);
    good.ack(&cds, &[GREETER]);
    good.subscribe(EDS, &[GREETER]);
    let eds = good.recv_type(EDS).await;
    assert_eq!(assignments(&eds), [(GREETER.to_owned(), 1)]);
    good.ack(&eds, &[GREETER]);

    // The bad client rejects everything and sends nonsense besides.
    let mut bad = Ads::connect(&server, "bad-client").await;
    bad.subscribe(EDS, &[GREETER]);
    let first = bad.recv_type(EDS).await;
    bad.nack(&first, &[GREETER], "rejected on purpose");
    bad.send(request(EDS, &[], "42", "no-such-nonce"));
    bad.nack(
        &DiscoveryResponse {
            nonce: "0".into(),
            type_url: EDS.into(),
            ..first.clone()
        },
        &[],
        "stale",
    );
    bad.send(request(
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        &["x"],
        "",
        "",
    ));
    bad.send(request("", &[], "", "1"));
    bad.quiet().await;

    // A change reaches the good client, and the bad one too: a NACK stops nothing.
    server.write_file(&file_with(&[(GREETER, &[50051, 50052])]));
    let update = good.recv_type(EDS).await;
    assert_eq!(assignments(&update), [(GREETER.to_owned(), 2)]);
    assert_eq!(update.version_info, "2");
    good.ack(&update, &[GREETER]);
    let bad_update = bad.recv_type(EDS).await;
    assert_eq!(assignments(&bad_update), [(GREETER.to_owned(), 2)]);
    bad.nack(&bad_update, &[GREETER], "rejected again");

    // The bad client's stream still works for new subscriptions.
    bad.subscribe(LDS, &[GREETER]);
    assert_eq!(listener_names(&bad.recv_type(LDS).await), [GREETER]);

    // Admin shows the NACK with the rejected version and nonce, and the good client's ACKs.
    let shown = xds_subscriber(&server, "bad-client", |s| {
        s.xds
            .as_ref()
            .unwrap()
            .resource_types
            .iter()
            .any(|t| t.nacks == 2)
    })
    .await;
    let xds = shown.xds.unwrap();
    assert_eq!(shown.protocol, "xds");
    assert_eq!(xds.user_agent, "raw-test-client");
    let eds_state = xds
        .resource_types
        .iter()
        .find(|t| t.type_url == EDS)
        .unwrap();
    let nack = eds_state.last_nack.as_ref().unwrap();
    assert_eq!(nack.version, bad_update.version_info);
    assert_eq!(nack.nonce, bad_update.nonce);
    assert_eq!(nack.message, "rejected again");
    assert_eq!(nack.code, Code::InvalidArgument as i32);
    assert_eq!(eds_state.last_acked_version, "");
    assert_eq!(eds_state.resource_names, [GREETER]);
    assert_eq!(eds_state.last_version_sent, "2");

    let good_shown = xds_subscriber(&server, "good-client", |s| {
        let types = &s.xds.as_ref().unwrap().resource_types;
        types
            .iter()
            .any(|t| t.type_url == EDS && t.last_acked_version == "2")
    })
    .await;
    let good_types = good_shown.xds.unwrap().resource_types;
    assert_eq!(
        good_types
            .iter()
            .map(|t| t.type_url.as_str())
            .collect::<Vec<_>>(),
        [CDS, EDS],
        "sorted by type URL"
    );
    assert!(
        good_types
            .iter()
            .all(|t| t.nacks == 0 && t.last_nack.is_none())
    );
    assert!(good_shown.last_version_sent > 0);

    let metrics = server.metrics().await;
    assert!(
        metrics.contains(&format!(
            "lookaside_xds_nacks_total{{type_url=\"{EDS}\"}} 2"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("lookaside_subscribers{protocol=\"xds\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("lookaside_rejected_requests_total{api=\"xds\",reason=\"unknown_type\"} 2"),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn wildcard_cds_and_named_lds_follow_services_appearing_and_going() {
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;
    let mut client = Ads::connect(&server, "envoy-like").await;
    client.subscribe(CDS, &[]);
    let cds = client.recv_type(CDS).await;
    assert_eq!(cluster_names(&cds), [GREETER]);
    client.ack(&cds, &[]);
    client.subscribe(LDS, &["late.default:8080"]);
    let lds = client.recv_type(LDS).await;
    assert!(
        lds.resources.is_empty(),
        "an unknown listener is answered at once, empty"
    );
    client.ack(&lds, &["late.default:8080"]);

    server.write_file(&file_with(&[
        (GREETER, &[50051]),
        ("late.default:8080", &[8080]),
    ]));
    let cds = client.recv_type(CDS).await;
    assert_eq!(
        cluster_names(&cds),
        ["greeter.default:grpc", "late.default:8080"]
    );
    client.ack(&cds, &[]);
    let lds = client.recv_type(LDS).await;
    assert_eq!(listener_names(&lds), ["late.default:8080"]);
    client.ack(&lds, &["late.default:8080"]);

    // An endpoint change alone sends no CDS or LDS.
    server.write_file(&file_with(&[
        (GREETER, &[50052]),
        ("late.default:8080", &[8080]),
    ]));
    client.quiet().await;

    // A service that goes is left out of the next CDS response.
    server.write_file(&file_with(&[("late.default:8080", &[8080])]));
    let cds = client.recv_type(CDS).await;
    assert_eq!(cluster_names(&cds), ["late.default:8080"]);
    client.quiet().await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn removed_service_gets_an_empty_assignment_then_its_endpoints_when_back() {
    let server = TestServer::start(&file_with(&[(GREETER, &[50051, 50052])])).await;
    let mut client = Ads::connect(&server, "eds-only").await;
    client.subscribe(EDS, &[GREETER, "never.default:80"]);
    let first = client.recv_type(EDS).await;
    assert_eq!(assignments(&first), [(GREETER.to_owned(), 2)]);
    client.ack(&first, &[GREETER, "never.default:80"]);

    server.write_file("services: {}\n");
    let gone = client.recv_type(EDS).await;
    assert_eq!(assignments(&gone), [(GREETER.to_owned(), 0)]);
    client.ack(&gone, &[GREETER, "never.default:80"]);
    server.write_file(&file_with(&[(GREETER, &[50053])]));
    let back = client.recv_type(EDS).await;
    assert_eq!(assignments(&back), [(GREETER.to_owned(), 1)]);
    assert_eq!(back.version_info, "3");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn delta_xds_is_served_other_methods_are_not_and_shutdown_ends_streams() {
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;
    // Delta ADS on the same port: a wildcard CDS gets the service's cluster
    // with its own version (the protocol rules are unit-tested in api::xds::delta).
    let mut client = AggregatedDiscoveryServiceClient::new(server.channel().await);
    let (delta_tx, delta_rx) = mpsc::unbounded_channel();
    delta_tx
        .send(DeltaDiscoveryRequest {
            type_url: CDS.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .unwrap();
    let mut delta = client
        .delta_aggregated_resources(UnboundedReceiverStream::new(delta_rx))
        .await
        .unwrap()
        .into_inner();
    let clusters = tokio::time::timeout(WAIT, delta.message())
        .await
        .expect("a delta response")
        .unwrap()
        .unwrap();
    assert_eq!(clusters.type_url, CDS);
    let named: Vec<_> = clusters.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(named, [GREETER]);
    assert!(
        clusters.resources[0].version.ends_with(":p"),
        "{clusters:?}"
    );
    // A method the ADS service does not have.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(DiscoveryRequest::default()),
            http::uri::PathAndQuery::from_static(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/Nope",
            ),
            tonic_prost::ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let mut ads = Ads::connect(&server, "until-shutdown").await;
    ads.subscribe(CDS, &[]);
    ads.recv_type(CDS).await;
    server.shutdown().await.unwrap();
    let end = tokio::time::timeout(WAIT, ads.rx.message())
        .await
        .expect("stream ends");
    // Shutdown ends the stream cleanly: OK trailers, not an error or a cut.
    assert!(matches!(end, Ok(None)), "{end:?}");
    let end = tokio::time::timeout(WAIT, delta.message())
        .await
        .expect("the delta stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(delta_tx);
}

/// A log sink for the in-process server: the `tracing` output of the test's
/// thread, as text (a `#[tokio::test]` runs the server's tasks on it too).
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    /// Captures warnings and errors on this thread while the guard lives.
    fn start(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish(),
        )
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// The value of one metric line, 0 if it is not there yet.
fn metric(metrics: &str, line: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_nack_flood_is_counted_whole_but_logged_bounded_and_escaped() {
    use lb_server::api::xds::{NACK_LOG_BURST, XDS_REQUEST_BURST};
    let log = CapturedLog::default();
    let _capture = log.start();
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;
    // Many streams, each NACKing in a tight loop (within its request burst,
    // so the flood is as fast as the client can send), with a long message
    // that tries to forge a log line of its own.
    let streams = 2 * NACK_LOG_BURST as usize;
    let per_stream = XDS_REQUEST_BURST as usize - 1;
    let forged = format!(
        "bad\n\u{1b}[31mERROR\u{1b}[0m lb_server: FORGED\n{}",
        "x".repeat(4 * 1024)
    );
    let started = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for i in 0..streams {
        let mut client = Ads::connect(&server, &format!("flooder-{i}\nFORGED")).await;
        client.subscribe(EDS, &[GREETER]);
        let sent = client.recv_type(EDS).await;
        for _ in 0..per_stream {
            client.nack(&sent, &[GREETER], &forged);
        }
        clients.push(client);
    }
    let total = (streams * per_stream) as u64;
    let nacks_line = format!("lookaside_xds_nacks_total{{type_url=\"{EDS}\"}}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let metrics = loop {
        let metrics = server.metrics().await;
        if metric(&metrics, &nacks_line) == total {
            break metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NACKs not all counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();

    let text = log.text();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("NACK")).collect();
    // The process-wide burst, plus what its rate refilled meanwhile.
    let allowed = NACK_LOG_BURST as usize
        + (lb_server::api::xds::NACK_LOGS_PER_SECOND * elapsed).ceil() as usize;
    assert!(
        !warnings.is_empty() && warnings.len() <= allowed && warnings.len() * 10 < total as usize,
        "{} NACK warnings for {total} NACKs in {elapsed:.1} s (at most {allowed}):\n{text}",
        warnings.len()
    );
    assert!(
        text.len() < allowed * 4096,
        "{} bytes of log for {total} NACKs",
        text.len()
    );
    // Nothing the clients sent started a line or reached the log raw:
    // every line is one of the server's, starting with its timestamp.
    assert!(text.lines().all(|l| l.starts_with("20")), "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.contains(r"\u{1b}[31mERROR"), "shown escaped: {text}");
    assert!(
        text.contains(r"flooder-0\nFORGED"),
        "node id escaped: {text}"
    );
    assert!(text.contains("more bytes]"), "the message cut: {text}");
    let suppressed = metric(
        &metrics,
        "lookaside_suppressed_logs_total{event=\"xds_nack\"}",
    );
    assert_eq!(suppressed + warnings.len() as u64, total, "{metrics}");

    // Admin keeps each stream's last NACK, cut.
    let shown = xds_subscriber(&server, "flooder-0\nFORGED", |s| {
        s.xds.as_ref().unwrap().resource_types[0].nacks == per_stream as u64
    })
    .await;
    let nack = shown.xds.unwrap().resource_types[0]
        .last_nack
        .clone()
        .unwrap();
    assert!(nack.message.len() <= lb_server::api::client_text::MAX_KEPT_BYTES);
    assert!(nack.message.starts_with("bad\n") && nack.message.ends_with("xx…"));
    drop(clients);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_naming_too_many_resources_ends_only_its_stream() {
    use lb_server::api::xds::MAX_XDS_NAMES_PER_REQUEST;
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;
    let mut good = Ads::connect(&server, "good").await;
    good.subscribe(EDS, &[GREETER]);
    good.recv_type(EDS).await;

    let names: Vec<String> = (0..=MAX_XDS_NAMES_PER_REQUEST)
        .map(|i| format!("svc-{i}.flood:80"))
        .collect();
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    // At the limit: served.
    let mut big = Ads::connect(&server, "at-the-limit").await;
    big.subscribe(EDS, &names[1..]);
    assert!(big.recv_type(EDS).await.resources.is_empty());
    // Over it: the stream ends with a status that says why.
    names[0] = GREETER;
    let mut over = Ads::connect(&server, "over-the-limit").await;
    over.subscribe(EDS, &names);
    let status = tokio::time::timeout(WAIT, over.rx.message())
        .await
        .expect("an answer in time")
        .expect_err("the stream ends with an error");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains(&MAX_XDS_NAMES_PER_REQUEST.to_string())
            && status.message().contains("10001"),
        "{status:?}"
    );

    // Everyone else is still served: a change reaches both other streams.
    server.write_file(&file_with(&[(GREETER, &[50051, 50052])]));
    assert_eq!(
        assignments(&good.recv_type(EDS).await),
        [(GREETER.to_owned(), 2)]
    );
    big.subscribe(EDS, &[GREETER]);
    assert_eq!(
        assignments(&big.recv_type(EDS).await),
        [(GREETER.to_owned(), 2)]
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "lookaside_rejected_requests_total{api=\"xds\",reason=\"too_many_names\"}"
        ),
        1,
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_flood_is_read_at_the_stream_rate_while_others_are_served() {
    use lb_server::api::xds::{XDS_REQUEST_BURST, XDS_REQUESTS_PER_SECOND};
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;
    let mut flood = Ads::connect(&server, "flood").await;
    // Each request is a new subscription, owed a response of its own: the
    // responses count the requests the server read.
    let beyond = 30;
    let requests = XDS_REQUEST_BURST as usize + beyond;
    for _ in 0..requests {
        flood.subscribe(EDS, &[GREETER]);
    }
    let started = tokio::time::Instant::now();
    for _ in 0..XDS_REQUEST_BURST {
        flood.recv_type(EDS).await;
    }
    // The burst is read at once; the rest waits for the budget, while
    // another stream gets its answers at once.
    let mut other = Ads::connect(&server, "other").await;
    other.subscribe(EDS, &[GREETER]);
    tokio::time::timeout(Duration::from_millis(500), other.recv_type(EDS))
        .await
        .expect("another stream is answered while the flood waits");
    for _ in 0..beyond {
        flood.recv_type(EDS).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A little refills while the burst is read; most of it cannot.
    let least = (beyond - 5) as f64 / XDS_REQUESTS_PER_SECOND;
    assert!(
        elapsed >= least,
        "{requests} requests read in {elapsed:.2} s; the rate allows no faster than {least:.2} s"
    );
    let metrics = server.metrics().await;
    assert!(
        metric(
            &metrics,
            "lookaside_rejected_requests_total{api=\"xds\",reason=\"rate_limited\"}"
        ) >= 1,
        "{metrics}"
    );
    // The flood's stream is still alive and gets changes.
    server.write_file(&file_with(&[(GREETER, &[50051, 50052])]));
    assert_eq!(
        assignments(&flood.recv_type(EDS).await),
        [(GREETER.to_owned(), 2)]
    );
    server.shutdown().await.unwrap();
}

/// The TLS context of each Cluster of a CDS response (`None`: plaintext).
fn upstream_tls(response: &DiscoveryResponse) -> Vec<Option<UpstreamTlsContext>> {
    decoded::<Cluster>(response)
        .into_iter()
        .map(|cluster| {
            let socket = cluster.transport_socket?;
            assert_eq!(socket.name, "envoy.transport_sockets.tls");
            let Some(ConfigType::TypedConfig(any)) = socket.config_type else {
                panic!("typed config expected");
            };
            Some(UpstreamTlsContext::decode(any.value.as_slice()).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn xds_upstream_tls_gives_envoy_sds_and_grpc_certificate_providers() {
    let services = file_with(&[(GREETER, &[50051]), ("api.prod:8443", &[8443])]);
    let server = TestServer::start_with(&services, |config| {
        config.xds_upstream_tls = true;
        config.xds_upstream_sds_dir = "/etc/lookaside/sds".into();
    })
    .await;
    let mut envoy = Ads::connect_as(&server, "envoy-1", "envoy").await;
    let mut grpc = Ads::connect_as(&server, "grpc-1", "gRPC Python").await;
    envoy.subscribe(CDS, &[]);
    grpc.subscribe(CDS, &[GREETER, "api.prod:8443"]);
    let envoy_cds = envoy.recv_type(CDS).await;
    let grpc_cds = grpc.recv_type(CDS).await;
    assert_eq!(cluster_names(&envoy_cds), ["api.prod:8443", GREETER]);
    assert_eq!(cluster_names(&grpc_cds), ["api.prod:8443", GREETER]);

    let (envoy_tls, grpc_tls) = (upstream_tls(&envoy_cds), upstream_tls(&grpc_cds));
    let names = ["api.prod.svc", "greeter.default.svc"];
    for ((envoy_tls, grpc_tls), name) in envoy_tls.into_iter().zip(grpc_tls).zip(names) {
        let (envoy_tls, grpc_tls) = (envoy_tls.unwrap(), grpc_tls.unwrap());
        assert_eq!(
            (envoy_tls.sni.as_str(), grpc_tls.sni.as_str()),
            (name, name)
        );

        let common = envoy_tls.common_tls_context.unwrap();
        let secrets: Vec<_> = common
            .tls_certificate_sds_secret_configs
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(secrets, ["lookaside-upstream-cert"]);
        let Some(ValidationContextType::CombinedValidationContext(combined)) =
            common.validation_context_type
        else {
            panic!("Envoy: a combined validation context expected");
        };
        assert_eq!(
            combined.validation_context_sds_secret_config.unwrap().name,
            "lookaside-upstream-ca"
        );
        let sans = combined
            .default_validation_context
            .unwrap()
            .match_typed_subject_alt_names;
        assert_eq!(sans.len(), 1);
        assert_eq!(sans[0].san_type, SanType::Dns as i32);
        assert_eq!(
            sans[0].matcher.as_ref().unwrap().match_pattern,
            Some(MatchPattern::Exact(name.into()))
        );

        let common = grpc_tls.common_tls_context.unwrap();
        assert!(common.tls_certificate_sds_secret_configs.is_empty());
        assert_eq!(
            common
                .tls_certificate_provider_instance
                .unwrap()
                .instance_name,
            "lookaside-upstream"
        );
        let Some(ValidationContextType::ValidationContext(validation)) =
            common.validation_context_type
        else {
            panic!("gRPC: a validation context expected");
        };
        assert_eq!(
            validation
                .ca_certificate_provider_instance
                .unwrap()
                .instance_name,
            "lookaside-upstream"
        );
        #[allow(deprecated)] // the SAN list gRPC reads
        let matchers = validation.match_subject_alt_names;
        assert_eq!(matchers.len(), 1);
        assert_eq!(
            matchers[0].match_pattern,
            Some(MatchPattern::Exact(name.into()))
        );
    }
}

#[tokio::test]
async fn without_xds_upstream_tls_clusters_are_plaintext_for_every_client() {
    let server = TestServer::start(&file_with(&[(GREETER, &[50051])])).await;
    for agent in ["envoy", "gRPC Python"] {
        let mut client = Ads::connect_as(&server, agent, agent).await;
        client.subscribe(CDS, &[GREETER]);
        let cds = client.recv_type(CDS).await;
        assert_eq!(upstream_tls(&cds), [None], "{agent}");
    }
}
