//! Puts it together: binds the ports, starts the source, serves every API,
//! and drains on shutdown within a deadline.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info_span};

use crate::{
    api::{
        Shared, Subscribers, admin::AdminApi, discovery::DiscoveryApi, grpclb::GrpclbApi,
        xds::XdsApi,
    },
    config::{Config, SourceKind},
    http::{self, HttpState},
    metrics::Metrics,
    source::{file::FileSource, kube::KubeSource},
    store::Store,
};

enum Source {
    File(FileSource),
    Kube(KubeSource),
}

/// An lb-server with its ports bound and its source loaded, ready to run.
pub struct LbServer {
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    source: Source,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for LbServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbServer")
            .field("grpc", &self.grpc.local_addr().ok())
            .field("http", &self.http.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl LbServer {
    /// Loads the source, then binds both ports. A broken file source or an
    /// unusable Kubernetes configuration is an error here, before any port opens.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let source = match config.source {
            SourceKind::File => {
                let path = config
                    .file
                    .clone()
                    .context("--source file needs --file PATH")?;
                Source::File(FileSource::start(
                    path,
                    config.file_poll_interval,
                    store.clone(),
                    metrics.clone(),
                )?)
            }
            SourceKind::Kube => {
                let client = kube::Client::try_default()
                    .await
                    .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
                Source::Kube(KubeSource::new(
                    client,
                    config.namespaces.clone(),
                    store.clone(),
                    metrics.clone(),
                ))
            }
        };
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let http = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.metrics_listen))?;
        Ok(Self {
            config,
            grpc,
            http,
            source,
            store,
            metrics,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The bound HTTP (metrics) address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The store the source publishes into.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, ends every
    /// stream, and waits for the rest within the configured deadline.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let subscribers = Subscribers::new();
        let shared = Shared::new(
            self.store.clone(),
            self.metrics.clone(),
            subscribers.clone(),
            token.clone(),
        );

        let (synced_tx, synced_rx) = watch::channel(false);
        let source_token = token.clone();
        match self.source {
            Source::File(file) => tracker.spawn(
                file.run(synced_tx, source_token)
                    .instrument(info_span!("source", kind = "file")),
            ),
            Source::Kube(kube) => tracker.spawn(
                kube.run(synced_tx, source_token)
                    .instrument(info_span!("source", kind = "kube")),
            ),
        };

        // Ready once synced, until shutdown starts.
        let (ready_tx, ready_rx) = watch::channel(false);
        let (health, health_service) = tonic_health::server::health_reporter();
        {
            let mut synced = synced_rx;
            let token = token.clone();
            tracker.spawn(
                async move {
                    let synced = tokio::select! {
                        _ = token.cancelled() => false,
                        ok = synced.wait_for(|s| *s) => ok.is_ok(),
                    };
                    if synced {
                        ready_tx.send_replace(true);
                        set_health(&health, tonic_health::ServingStatus::Serving).await;
                        tracing::info!("source synced; ready");
                    }
                    token.cancelled().await;
                    ready_tx.send_replace(false);
                    set_health(&health, tonic_health::ServingStatus::NotServing).await;
                }
                .instrument(info_span!("readiness")),
            );
        }

        let http_state = HttpState {
            store: self.store.clone(),
            subscribers,
            metrics: self.metrics.clone(),
            ready: ready_rx,
        };
        let http_token = token.clone();
        let http_listener = self.http;
        tracker.spawn(
            async move {
                let served = axum::serve(http_listener, http::router(http_state))
                    .with_graceful_shutdown(http_token.cancelled_owned())
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "metrics server failed");
                }
            }
            .instrument(info_span!("http")),
        );

        // Reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha), listing
        // health and reflection too so grpcurl can call them.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(lookaside_proto::LOOKASIDE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building reflection v1alpha")?;

        let grpc_token = token.clone();
        let incoming = grpc_incoming(self.grpc);
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .add_service(DiscoveryApi::server(shared.clone()))
            .add_service(AdminApi::server(shared.clone()))
            .add_service(GrpclbApi::server(
                shared.clone(),
                self.config.grpclb_stats_interval,
            ))
            .add_service(XdsApi::server(shared, self.config.xds_lb_policy))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let mut grpc = tokio::spawn(
            router
                .serve_with_incoming_shutdown(incoming, grpc_token.cancelled_owned())
                .instrument(info_span!("grpc")),
        );

        tokio::select! {
            _ = shutdown => {}
            result = &mut grpc => {
                token.cancel();
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error).context("gRPC server failed"),
                    Err(error) => Err(error).context("gRPC server task failed"),
                };
            }
        }
        tracing::info!("shutting down: ending streams");
        token.cancel();
        tracker.close();
        let drained = tokio::time::timeout(self.config.shutdown_timeout, async {
            let _ = grpc.await;
            tracker.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                deadline = ?self.config.shutdown_timeout,
                "shutdown deadline passed; exiting with work in flight"
            );
        }
        Ok(())
    }
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in [
        "",
        "lookaside.v1.Discovery",
        "lookaside.v1.Admin",
        "grpc.lb.v1.LoadBalancer",
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
    ] {
        health.set_service_status(service, status).await;
    }
}

/// The gRPC port's connections, each with `TCP_NODELAY`. tonic sets it only
/// on sockets it accepts itself, not on an incoming stream it is handed (ours,
/// so that the port is bound before the server runs). Without it a second
/// small write waits for the peer's ACK of the first (Nagle), which a delayed
/// ACK can hold for 40 ms. A socket that refuses it is served anyway.
fn grpc_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on a gRPC connection");
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn grpc_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::grpc_incoming(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
