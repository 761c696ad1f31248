//! Puts it together: binds the ports, starts the source, serves every API,
//! and drains on shutdown within a deadline.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info_span};

use crate::{
    api::{
        Shared, Subscribers,
        admin::AdminApi,
        discovery::DiscoveryApi,
        grpclb::GrpclbApi,
        xds::{
            XdsApi,
            resources::{Resources, UpstreamTls},
        },
    },
    config::{Config, SourceKind},
    http::{self, HttpState},
    limits::{Limits, RequestLimitsLayer},
    listener::{self, ServerTls},
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
    limits: Limits,
    /// The gRPC port's TLS, and the files it is reloaded from.
    tls: Option<(ServerTls, lookaside_tls::ServerFiles)>,
    /// Admin's own port (`--admin-listen`).
    admin: Option<TcpListener>,
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
    /// Loads the TLS files and the source, then binds the ports. Broken TLS
    /// files, a broken file source or an unusable Kubernetes configuration is
    /// an error here, before any port opens.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let tls = match config.tls_files() {
            Some(files) => {
                let loaded = files.load().context("TLS")?;
                Some((lookaside_tls::Reloading::new(loaded), files))
            }
            None => None,
        };
        let store = Store::with_coalesce_window(config.coalesce_window);
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
        let mut limits = config.limits();
        let (max_connections, fd_limit) = listener::fit_to_fd_limit(limits.max_connections);
        if let Some(fd_limit) = fd_limit {
            tracing::warn!(
                asked = limits.max_connections,
                max_connections,
                fd_limit,
                "the file descriptor limit lowers --max-connections"
            );
            limits.max_connections = max_connections;
        }
        let grpc = listen_for_a_fleet(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let http = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.metrics_listen))?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            grpc,
            http,
            source,
            store,
            metrics,
            limits,
            tls,
            admin,
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

    /// The bound Admin address, when Admin has a port of its own.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .map(|admin| admin.local_addr().expect("bound listener has an address"))
    }

    /// The store the source publishes into.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, ends every
    /// stream, and waits for the rest within the configured deadline: an
    /// error if calls were still in flight when it passed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let subscribers = Subscribers::new();
        let (synced_tx, synced_rx) = watch::channel(false);
        let shared = Shared::new(
            self.store.clone(),
            self.metrics.clone(),
            subscribers.clone(),
            token.clone(),
            synced_rx.clone(),
        );
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
        tracker.spawn(
            http::serve(
                self.http,
                http::router(http_state),
                self.limits.metrics_header_timeout,
                self.metrics.rejected_connections.clone(),
                token.clone(),
            )
            .instrument(info_span!("http")),
        );

        // A rotation of the TLS files takes effect for new connections.
        let _tls_watch = self.tls.as_ref().map(|(tls, files)| {
            let reloads = self.metrics.tls_reloads.clone();
            let load = files.clone();
            tls.watch(
                files.paths(),
                move || load.load(),
                move |result| match result {
                    Ok(()) => {
                        reloads.with_label_values(&["ok"]).inc();
                        tracing::info!("TLS files changed; new connections use them");
                    }
                    Err(error) => {
                        reloads.with_label_values(&["error"]).inc();
                        tracing::warn!(%error, "TLS files changed but cannot be used; keeping the last good ones");
                    }
                },
            )
        });

        let limits = self.limits;
        let closer = listener::Closer::default();
        let admin_apart = self.admin.is_some();
        let rejected = &self.metrics.rejected_connections;
        // One layer for both ports: the request memory is the process's.
        let request_limits = RequestLimitsLayer::new(&limits, self.metrics.rejected.clone());
        let server = || {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
                .max_concurrent_streams(limits.max_streams_per_connection)
                .layer(request_limits.clone())
        };

        if let Some(admin) = self.admin {
            let incoming = listener::incoming(
                "admin",
                admin,
                None,
                limits,
                rejected.clone(),
                token.clone(),
                closer.clone(),
            );
            let (v1, v1alpha) = reflection(&["lookaside.v1.Admin"])?;
            let router = server()
                .add_service(AdminApi::server(shared.clone()))
                .add_service(v1)
                .add_service(v1alpha);
            let admin_token = token.clone();
            tracker.spawn(
                async move {
                    let served = router
                        .serve_with_incoming_shutdown(incoming, admin_token.cancelled_owned())
                        .await;
                    if let Err(error) = served {
                        tracing::error!(%error, "Admin server failed");
                    }
                }
                .instrument(info_span!("admin")),
            );
        }

        let mut services = vec![
            "lookaside.v1.Discovery",
            "grpc.lb.v1.LoadBalancer",
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "grpc.health.v1.Health",
        ];
        if !admin_apart {
            services.push("lookaside.v1.Admin");
        }
        let (reflection_v1, reflection_v1alpha) = reflection(&services)?;
        let grpc_token = token.clone();
        let incoming = listener::incoming(
            "grpc",
            self.grpc,
            self.tls.map(|(tls, _)| tls),
            limits,
            rejected.clone(),
            token.clone(),
            closer.clone(),
        );
        let router = server()
            .add_service(DiscoveryApi::server(shared.clone()))
            .add_optional_service((!admin_apart).then(|| AdminApi::server(shared.clone())))
            .add_service(GrpclbApi::server(
                shared.clone(),
                self.config.grpclb_stats_interval,
            ))
            .add_service(XdsApi::server(shared, xds_resources(&self.config)))
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
        // Every stream has been told to end. A client that reads gets the
        // end at once; one that stopped reading leaves its streams' end
        // queued behind flow control. The connections still open at half the
        // deadline are closed, so that such a client cannot hold the process
        // to its deadline. Closing them cuts short only requests still being
        // received (a message partly sent): those make the shutdown a failure,
        // as calls still running at the deadline do.
        let deadline = self.config.shutdown_timeout;
        let finished = async {
            let _ = (&mut grpc).await;
            tracker.wait().await;
        };
        tokio::pin!(finished);
        if tokio::time::timeout(deadline / 2, &mut finished)
            .await
            .is_err()
        {
            let arriving = request_limits.memory_in_use();
            let closed = closer.close_all();
            tracing::warn!(
                connections = closed,
                request_bytes_arriving = arriving,
                "closing the connections still open at half the shutdown deadline"
            );
            if tokio::time::timeout(deadline - deadline / 2, &mut finished)
                .await
                .is_err()
            {
                anyhow::bail!(
                    "the shutdown deadline ({deadline:?}) passed with calls still in flight"
                );
            }
            if arriving > 0 {
                anyhow::bail!(
                    "requests were still arriving when the connections were closed at half the \
                     shutdown deadline ({deadline:?})"
                );
            }
        }
        Ok(())
    }
}

