//! ORCA backend load reports for any tonic server.
//!
//! A [`LoadReporter`] measures the process: its CPU use as a fraction of
//! the CPUs it may use, the calls it completes per second and the calls that
//! end in an error per second, over a short window. It reports them the two
//! ways gRPC's and Envoy's weighted balancers read them (ORCA, gRFC A51 and
//! A58):
//! - per call, in the `endpoint-load-metrics-bin` trailer of every response
//!   ([`LoadReporter::layer`], a tower layer, which also counts the calls);
//! - out of band, on `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics`
//!   ([`LoadReporter::service`]), a report every interval the client asks
//!   for, but no more often than [`LoadReporter::min_report_interval`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use lookaside_proto::helloworld::greeter_server::{Greeter, GreeterServer};
//! # #[derive(Default)] struct MyGreeter;
//! # #[tonic::async_trait] impl Greeter for MyGreeter {
//! #     async fn say_hello(&self, _: tonic::Request<lookaside_proto::helloworld::HelloRequest>)
//! #         -> Result<tonic::Response<lookaside_proto::helloworld::HelloReply>, tonic::Status> {
//! #         Ok(tonic::Response::new(Default::default())) } }
//! let reporter = lookaside_orca::LoadReporter::new();
//! tonic::transport::Server::builder()
//!     .layer(reporter.layer())
//!     .add_service(reporter.service())
//!     .add_service(GreeterServer::new(MyGreeter::default()))
//!     .serve("0.0.0.0:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Out-of-band streams never end on their own: call [`LoadReporter::close`]
//! when the server starts shutting down, or a graceful shutdown waits for
//! them.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use futures::Stream;
use http_body::Frame;
use lookaside_proto::xds::{
    data::orca::v3::OrcaLoadReport,
    service::orca::v3::{
        OrcaLoadReportRequest,
        open_rca_service_server::{OpenRcaService, OpenRcaServiceServer},
    },
};
use prost::Message as _;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The trailer that carries a per-call report: the binary `OrcaLoadReport`,
/// base64 as gRPC sends every `-bin` metadata value.
pub const TRAILER: &str = "endpoint-load-metrics-bin";

/// The window rates and utilization are measured over, by default.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// The shortest out-of-band interval served by default, whatever a client
/// asks: a report is cheap, but thousands of clients asking for one every
/// millisecond are not.
pub const DEFAULT_MIN_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Measures a server's load and reports it per call and out of band.
/// Clones share one measurement.
#[derive(Debug, Clone)]
pub struct LoadReporter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    window: Duration,
    min_report_interval: Duration,
    /// CPUs the process may use (its affinity mask and cgroup quota).
    cpus: f64,
    calls: AtomicU64,
    errors: AtomicU64,
    /// The last window's figures, as `f64` bits, read on every call.
    cpu_utilization: AtomicU64,
    rps: AtomicU64,
    eps: AtomicU64,
    /// Where the current window started; taken with `try_lock` by whichever
    /// call first sees the window over, so calls never wait on it.
    window_start: Mutex<Sample>,
    closed: watch::Sender<bool>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu: Duration,
    calls: u64,
    errors: u64,
}

impl Default for LoadReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadReporter {
    /// A reporter with the default window and minimum interval.
    pub fn new() -> Self {
        Self::with_window(DEFAULT_WINDOW, DEFAULT_MIN_REPORT_INTERVAL)
    }

