//! The HTTP side port: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::sync::watch;

use crate::{api::Protocol, api::Subscribers, metrics::Metrics, store::Store};

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// For gauges read at scrape time.
    pub store: Arc<Store>,
    /// For subscriber gauges.
    pub subscribers: Arc<Subscribers>,
    /// The metrics to encode.
    pub metrics: Arc<Metrics>,
    /// True once every source has synced and until shutdown starts.
    pub ready: watch::Receiver<bool>,
}

/// The router for the metrics port.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> ([(&'static str, &'static str); 1], String) {
    let stats = state.store.stats();
    let m = &state.metrics;
    m.services.set(stats.services as i64);
    m.endpoints.set(stats.endpoints as i64);
    m.draining_endpoints.set(stats.draining as i64);
    for protocol in Protocol::ALL {
        m.subscribers
            .with_label_values(&[protocol.as_str()])
            .set(state.subscribers.count(protocol) as i64);
    }
    ([("content-type", "text/plain; version=0.0.4")], m.encode())
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if *state.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: source not synced or shutting down\n",
        )
    }
}
