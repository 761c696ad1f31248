//! The subscription: watches the target on an LB server, fails over between
//! LB servers, and falls back to static or DNS addresses.
//!
//! When every LB server is unreachable the pool keeps the last list it had:
//! backends do not go away because the control plane restarts. Reconnects
//! back off with jitter.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use lookaside_backoff::{Backoff, JitteredBackoff};
use lookaside_proto::lookaside::v1::{
    MAX_WATCH_RESPONSE_BYTES, WatchRequest, WatchResponse, discovery_client::DiscoveryClient,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tokio_util::sync::CancellationToken;

use crate::pool::{EndpointSpec, ListState, Pool};

/// How long an LB server has to send the first snapshot after the stream opens.
const FIRST_ANSWER: Duration = Duration::from_secs(3);

/// A fallback address: used while no LB server has answered, or when the LB
/// server says the service does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// `IP:PORT`.
    Static(SocketAddr),
    /// `dns:///HOST:PORT`: every address HOST resolves to.
    Dns(String),
}

impl Fallback {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        if let Some(host_port) = text.strip_prefix("dns:///") {
            let (host, port) = host_port.rsplit_once(':')?;
            (!host.is_empty() && port.parse::<u16>().is_ok())
                .then(|| Fallback::Dns(host_port.into()))
        } else {
            text.parse().ok().map(Fallback::Static)
        }
    }

    async fn resolve(&self) -> Vec<SocketAddr> {
        match self {
            Fallback::Static(addr) => vec![*addr],
            Fallback::Dns(host_port) => match tokio::net::lookup_host(host_port.as_str()).await {
                Ok(addrs) => addrs.collect(),
                Err(error) => {
                    tracing::warn!(%error, host = %host_port, "fallback DNS lookup failed");
                    Vec::new()
                }
            },
        }
    }
}

/// One LB server: its endpoint and, for an `https://` URL, the TLS
/// configuration and the name its certificate must carry (the URL's host).
pub(crate) struct LbServer {
    pub(crate) endpoint: tonic::transport::Endpoint,
    pub(crate) tls: Option<(crate::tls::Loaded, ServerName<'static>)>,
}

impl LbServer {
    fn uri(&self) -> &http::Uri {
        self.endpoint.uri()
    }

