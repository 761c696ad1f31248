//! Weighted round robin from backend load reports (ORCA), after gRPC's
//! design A58 (`weighted_round_robin`).
//!
//! Each endpoint's weight is `qps / (utilization + eps / qps × penalty)`
//! from its latest report, where utilization is `application_utilization`
//! when the backend sets it and `cpu_utilization` otherwise. Reports arrive
//! per call (the `endpoint-load-metrics-bin` trailer, read by the response
//! body) or, with [`WrrConfig::out_of_band`], on one
//! `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics` stream per backend
//! connection (per-call reports are then ignored, as in A58).
//!
//! Invariants:
//! - A report with a NaN, infinite or negative figure is discarded whole; one
//!   with no calls or no utilization gives no weight (as in A58).
//! - A new weight counts only once the endpoint has reported without a gap
//!   for [`WrrConfig::blackout_period`]; a weight not refreshed for
//!   [`WrrConfig::weight_expiration_period`] is dropped, and the blackout
//!   starts again with the next report. A new connection starts a blackout.
//! - Every [`WrrConfig::weight_update_period`] the [`run`] task takes each
//!   endpoint's usable weight, keeps it within [`WrrConfig::max_weight_ratio`]
//!   of the median usable weight (so that one report can neither starve nor
//!   flood a backend), stores it on the endpoint and rebuilds the picker.
//! - The picker multiplies it with the weight lb-server sends; an endpoint
//!   without a usable weight counts as the mean of those with one, and while
//!   none has one every endpoint gets its plain share. The schedule is the
//!   workspace's one weighted scheduler (`lookaside_weights`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::FutureExt as _;
use http::uri::Scheme;
use lookaside_backoff::Backoff;
use lookaside_proto::xds::{
    data::orca::v3::OrcaLoadReport,
    service::orca::v3::{OrcaLoadReportRequest, open_rca_service_client::OpenRcaServiceClient},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    endpoint::{Conn, EndpointState, Sender, now_nanos},
    pool::Pool,
};

/// Weighted round robin's settings (gRPC A58's, plus the clamp). The
/// defaults are A58's.
///
/// ```
/// use std::time::Duration;
/// let config = lb_client::WrrConfig {
///     blackout_period: Duration::from_secs(2),
///     ..lb_client::WrrConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct WrrConfig {
    /// How long an endpoint must report without a gap before its weight is
    /// used (default 10 s): a backend that just started, or just came back,
    /// reports figures of a short, unrepresentative window.
    pub blackout_period: Duration,
    /// A weight not refreshed for this long is dropped (default 3 min): the
    /// endpoint then counts as the mean again.
    pub weight_expiration_period: Duration,
    /// How often weights are recomputed and the schedule rebuilt (default 1 s).
    pub weight_update_period: Duration,
    /// How much errors count against an endpoint: its errors per call times
    /// this is added to its utilization (default 1.0).
    pub error_utilization_penalty: f64,
    /// No usable weight is more than this many times the median usable
    /// weight, nor less than the median divided by it (default 10; at least
    /// 1). It bounds what one report, honest or not, can do: a backend that
    /// reports a huge utilization still gets a tenth of a median share, and
    /// one that reports next to none at most ten.
    pub max_weight_ratio: f64,
    /// Read reports out of band every this often, on one
    /// `OpenRcaService/StreamCoreMetrics` stream per backend connection,
    /// instead of from every call's trailers (default `None`: per call).
    /// The server may report less often than asked.
    pub out_of_band: Option<Duration>,
}

impl Default for WrrConfig {
    fn default() -> Self {
        Self {
            blackout_period: Duration::from_secs(10),
            weight_expiration_period: Duration::from_secs(180),
            weight_update_period: Duration::from_secs(1),
            error_utilization_penalty: 1.0,
            max_weight_ratio: 10.0,
            out_of_band: None,
        }
    }
}

/// The weight one report gives, or `None` if it gives none: a figure that
/// is NaN, infinite or negative (the report is not trusted at all), no
/// calls, or no utilization.
pub(crate) fn weight_of(report: &OrcaLoadReport, error_penalty: f64) -> Option<f64> {
    let sane = |x: f64| x.is_finite() && x >= 0.0;
    let qps = report.rps_fractional;
    let (cpu, application, eps) = (
        report.cpu_utilization,
        report.application_utilization,
        report.eps,
    );
    if ![qps, cpu, application, eps].into_iter().all(sane) {
        return None;
    }
    let utilization = if application > 0.0 { application } else { cpu };
    if qps <= 0.0 || utilization <= 0.0 {
        return None;
    }
    let penalty = if error_penalty.is_finite() && error_penalty > 0.0 {
        eps / qps * error_penalty
    } else {
        0.0
    };
    // Finite over positive can still overflow: a huge weight, not no weight.
    Some((qps / (utilization + penalty)).min(f64::MAX))
}