    /// A reporter measuring over `window`, serving out-of-band reports no
    /// more often than `min_report_interval`.
    pub fn with_window(window: Duration, min_report_interval: Duration) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        Self {
            shared: Arc::new(Shared {
                window: window.max(Duration::from_millis(1)),
                min_report_interval,
                cpus,
                calls: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                cpu_utilization: AtomicU64::new(0f64.to_bits()),
                rps: AtomicU64::new(0f64.to_bits()),
                eps: AtomicU64::new(0f64.to_bits()),
                window_start: Mutex::new(Sample {
                    at: Instant::now(),
                    cpu: process_cpu_time(),
                    calls: 0,
                    errors: 0,
                }),
                closed: watch::Sender::new(false),
            }),
        }
    }

    /// The shortest out-of-band interval this reporter serves.
    pub fn min_report_interval(&self) -> Duration {
        self.shared.min_report_interval
    }

    /// Counts a completed call the layer did not see (a server that reports
    /// without [`LoadReporter::layer`]).
    pub fn record_call(&self, failed: bool) {
        self.shared.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The report of the last complete window: CPU utilization, requests
    /// and errors per second. All zero until the first window ends.
    pub fn report(&self) -> OrcaLoadReport {
        self.shared.roll_window();
        let load = |value: &AtomicU64| f64::from_bits(value.load(Ordering::Relaxed));
        OrcaLoadReport {
            cpu_utilization: load(&self.shared.cpu_utilization),
            rps_fractional: load(&self.shared.rps),
            eps: load(&self.shared.eps),
            ..OrcaLoadReport::default()
        }
    }

    /// The tower layer that counts every call and adds the per-call report
    /// to its trailers.
    pub fn layer(&self) -> OrcaLayer {
        OrcaLayer {
            reporter: self.clone(),
        }
    }

    /// `OpenRcaService` for tonic's router.
    pub fn service(&self) -> OpenRcaServiceServer<OutOfBand> {
        OpenRcaServiceServer::new(OutOfBand {
            reporter: self.clone(),
        })
    }

    /// Ends every out-of-band stream, and refuses new ones, so that a
    /// graceful shutdown does not wait on them.
    pub fn close(&self) {
        self.shared.closed.send_replace(true);
    }

    fn encoded(&self) -> http::HeaderValue {
        let bytes = self.report().encode_to_vec();
        let text = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        http::HeaderValue::from_str(&text).expect("base64 is a valid header value")
    }
}

impl Shared {
    /// Ends the current window if it is over: computes its figures and
    /// starts the next one.
    fn roll_window(&self) {
        let Ok(mut start) = self.window_start.try_lock() else {
            return;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(start.at);
        if elapsed < self.window {
            return;
        }
        let sample = Sample {
            at: now,
            cpu: process_cpu_time(),
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        };
        let seconds = elapsed.as_secs_f64();
        let cpu = sample.cpu.saturating_sub(start.cpu).as_secs_f64() / seconds / self.cpus;
        let rps = sample.calls.saturating_sub(start.calls) as f64 / seconds;
        let eps = sample.errors.saturating_sub(start.errors) as f64 / seconds;
        self.cpu_utilization.store(cpu.to_bits(), Ordering::Relaxed);
        self.rps.store(rps.to_bits(), Ordering::Relaxed);
        self.eps.store(eps.to_bits(), Ordering::Relaxed);
        *start = sample;
    }
}

/// User and system CPU time of the whole process so far.
fn process_cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Duration::ZERO;
    };
    let time = |t: nix::sys::time::TimeVal| {
        Duration::new(
            u64::try_from(t.tv_sec()).unwrap_or(0),
            u32::try_from(t.tv_usec()).unwrap_or(0) * 1_000,
        )
    };
    time(usage.user_time()) + time(usage.system_time())
}

/// `OpenRcaService`: a report at once, then one every interval.
#[derive(Debug, Clone)]
pub struct OutOfBand {
    reporter: LoadReporter,
}

type ReportStream = Pin<Box<dyn Stream<Item = Result<OrcaLoadReport, Status>> + Send>>;

#[tonic::async_trait]
impl OpenRcaService for OutOfBand {
    type StreamCoreMetricsStream = ReportStream;

