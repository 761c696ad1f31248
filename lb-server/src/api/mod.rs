//! The gRPC edge: Discovery, grpclb, xDS, Admin, plus the subscriber registry they share.
//!
//! This is the only place domain errors become `tonic::Status`. It knows
//! nothing of Kubernetes: it reads the [`Store`](crate::store::Store).

pub mod admin;
pub mod discovery;
pub mod grpclb;
pub mod pb;
pub mod subscribers;
pub mod xds;

use std::{net::SocketAddr, sync::Arc};

use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    metrics::Metrics,
    model::{ServiceKey, TargetError, parse_target},
    store::Store,
};
pub use subscribers::{Protocol, Subscribers};

/// The largest request message any API accepts; larger ones are rejected
/// before they are decoded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What every API needs: the store, metrics, the subscriber registry and
/// the shutdown signal that ends streams.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Endpoint state.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Open subscriber streams.
    pub subscribers: Arc<Subscribers>,
    /// Cancelled when the server shuts down: every stream ends cleanly.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Parses a client's target, counting and converting a bad one into `InvalidArgument`.
    pub(crate) fn parse_target(&self, api: &str, target: &str) -> Result<ServiceKey, Status> {
        parse_target(target).map_err(|error| self.reject(api, &error))
    }

    /// Counts an update pushed to a subscriber and, when the source event
    /// behind it is known, its latency from that event.
    pub(crate) fn record_push(&self, protocol: Protocol, event_at: Option<std::time::Instant>) {
        let protocol = protocol.as_str();
        self.metrics.pushes.with_label_values(&[protocol]).inc();
        if let Some(event_at) = event_at {
            self.metrics
                .push_latency
                .with_label_values(&[protocol])
                .observe(event_at.elapsed().as_secs_f64());
        }
    }

    /// Counts a rejected request and builds its status.
    pub(crate) fn reject(&self, api: &str, error: &TargetError) -> Status {
        let reason = match error {
            TargetError::TooLong(_) => "too_long",
            _ => "bad_target",
        };
        self.metrics
            .rejected
            .with_label_values(&[api, reason])
            .inc();
        Status::invalid_argument(format!("invalid target: {error}"))
    }
}

/// The peer address of a request as text, or `unknown`.
pub(crate) fn peer<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |addr: SocketAddr| addr.to_string())
}
