//! The HTTP side port: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! Served by hyper's HTTP/1 server under the same accept loop as the gRPC
//! port, with a connection limit ([`MAX_HTTP_CONNECTIONS`]) and a header read
//! timeout (`--metrics-header-timeout`) that also closes idle kept-alive
//! connections.

use std::sync::Arc;

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::IntCounterVec;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{limits::MAX_HTTP_CONNECTIONS, listener::accept_loop};

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

/// Serves `router` on `listener` until `token` is cancelled, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: std::time::Duration,
    rejected: IntCounterVec,
    token: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let connections = TaskTracker::new();
    accept_loop(
        &listener,
        &slots,
        &rejected,
        "http",
        &token,
        |tcp, _remote, slot| {
            let service = TowerToHyperService::new(router.clone());
            let token = token.clone();
            connections.spawn(async move {
                let _slot = slot;
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = token.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            });
        },
    )
    .await;
    connections.close();
    connections.wait().await;
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
