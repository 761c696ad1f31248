//! End to end: weighted round robin from backend load reports (ORCA).
//!
//! Real load: greeter-server processes (each measures its own CPU, so each
//! must be a process of its own), one spending three times the CPU per
//! call, reporting per call and out of band. Crafted load: in-process
//! greeters whose `endpoint-load-metrics-bin` trailer the test writes, to
//! stop reports and to send nonsense.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use greeter::server::GreeterService;
use lb_client::{Channel, Policy, WrrConfig};
use lookaside_proto::{
    helloworld::greeter_server::GreeterServer, xds::data::orca::v3::OrcaLoadReport,
};
use lookaside_tests::local::{
    GreeterProcess, InProcessLb, Listed, SourceFile, TARGET, Traffic, run_calls, until,
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// The report a crafted backend puts in every trailer (`None`: no trailer).
type Crafted = Arc<Mutex<Option<OrcaLoadReport>>>;

/// A greeter in this process whose per-call load report the test writes.
struct CraftedBackend {
    name: String,
    addr: SocketAddr,
    report: Crafted,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl CraftedBackend {
    async fn start(name: &str, report: Option<OrcaLoadReport>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let report: Crafted = Arc::new(Mutex::new(report));
        let service = Reporting {
            inner: GreeterServer::new(GreeterService::new(name)),
            report: report.clone(),
        };
        let stop = CancellationToken::new();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let stopped = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped)
                .await
                .unwrap();
        });
        Self {
            name: name.into(),
            addr,
            report,
            stop,
            task,
        }
    }

    fn set(&self, report: Option<OrcaLoadReport>) {
        *self.report.lock().unwrap() = report;
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("backend stops")
            .unwrap();
    }
}

fn report(qps: f64, cpu: f64) -> OrcaLoadReport {
    OrcaLoadReport {
        rps_fractional: qps,
        cpu_utilization: cpu,
        ..OrcaLoadReport::default()
    }
}

/// The greeter, with the crafted report added to every response's trailers.
#[derive(Clone)]
struct Reporting {
    inner: GreeterServer<GreeterService>,
    report: Crafted,
}

impl tonic::server::NamedService for Reporting {
    const NAME: &'static str = "helloworld.Greeter";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for Reporting {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        // Binary metadata, as gRPC sends it: base64 of the encoded report.
        let value = self.report.lock().unwrap().as_ref().map(|r| {
            let value = tonic::metadata::BinaryMetadataValue::from_bytes(&r.encode_to_vec());
            http::HeaderValue::from_bytes(value.as_encoded_bytes()).unwrap()
        });
        Box::pin(async move {
            let response = tower_service::Service::call(&mut inner, request).await?;
            Ok(response.map(|body| tonic::body::Body::new(WithTrailer { inner: body, value })))
        })
    }
}

/// A body whose trailers get `value` as `endpoint-load-metrics-bin`.
struct WithTrailer {
    inner: tonic::body::Body,
    value: Option<http::HeaderValue>,
}

