//! Prometheus metrics, served as text on the metrics port.
//!
//! Counters and histograms are updated where things happen; gauges that mirror
//! state (services, endpoints, subscribers) are read from that state at scrape
//! time, so they can never drift from it.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `pushes_total` and `push_latency_seconds` of one protocol, looked up once:
/// a push is the hottest path that touches metrics, and a labelled lookup
/// hashes the label on every call.
#[derive(Debug, Clone)]
pub struct PushMetrics {
    /// Updates pushed.
    pub pushes: IntCounter,
    /// Source event to message written.
    pub latency: Histogram,
}

/// Every metric lb-server exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open subscriber streams, by protocol (set at scrape time).
    pub subscribers: IntGaugeVec,
    /// Services that exist (set at scrape time).
    pub services: IntGauge,
    /// Endpoints over all services (set at scrape time).
    pub endpoints: IntGauge,
    /// Draining endpoints over all services (set at scrape time).
    pub draining_endpoints: IntGauge,
    /// Messages pushed to subscribers after a change, by protocol.
    pub pushes: IntCounterVec,
    /// Source event to message written, by protocol.
    pub push_latency: HistogramVec,
    /// Errors from a source, by source (`kube`, `file`).
    pub source_errors: IntCounterVec,
    /// Times a Kubernetes watch had to re-list (410 Gone, dropped connection).
    pub watch_restarts: IntCounter,
    /// File source reloads, by result (`ok`, `error`).
    pub file_reloads: IntCounterVec,
    /// Requests rejected for bad input, by API and reason.
    pub rejected: IntCounterVec,
    /// Connections closed before they were served, by listener (`grpc`,
    /// `http`) and reason (a limit of [`crate::limits`], or a failed handshake).
    pub rejected_connections: IntCounterVec,
    /// Reloads of the gRPC port's TLS files after they changed, by result (`ok`, `error`).
    pub tls_reloads: IntCounterVec,
    /// Call counts grpclb clients reported in `ClientStats`, by kind.
    pub grpclb_client_calls: IntCounterVec,
    /// xDS responses a client rejected (NACKed), by resource type URL.
    pub xds_nacks: IntCounterVec,
    /// Log lines left out by a rate limit, by event (`xds_nack`).
    pub suppressed_logs: IntCounterVec,
}

impl Metrics {
    /// The push counter and latency histogram of one protocol.
    pub fn push_metrics(&self, protocol: &str) -> PushMetrics {
        PushMetrics {
            pushes: self.pushes.with_label_values(&[protocol]),
            latency: self.push_latency.with_label_values(&[protocol]),
        }
    }

    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("lookaside".into()), None).expect("static prefix is valid");
        let subscribers = IntGaugeVec::new(
            Opts::new("subscribers", "Open subscriber streams by protocol."),
            &["protocol"],
        )
        .unwrap();
        let services = IntGauge::new("services", "Services that exist.").unwrap();
        let endpoints = IntGauge::new("endpoints", "Endpoints over all services.").unwrap();
        let draining_endpoints = IntGauge::new(
            "draining_endpoints",
            "Draining endpoints over all services.",
        )
        .unwrap();
        let pushes = IntCounterVec::new(
            Opts::new("pushes_total", "Updates pushed to subscribers by protocol."),
            &["protocol"],
        )
        .unwrap();
        let push_latency = HistogramVec::new(
            HistogramOpts::new(
                "push_latency_seconds",
                "Time from a source event to the update message written to a subscriber.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
            &["protocol"],
        )
        .unwrap();
        let source_errors = IntCounterVec::new(
            Opts::new("source_errors_total", "Errors reading a source, by source."),
            &["source"],
        )
        .unwrap();
        let watch_restarts = IntCounter::new(
            "watch_restarts_total",
            "Kubernetes watches restarted with a re-list (410 Gone, dropped connection).",
        )
        .unwrap();
        let file_reloads = IntCounterVec::new(
            Opts::new("file_reloads_total", "File source reloads by result."),
            &["result"],
        )
        .unwrap();
        let rejected = IntCounterVec::new(
            Opts::new(
                "rejected_requests_total",
                "Requests rejected for bad input.",
            ),
            &["api", "reason"],
        )
        .unwrap();
        let rejected_connections = IntCounterVec::new(
            Opts::new(
                "rejected_connections_total",
                "Connections closed before they were served, by listener and reason.",
            ),
            &["listener", "reason"],
        )
        .unwrap();
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "tls_reloads_total",
                "Reloads of the gRPC port's TLS files after they changed, by result.",
            ),
            &["result"],
        )
        .unwrap();
        let grpclb_client_calls = IntCounterVec::new(
            Opts::new(
                "grpclb_client_calls_total",
                "Calls reported by grpclb clients in ClientStats, by kind.",
            ),
            &["kind"],
        )
        .unwrap();
        let xds_nacks = IntCounterVec::new(
            Opts::new(
                "xds_nacks_total",
                "xDS responses rejected by a client (NACK), by resource type URL.",
            ),
            &["type_url"],
        )
        .unwrap();
        let suppressed_logs = IntCounterVec::new(
            Opts::new(
                "suppressed_logs_total",
                "Log lines left out by a rate limit, by event.",
            ),
            &["event"],
        )
        .unwrap();
        for collector in [
            Box::new(subscribers.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(services.clone()),
            Box::new(endpoints.clone()),
            Box::new(draining_endpoints.clone()),
            Box::new(pushes.clone()),
            Box::new(push_latency.clone()),
            Box::new(source_errors.clone()),
            Box::new(watch_restarts.clone()),
            Box::new(file_reloads.clone()),
            Box::new(rejected.clone()),
            Box::new(rejected_connections.clone()),
            Box::new(tls_reloads.clone()),
            Box::new(grpclb_client_calls.clone()),
            Box::new(xds_nacks.clone()),
            Box::new(suppressed_logs.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Self {
            registry,
            subscribers,
            services,
            endpoints,
            draining_endpoints,
            pushes,
            push_latency,
            source_errors,
            watch_restarts,
            file_reloads,
            rejected,
            rejected_connections,
            tls_reloads,
            grpclb_client_calls,
            xds_nacks,
            suppressed_logs,
        }
    }

    /// Encodes every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
