//! The subscription: watches the target on an LB server, fails over between
//! LB servers, and falls back to static or DNS addresses.
//!
//! When every LB server is unreachable the pool keeps the last list it had:
//! backends do not go away because the control plane restarts. Reconnects
//! back off with jitter.
//!
//! The subscription asks for incremental updates: after the first full
//! snapshot the LB server sends only what changed, and [`HeldList`] applies
//! each diff to the list this stream holds, so the pool is always handed a
//! whole list. A diff from a version other than the one held (which a
//! correct server never sends) ends the stream; the next one starts with a
//! full snapshot.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use lookaside_backoff::{Backoff, JitteredBackoff};
use lookaside_proto::lookaside::v1::{
    Endpoint, MAX_WATCH_RESPONSE_BYTES, WatchRequest, WatchResponse,
    discovery_client::DiscoveryClient,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tokio_util::sync::CancellationToken;

use crate::{
    pool::{EndpointSpec, ListState, Pool},
    zones::{Hints, ZoneShare},
};

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
        let locality = self.pool.locality();
        let request = WatchRequest {
            target: self.pool.target.clone(),
            zone: locality.zone.clone(),
            node: locality.node.clone(),
            ..Default::default()
        };
        // Diffs after the first snapshot: one changed endpoint costs the
        // server and this client the same whatever the size of the service.
        let request = WatchRequest {
            incremental: true,
            ..request
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
        let mut held = HeldList::default();
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
            let update = match held.apply(update) {
                Ok(update) => update,
                Err(error) => return Ended::Retry(error),
            };
            self.apply(update).await;
        }
    }

    async fn apply(&self, update: WatchResponse) {
        // Whole in every response, diffs included.
        self.pool.set_zone_shares(if update.exists {
            zone_shares(&update)
        } else {
            Vec::new()
        });
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
                    hints: Hints::default(),
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

/// The list one Watch stream has sent so far, to apply its diffs to.
#[derive(Debug, Default)]
struct HeldList {
    /// The version held; `None` until the stream's first full snapshot.
    version: Option<u64>,
    /// By address and port, the endpoint's identity.
    endpoints: BTreeMap<(String, u32), Endpoint>,
}

impl HeldList {
    /// Applies `update` (a full snapshot or a diff) and returns the whole
    /// list it leaves, as a full snapshot; an error for a diff from a
    /// version other than the one held.
    fn apply(&mut self, update: WatchResponse) -> Result<WatchResponse, String> {
        if !update.incremental {
            self.endpoints = update
                .endpoints
                .iter()
                .map(|e| ((e.address.clone(), e.port), e.clone()))
                .collect();
            self.version = Some(update.version);
            return Ok(update);
        }
        if self.version != Some(update.base_version) {
            return Err(format!(
                "a diff from version {} while holding {:?}",
                update.base_version, self.version
            ));
        }
        for key in &update.removed {
            self.endpoints.remove(&(key.address.clone(), key.port));
        }
        for endpoint in &update.endpoints {
            self.endpoints
                .insert((endpoint.address.clone(), endpoint.port), endpoint.clone());
        }
        self.version = Some(update.version);
        Ok(WatchResponse {
            endpoints: self.endpoints.values().cloned().collect(),
            incremental: false,
            base_version: 0,
            removed: Vec::new(),
            ..update
        })
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
                hints: Hints {
                    for_zones: e.for_zones.clone(),
                    for_nodes: e.for_nodes.clone(),
                },
            })
        })
        .collect()
}

/// The zone shares of a Watch response.
fn zone_shares(update: &WatchResponse) -> Vec<ZoneShare> {
    update
        .zone_shares
        .iter()
        .map(|s| ZoneShare {
            zone: s.zone.clone(),
            share: s.share,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lookaside_proto::lookaside::v1::EndpointKey;

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

    fn endpoint(last: u8, weight: u32) -> Endpoint {
        Endpoint {
            address: format!("10.0.0.{last}"),
            port: 80,
            weight,
            ..Default::default()
        }
    }

    fn addresses(update: &WatchResponse) -> Vec<(String, u32)> {
        update
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.weight))
            .collect()
    }

    #[test]
    fn diffs_apply_to_the_held_list_and_a_wrong_base_is_refused() {
        let mut held = HeldList::default();
        let diff = |base, version, endpoints, removed: &[u8]| WatchResponse {
            version,
            exists: true,
            endpoints,
            incremental: true,
            base_version: base,
            removed: removed
                .iter()
                .map(|last| EndpointKey {
                    address: format!("10.0.0.{last}"),
                    port: 80,
                })
                .collect(),
            ..Default::default()
        };
        // Nothing held yet: no diff applies.
        assert!(held.apply(diff(0, 1, vec![], &[])).is_err());

        let full = WatchResponse {
            version: 5,
            exists: true,
            endpoints: vec![endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)],
            ..Default::default()
        };
        assert_eq!(held.apply(full.clone()).unwrap(), full);

        // 1 removed, 2 changed, 4 added.
        let list = held
            .apply(diff(5, 9, vec![endpoint(2, 7), endpoint(4, 1)], &[1]))
            .unwrap();
        assert!(!list.incremental && list.removed.is_empty() && list.version == 9);
        let want = [("10.0.0.2", 7), ("10.0.0.3", 1), ("10.0.0.4", 1)];
        assert_eq!(addresses(&list), want.map(|(a, w)| (a.to_owned(), w)));

        // A diff from a version not held (skipped, or from before a restart).
        let error = held.apply(diff(5, 12, vec![], &[3])).unwrap_err();
        assert!(error.contains("from version 5"), "{error}");

        // A full snapshot replaces whatever was held.
        let full = WatchResponse {
            version: 2,
            exists: true,
            endpoints: vec![endpoint(8, 1)],
            ..Default::default()
        };
        held.apply(full).unwrap();
        let list = held.apply(diff(2, 3, vec![], &[])).unwrap();
        assert_eq!(addresses(&list), [("10.0.0.8".to_owned(), 1)]);
    }
}
