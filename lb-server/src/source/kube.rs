//! Kubernetes EndpointSlice source (being written).
use std::sync::Arc;

use crate::{metrics::Metrics, store::Store};

/// Watches EndpointSlices.
#[derive(Debug)]
pub struct KubeSource {}

impl KubeSource {
    /// Creates the source.
    pub fn new(
        _client: kube::Client,
        _namespaces: Vec<String>,
        _store: Arc<Store>,
        _metrics: Arc<Metrics>,
    ) -> Self {
        Self {}
    }

    /// Runs until shutdown.
    pub async fn run(
        self,
        _synced: tokio::sync::watch::Sender<bool>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        shutdown.cancelled().await
    }
}