/// What the xDS clusters carry: the balancing policy and, with
/// `--xds-upstream-tls`, mutual TLS to the backends.
fn xds_resources(config: &Config) -> Resources {
    let upstream_tls = config.xds_upstream_tls.then(|| UpstreamTls {
        sds_dir: config.xds_upstream_sds_dir.display().to_string(),
    });
    Resources::new(config.xds_lb_policy).with_upstream_tls(upstream_tls)
}

/// Reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha) listing
/// `services` (those a port serves) and reflection itself, so grpcurl can
/// call them by name.
fn reflection(
    services: &[&str],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        services.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(lookaside_proto::LOOKASIDE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                ),
            |builder, service| builder.with_service_name(*service),
        )
    };
    let v1 = builder().build_v1().context("building reflection v1")?;
    let v1alpha = builder()
        .build_v1alpha()
        .context("building reflection v1alpha")?;
    Ok((v1, v1alpha))
}

/// An error and its causes as one line, each cause said once: a cause whose
/// text an outer error already printed (as kube's and io's errors do, by
/// including their source in their own message) is left out.
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
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

/// The queue of connections not yet accepted on the gRPC port. A fleet
/// reconnects at once after a restart; with the standard library's 128
/// (what `TcpListener::bind` uses) the kernel dropped SYNs in a benchmarked
/// storm of 10,000, and each dropped client waited a second to retry. The
/// kernel caps it at `net.core.somaxconn` (4,096 by default).
pub const GRPC_BACKLOG: u32 = 4096;

/// Binds `addr` as `TcpListener::bind` does (`SO_REUSEADDR`), with
/// [`GRPC_BACKLOG`].
fn listen_for_a_fleet(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(GRPC_BACKLOG)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let wrapped = anyhow::Error::new(io)
            .context("cannot read /x: no such file")
            .context("TLS");
        assert_eq!(
            super::error_text(&wrapped),
            "TLS: cannot read /x: no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&plain), "outer: inner");
    }
}