impl http_body::Body for WithTrailer {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    if let Some(value) = self.value.take() {
                        trailers.insert(lookaside_orca::TRAILER, value);
                    }
                    http_body::Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

async fn wrr_channel(lb: &InProcessLb, config: WrrConfig) -> Channel {
    Channel::builder(TARGET)
        .lb(lb.url())
        .policy(Policy::WeightedRoundRobin)
        .wrr(config)
        .connect()
        .await
        .expect("channel")
}

/// Calls sent to each endpoint so far, by address.
fn calls(channel: &Channel) -> HashMap<SocketAddr, u64> {
    channel
        .endpoints()
        .iter()
        .map(|e| (e.addr, e.calls))
        .collect()
}

/// Calls per endpoint between two readings of [`calls`].
fn since(
    before: &HashMap<SocketAddr, u64>,
    now: &HashMap<SocketAddr, u64>,
) -> HashMap<SocketAddr, u64> {
    now.iter()
        .map(|(addr, n)| (*addr, n - before.get(addr).copied().unwrap_or(0)))
        .collect()
}

fn share(counts: &HashMap<SocketAddr, u64>, addr: SocketAddr) -> f64 {
    let total: u64 = counts.values().sum();
    counts.get(&addr).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

/// Three greeter-server processes, `slow` spending three times the CPU per
/// call; under WRR the slow one's share falls well below a third within
/// 10 s, and stays there.
async fn a_slow_backend_loses_its_share(out_of_band: Option<Duration>) {
    let fast = [
        GreeterProcess::start("fast-1", &["--cpu-work-us=300"]),
        GreeterProcess::start("fast-2", &["--cpu-work-us=300"]),
    ];
    let slow = GreeterProcess::start("slow", &["--cpu-work-us=900"]);
    let listed: Vec<Listed> = fast
        .iter()
        .chain([&slow])
        .map(|b| Listed::of_addr(b.addr, &b.name))
        .collect();
    let file = SourceFile::new(&listed);
    let lb = InProcessLb::start(&file).await;
    let channel = wrr_channel(
        &lb,
        WrrConfig {
            blackout_period: Duration::from_millis(500),
            weight_update_period: Duration::from_millis(100),
            out_of_band,
            ..WrrConfig::default()
        },
    )
    .await;
    let started = Instant::now();
    let traffic = Traffic::start(&channel, 6);

    // Settled: the slow backend's share over the last second is well below
    // a third (a third is what round-robin gives it).
    let mut window = calls(&channel);
    let mut settled = None;
    while started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = calls(&channel);
        let recent = since(&window, &now);
        window = now;
        if share(&recent, slow.addr) < 0.22 {
            settled = Some(started.elapsed());
            break;
        }
    }
    let settled = settled.unwrap_or_else(|| {
        panic!(
            "the slow backend's share never fell below 22% within {WAIT:?}: {:?}",
            channel.endpoints()
        )
    });
    // And stays there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recent = since(&window, &calls(&channel));
    let slow_share = share(&recent, slow.addr);
    let weights: Vec<_> = channel
        .endpoints()
        .iter()
        .map(|e| (e.addr, e.load_weight))
        .collect();
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    assert!(
        slow_share < 0.25,
        "slow share {slow_share:.3} after settling in {settled:?}: {recent:?}, weights {weights:?}"
    );
    for b in &fast {
        assert!(share(&recent, b.addr) > 0.3, "{recent:?}");
    }
    let weight = |addr| {
        weights
            .iter()
            .find(|(a, _)| *a == addr)
            .and_then(|(_, w)| *w)
            .expect("a load weight")
    };
    assert!(
        weight(slow.addr) < weight(fast[0].addr) / 1.5,
        "weights {weights:?}"
    );
    eprintln!(
        "out of band {out_of_band:?}: settled in {settled:?}; slow share {slow_share:.3}; weights {weights:?}"
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_three_times_slower_gets_well_below_a_third_from_per_call_reports() {
    a_slow_backend_loses_its_share(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_three_times_slower_gets_well_below_a_third_from_out_of_band_reports() {
    // greeter-server reports out of band at most once a second.
    a_slow_backend_loses_its_share(Some(Duration::from_millis(200))).await;
}

/// lb-server listing the crafted `backends`, and a WRR channel through it.
async fn serve(
    backends: &[CraftedBackend],
    config: WrrConfig,
) -> (SourceFile, InProcessLb, Channel) {
    let file = SourceFile::new(
        &backends
            .iter()
            .map(|b| Listed::of_addr(b.addr, &b.name))
            .collect::<Vec<_>>(),
    );
    let lb = InProcessLb::start(&file).await;
    let channel = wrr_channel(&lb, config).await;
    (file, lb, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_return_to_even_when_reports_stop() {
    let backends = [
        CraftedBackend::start("a", Some(report(100.0, 0.3))).await,
        CraftedBackend::start("b", Some(report(100.0, 0.3))).await,
        CraftedBackend::start("c", Some(report(100.0, 0.9))).await,
    ];
    let (_file, lb, channel) = serve(
        &backends,
        WrrConfig {
            blackout_period: Duration::ZERO,
            weight_update_period: Duration::from_millis(20),
            weight_expiration_period: Duration::from_millis(500),
            ..WrrConfig::default()
        },
    )
    .await;

    // Reporting three times the load per call: a seventh of the calls.
    let traffic = Traffic::start(&channel, 4);
    until("weights from reports", WAIT, || {
        channel.endpoints().iter().all(|e| e.load_weight.is_some())
    })
    .await;
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    let counts = run_calls(&channel, 2_800).await;
    let c = counts.backends["c"] as f64 / 2_800.0;
    assert!((c - 1.0 / 7.0).abs() < 0.02, "{counts:?}");

    // Reports stop: the weights expire and every backend gets a third.
    for b in &backends {
        b.set(None);
    }
    let traffic = Traffic::start(&channel, 4);
    until("weights to expire", WAIT, || {
        channel.endpoints().iter().all(|e| e.load_weight.is_none())
    })
    .await;
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    let counts = run_calls(&channel, 3_000).await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    for b in &backends {
        let n = counts.backends[&b.name];
        assert!((n as i64 - 1_000).abs() <= 10, "{counts:?}");
    }
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_reports_are_clamped_and_no_call_fails() {
    let steady = report(100.0, 0.5);
    let mut negative_app = report(100.0, 0.5);
    negative_app.application_utilization = -1.0;
    let backends = [
        CraftedBackend::start("steady", Some(steady)).await,
        CraftedBackend::start("nan", Some(report(100.0, f64::NAN))).await,
        CraftedBackend::start("negative", Some(negative_app)).await,
        // Claims to be overwhelmed: weight 1e-10, kept at a tenth of the median.
        CraftedBackend::start("huge", Some(report(100.0, 1e12))).await,
        // Claims to be idle at a million calls a second: weight 1e18, kept
        // at ten times the median.
        CraftedBackend::start("flood", Some(report(1e6, 1e-12))).await,
    ];
    let (_file, lb, channel) = serve(
        &backends,
        WrrConfig {
            blackout_period: Duration::ZERO,
            weight_update_period: Duration::from_millis(20),
            ..WrrConfig::default()
        },
    )
    .await;
    let traffic = Traffic::start(&channel, 4);
    let weight_of = |name: &str| {
        let addr = backends.iter().find(|b| b.name == name).unwrap().addr;
        channel
            .endpoints()
            .iter()
            .find(|e| e.addr == addr)
            .unwrap()
            .load_weight
    };
    until("the clamped weights", WAIT, || {
        weight_of("flood").is_some() && weight_of("huge").is_some() && weight_of("steady").is_some()
    })
    .await;
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    // The median of the usable weights is steady's 200.
    assert_eq!(weight_of("steady"), Some(200.0));
    assert_eq!(weight_of("huge"), Some(20.0));
    assert_eq!(weight_of("flood"), Some(2_000.0));
    assert_eq!(weight_of("nan"), None, "a NaN report is not trusted");
    assert_eq!(weight_of("negative"), None, "nor a negative one");

    // Shares follow: the unknown ones count as the mean of the others,
    // (200 + 20 + 2000) / 3 = 740.
    let calls = 14_800;
    let counts = run_calls(&channel, calls).await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    let n = |name: &str| counts.backends.get(name).copied().unwrap_or(0) as f64;
    assert!(n("huge") > 0.0, "not starved: {counts:?}");
    let flood = n("flood") / n("steady");
    let huge = n("huge") / n("steady");
    let unknown = n("nan") / n("steady");
    assert!((flood - 10.0).abs() < 0.5, "{flood}: {counts:?}");
    assert!((huge - 0.1).abs() < 0.02, "{huge}: {counts:?}");
    assert!((unknown - 3.7).abs() < 0.2, "{unknown}: {counts:?}");
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}