    async fn stream_core_metrics(
        &self,
        request: Request<OrcaLoadReportRequest>,
    ) -> Result<Response<ReportStream>, Status> {
        let asked = request
            .into_inner()
            .report_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::ZERO);
        let interval = asked.max(self.reporter.min_report_interval());
        let mut closed = self.reporter.shared.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(Status::unavailable("the server is shutting down"));
        }
        let reporter = self.reporter.clone();
        let stream = futures::stream::unfold(
            (reporter, closed, None::<tokio::time::Interval>),
            move |(reporter, mut closed, ticks)| async move {
                let mut ticks = match ticks {
                    // The first report goes out at once.
                    None => {
                        let mut ticks = tokio::time::interval(interval);
                        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        ticks.tick().await;
                        ticks
                    }
                    Some(mut ticks) => {
                        tokio::select! {
                            _ = ticks.tick() => {}
                            _ = closed.wait_for(|closed| *closed) => return None,
                        }
                        ticks
                    }
                };
                if *closed.borrow() {
                    return None;
                }
                let report = reporter.report();
                ticks.reset();
                Some((Ok(report), (reporter, closed, Some(ticks))))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Counts calls and adds the per-call report; made by [`LoadReporter::layer`].
#[derive(Debug, Clone)]
pub struct OrcaLayer {
    reporter: LoadReporter,
}

impl<S> tower_layer::Layer<S> for OrcaLayer {
    type Service = Reporting<S>;

    fn layer(&self, inner: S) -> Reporting<S> {
        Reporting {
            inner,
            reporter: self.reporter.clone(),
        }
    }
}

/// A service whose responses carry a load report; see [`OrcaLayer`].
#[derive(Debug, Clone)]
pub struct Reporting<S> {
    inner: S,
    reporter: LoadReporter,
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for Reporting<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = http::Response<ReportingBody<ResBody>>;
    type Error = S::Error;
    type Future = ReportingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The reporting service itself is not a call to count.
        let counted = !request
            .uri()
            .path()
            .starts_with("/xds.service.orca.v3.OpenRcaService/");
        ReportingFuture {
            inner: self.inner.call(request),
            reporter: Some(self.reporter.clone()).filter(|_| counted),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Reporting`].
    pub struct ReportingFuture<F> {
        #[pin]
        inner: F,
        reporter: Option<LoadReporter>,
    }
}

impl<F, ResBody, E> Future for ReportingFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<ReportingBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        let mut reporter = this.reporter.take();
        // A trailers-only response (most errors) ends in its headers.
        if let Some(status) = response.headers().get("grpc-status")
            && let Some(reporter) = reporter.take()
        {
            reporter.record_call(status != "0");
            response.headers_mut().insert(TRAILER, reporter.encoded());
        }
        Poll::Ready(Ok(response.map(|inner| ReportingBody { inner, reporter })))
    }
}

pin_project_lite::pin_project! {
    /// A response body whose trailers get the call's load report.
    pub struct ReportingBody<B> {
        #[pin]
        inner: B,
        reporter: Option<LoadReporter>,
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for ReportingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match frame {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    if let Some(reporter) = this.reporter.take() {
                        let failed = trailers.get("grpc-status").is_none_or(|s| s != "0");
                        reporter.record_call(failed);
                        trailers.insert(TRAILER, reporter.encoded());
                    }
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            Some(Err(error)) => {
                if let Some(reporter) = this.reporter.take() {
                    reporter.record_call(true);
                }
                Poll::Ready(Some(Err(error)))
            }
            None => {
                // A body that ends without trailers ended without a status.
                if let Some(reporter) = this.reporter.take() {
                    reporter.record_call(true);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a per-call report from a response's trailers (or a trailers-only
/// response's headers): what a client does with [`TRAILER`].
pub fn decode_trailer(headers: &http::HeaderMap) -> Option<OrcaLoadReport> {
    let text = headers.get(TRAILER)?.as_bytes();
    // gRPC senders may pad or not; accept both.
    let text = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .ok()?;
    OrcaLoadReport::decode(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests;