    async fn connect(&self) -> Result<tonic::transport::Channel, String> {
        let connected = match &self.tls {
            None => self.endpoint.connect().await,
            Some((loaded, name)) => {
                self.endpoint
                    .connect_with_connector(TlsConnect {
                        // The configuration in use now: a rotation applies
                        // from the next connection on.
                        connector: TlsConnector::from(loaded.config.current()),
                        name: name.clone(),
                    })
                    .await
            }
        };
        connected.map_err(|error| {
            // tonic wraps the connector's error: show the innermost reason
            // (the TLS one) rather than "transport error".
            let mut source: &dyn std::error::Error = &error;
            while let Some(next) = source.source() {
                source = next;
            }
            match source.downcast_ref::<std::io::Error>() {
                Some(io)
                    if io
                        .get_ref()
                        .is_some_and(|e| e.is::<tokio_rustls::rustls::Error>()) =>
                {
                    crate::tls::handshake_error(io)
                }
                _ => format!("{error}: {source}"),
            }
        })
    }
}

/// Connects to an LB server over TLS (tonic's own TLS is not compiled in:
/// this keeps one TLS stack, rustls with *ring*, for every connection).
#[derive(Clone)]
struct TlsConnect {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl tower_service::Service<http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = this.connector.connect(this.name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Runs the subscription until `shutdown`.
pub(crate) struct Subscription {
    pub(crate) pool: Arc<Pool>,
    pub(crate) lbs: Vec<LbServer>,
    pub(crate) fallback: Vec<Fallback>,
}

enum Ended {
    /// Try again (possibly on the next LB server).
    Retry(String),
    /// The LB server rejected the target: retrying cannot help.
    Rejected(String),
}

impl Subscription {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).start();
        let mut answered = false;
        for lb in self.lbs.iter().cycle() {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = self.watch(lb, &mut answered, &mut backoff) => ended,
            };
            self.pool.counters.lb_errors.inc();
            match ended {
                Ended::Rejected(message) => {
                    tracing::error!(%message, "LB server rejected the target; not retrying");
                    self.pool.set_list_state(ListState::Rejected { message });
                    return;
                }
                Ended::Retry(error) => {
                    tracing::debug!(lb = %lb.uri(), %error, "LB subscription ended; retrying");
                    if !answered {
                        if self.fallback.is_empty() {
                            self.pool.set_list_state(ListState::Waiting {
                                last_error: Some(format!("{}: {error}", lb.uri())),
                            });
                        } else {
                            self.use_fallback(format!(
                                "no LB server answered ({}: {error})",
                                lb.uri()
                            ))
                            .await;
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn watch(
        &self,
        lb: &LbServer,
        answered: &mut bool,
        backoff: &mut JitteredBackoff,
    ) -> Ended {
        let channel = match lb.connect().await {
            Ok(channel) => channel,
            Err(error) => return Ended::Retry(format!("connect: {error}")),
        };
        let request = WatchRequest {
            target: self.pool.target.clone(),
            ..Default::default()
        };
        // Accept every response lb-server may send (tonic's default is 4 MiB).
        let mut client =
            DiscoveryClient::new(channel).max_decoding_message_size(MAX_WATCH_RESPONSE_BYTES);
        let mut stream = match client.watch(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                return Ended::Rejected(status.message().to_owned());
            }
            Err(status) => return Ended::Retry(format!("watch: {status}")),
        };
        let mut first = true;
        loop {
            let message = if first {
                match tokio::time::timeout(FIRST_ANSWER, stream.message()).await {
                    Ok(message) => message,
                    Err(_) => return Ended::Retry("no snapshot within 3s".into()),
                }
            } else {
                stream.message().await
            };
            let update = match message {
                Ok(Some(update)) => update,
                Ok(None) => return Ended::Retry("stream ended".into()),
                Err(status) => return Ended::Retry(format!("stream: {status}")),
            };
            first = false;
            *answered = true;
            backoff.reset();
            self.pool.counters.lb_updates.inc();
            self.apply(update).await;
        }
    }

    async fn apply(&self, update: WatchResponse) {
        if update.exists {
            tracing::debug!(
                version = update.version,
                endpoints = update.endpoints.len(),
                "LB update"
            );
            self.pool.apply(specs(&update));
            self.pool.set_list_state(ListState::Lb {
                version: update.version,
            });
        } else if self.fallback.is_empty() {
            self.pool.apply(Vec::new());
            self.pool.set_list_state(ListState::Unknown);
        } else {
            self.use_fallback("the LB server does not know the service".into())
                .await;
        }
    }

    async fn use_fallback(&self, reason: String) {
        let mut specs = Vec::new();
        for fallback in &self.fallback {
            for addr in fallback.resolve().await {
                specs.push(EndpointSpec {
                    addr,
                    weight: 1,
                    zone: String::new(),
                    pod: String::new(),
                    draining: false,
                });
            }
        }
        specs.sort_by_key(|s| s.addr);
        specs.dedup_by_key(|s| s.addr);
        tracing::info!(%reason, addresses = specs.len(), "using fallback addresses");
        self.pool.apply(specs);
        self.pool.set_list_state(ListState::Fallback { reason });
    }
}

/// Endpoints of a Watch response; entries with a bad address are skipped.
fn specs(update: &WatchResponse) -> Vec<EndpointSpec> {
    update
        .endpoints
        .iter()
        .filter_map(|e| {
            let ip = e.address.parse().ok()?;
            let port = u16::try_from(e.port).ok()?;
            Some(EndpointSpec {
                addr: SocketAddr::new(ip, port),
                weight: e.weight.max(1),
                zone: e.zone.clone(),
                pod: e.pod.clone(),
                draining: e.draining,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_forms() {
        assert_eq!(
            Fallback::parse("10.0.0.1:80"),
            Some(Fallback::Static("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            Fallback::parse("dns:///localhost:50051"),
            Some(Fallback::Dns("localhost:50051".into()))
        );
        for bad in ["localhost", "dns:///localhost", "dns:///:80", "10.0.0.1"] {
            assert_eq!(Fallback::parse(bad), None, "{bad}");
        }
    }
}