/// One endpoint's load-report weight. Atomics, so that the calls that
/// record reports take no lock; a race between two reports of one endpoint
/// keeps one of them, which is all a weight needs.
#[derive(Debug, Default)]
pub(crate) struct LoadWeight {
    /// The latest report's weight (`f64` bits).
    weight: AtomicU64,
    /// When the current run of reports without a gap began (0: none).
    non_empty_since: AtomicU64,
    /// When the latest report with a weight came (0: never).
    last_updated: AtomicU64,
    /// The weight the picker uses, as the last refresh left it (`f64`
    /// bits; 0: none).
    current: AtomicU64,
}

impl LoadWeight {
    /// Folds one report in; returns whether it gave a weight.
    pub(crate) fn record(&self, report: &OrcaLoadReport, error_penalty: f64, now: u64) -> bool {
        let Some(weight) = weight_of(report, error_penalty) else {
            return false;
        };
        self.weight.store(weight.to_bits(), Relaxed);
        self.last_updated.store(now, Relaxed);
        let _ = self
            .non_empty_since
            .compare_exchange(0, now, Relaxed, Relaxed);
        true
    }

    /// The reported weight if it may be used at `now` (past its blackout,
    /// not expired). An expired weight also ends the run of reports, so the
    /// next one starts a new blackout.
    pub(crate) fn usable(&self, config: &WrrConfig, now: u64) -> Option<f64> {
        let last = self.last_updated.load(Relaxed);
        if last == 0 {
            return None;
        }
        if now.saturating_sub(last) >= nanos(config.weight_expiration_period) {
            self.non_empty_since.store(0, Relaxed);
            return None;
        }
        let since = self.non_empty_since.load(Relaxed);
        if since == 0 || now.saturating_sub(since) < nanos(config.blackout_period) {
            return None;
        }
        Some(f64::from_bits(self.weight.load(Relaxed)))
    }

    /// A new connection: the backend may have restarted, so its next
    /// reports start a new blackout (A58 does the same on READY).
    pub(crate) fn restart_blackout(&self) {
        self.non_empty_since.store(0, Relaxed);
    }

    /// The weight the picker uses (clamped), if any.
    pub(crate) fn current(&self) -> Option<f64> {
        let w = f64::from_bits(self.current.load(Relaxed));
        (w > 0.0).then_some(w)
    }

    /// Sets the weight the picker uses; returns whether it changed.
    fn set_current(&self, weight: Option<f64>) -> bool {
        let bits = weight.unwrap_or(0.0).to_bits();
        self.current.swap(bits, Relaxed) != bits
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Keeps every weight within `ratio` of their median (see
/// [`WrrConfig::max_weight_ratio`]); `None` stays `None`.
pub(crate) fn clamp(weights: &[Option<f64>], ratio: f64) -> Vec<Option<f64>> {
    let mut known: Vec<f64> = weights.iter().flatten().copied().collect();
    if known.is_empty() {
        return weights.to_vec();
    }
    known.sort_by(f64::total_cmp);
    let n = known.len();
    let median = if n % 2 == 1 {
        known[n / 2]
    } else {
        // Halves first: the sum of two huge weights would overflow.
        known[n / 2 - 1] / 2.0 + known[n / 2] / 2.0
    };
    let ratio = if ratio.is_finite() {
        ratio.max(1.0)
    } else {
        1.0
    };
    let (low, high) = (median / ratio, (median * ratio).min(f64::MAX));
    weights
        .iter()
        .map(|w| w.map(|w| w.clamp(low, high).max(f64::MIN_POSITIVE)))
        .collect()
}

/// The weights a picker schedules: lb-server's weight times the load-report
/// weight, the mean of the known ones standing in for the unknown. `None`
/// when no endpoint has a load-report weight (plain weights apply).
pub(crate) fn combine(lb_weights: &[u32], load: &[Option<f64>]) -> Option<Vec<f64>> {
    let known: Vec<f64> = load.iter().flatten().copied().collect();
    if known.is_empty() {
        return None;
    }
    // A mean of values each at most f64::MAX, without overflowing the sum.
    let mean = known.iter().map(|w| w / known.len() as f64).sum::<f64>();
    Some(
        lb_weights
            .iter()
            .zip(load)
            .map(|(lb, w)| (f64::from(*lb) * w.unwrap_or(mean)).min(f64::MAX))
            .collect(),
    )
}

/// Every update period: refreshes the endpoints' weights and rebuilds the
/// picker when one changed; with out-of-band reporting, keeps one report
/// stream open per connected endpoint. Ends at `shutdown`.
pub(crate) async fn run(
    pool: Arc<Pool>,
    config: WrrConfig,
    scheme: Scheme,
    shutdown: CancellationToken,
) {
    let mut ticks =
        tokio::time::interval(config.weight_update_period.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streams = Streams::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let endpoints = pool.all_endpoints();
        if let Some(interval) = config.out_of_band {
            streams.tend(
                &endpoints,
                interval,
                config.error_utilization_penalty,
                &scheme,
            );
        }
        if refresh(&endpoints, &config, now_nanos()) {
            pool.rebuild();
        }
    }
    streams.stop_all();
}

/// Recomputes every endpoint's current weight at `now`; returns whether
/// one changed.
pub(crate) fn refresh(endpoints: &[Arc<EndpointState>], config: &WrrConfig, now: u64) -> bool {
    // Draining endpoints take no new calls: they do not shape the median.
    let usable: Vec<Option<f64>> = endpoints
        .iter()
        .map(|e| {
            e.load_weight()
                .usable(config, now)
                .filter(|_| !e.draining())
        })
        .collect();
    let clamped = clamp(&usable, config.max_weight_ratio);
    let mut changed = false;
    for (e, w) in endpoints.iter().zip(clamped) {
        changed |= e.load_weight().set_current(w);
    }
    changed
}

/// The out-of-band report streams, one per connected endpoint.
#[derive(Default)]
struct Streams {
    open: HashMap<SocketAddr, Stream>,
}

struct Stream {
    endpoint: Arc<EndpointState>,
    task: Option<tokio::task::JoinHandle<bool>>,
    /// Streams in a row that ended before their first report.
    failures: u32,
    retry_at: tokio::time::Instant,
}

impl Streams {
    /// Opens a stream to every connected endpoint that has none, after a
    /// backoff for one whose last stream failed; stops the streams of
    /// endpoints that are gone (so that a removed backend's connection is
    /// not held open by its report stream).
    fn tend(
        &mut self,
        endpoints: &[Arc<EndpointState>],
        interval: Duration,
        error_penalty: f64,
        scheme: &Scheme,
    ) {
        self.open.retain(|addr, s| {
            let kept = endpoints
                .iter()
                .any(|e| e.addr == *addr && Arc::ptr_eq(e, &s.endpoint));
            if !kept && let Some(task) = &s.task {
                task.abort();
            }
            kept
        });
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let now = tokio::time::Instant::now();
        for endpoint in endpoints {
            let stream = self.open.entry(endpoint.addr).or_insert_with(|| Stream {
                endpoint: endpoint.clone(),
                task: None,
                failures: 0,
                retry_at: now,
            });
            if let Some(task) = &stream.task {
                if !task.is_finished() {
                    continue;
                }
                // A stream that delivered reports ended with its connection:
                // reopen at once; one that never did backs off.
                let reported = stream
                    .task
                    .take()
                    .and_then(|t| t.now_or_never())
                    .and_then(Result::ok)
                    .unwrap_or(false);
                if reported {
                    stream.failures = 0;
                } else {
                    stream.retry_at = now + backoff.delay(stream.failures);
                    stream.failures = stream.failures.saturating_add(1);
                }
            }
            if now < stream.retry_at || endpoint.conn() != Conn::Ready {
                continue;
            }
            let Some(sender) = endpoint.sender() else {
                continue;
            };
            let task = report_stream(
                endpoint.clone(),
                sender,
                scheme.clone(),
                interval,
                error_penalty,
            )
            .instrument(tracing::debug_span!("orca_oob", addr = %endpoint.addr));
            stream.task = Some(tokio::spawn(task));
        }
    }

    fn stop_all(&mut self) {
        for stream in self.open.values() {
            if let Some(task) = &stream.task {
                task.abort();
            }
        }
        self.open.clear();
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Reads one endpoint's out-of-band reports until the stream ends; returns
/// whether any report arrived.
async fn report_stream(
    endpoint: Arc<EndpointState>,
    sender: Sender,
    scheme: Scheme,
    interval: Duration,
    error_penalty: f64,
) -> bool {
    let connection = OnConnection {
        sender,
        scheme,
        endpoint: endpoint.clone(),
    };
    let mut client = OpenRcaServiceClient::new(connection);
    let request = OrcaLoadReportRequest {
        report_interval: prost_types::Duration::try_from(interval).ok(),
        request_cost_names: Vec::new(),
    };
    let mut stream = match client.stream_core_metrics(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::debug!(%status, "out-of-band load reports refused");
            return false;
        }
    };
    let mut reported = false;
    loop {
        match stream.message().await {
            Ok(Some(report)) => {
                reported = true;
                endpoint
                    .load_weight()
                    .record(&report, error_penalty, now_nanos());
            }
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%status, "out-of-band load report stream ended");
                break;
            }
        }
    }
    reported
}

/// A tonic transport over one endpoint's HTTP/2 connection, for its report
/// stream: the call bypasses the picker and is not counted as a call.
struct OnConnection {
    sender: Sender,
    scheme: Scheme,
    endpoint: Arc<EndpointState>,
}

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower_service::Service<http::Request<tonic::body::Body>> for OnConnection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> ResponseFuture {
        crate::channel::set_uri(&mut request, &self.scheme, &self.endpoint.authority);
        Box::pin(self.sender.send_request(request))
    }
}

#[cfg(test)]
mod tests;
