//! The channels greeter-client calls through when it does not use lookaside,
//! and the demo's baseline: one channel to one address (what a ClusterIP
//! Service gives) or one over every address a DNS name resolves to (what a
//! headless Service and a DNS resolver give), in plaintext or over TLS.
//!
//! TLS is rustls with *ring*, configured by `lookaside-tls` as lb-client's
//! is. tonic's own TLS is not compiled in: with it, tonic takes over every
//! `https://` endpoint, lb-client's included, and refuses connectors that
//! bring their own TLS. The connector here dials the endpoint's address and
//! makes the handshake itself.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use lookaside_tls::ClientFiles;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tokio_util::either::Either;
use tonic::{
    body::Body,
    codegen::http::{Request, Response, Uri},
    transport::{Channel, Endpoint},
};
use tower::{
    BoxError, balance::p2c::Balance, buffer::Buffer, discover::ServiceList, load::Constant,
    util::BoxCloneService,
};

/// How long a connection (with its TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls queued for a [`Balanced`] channel before callers wait.
const BALANCED_QUEUE: usize = 1024;

/// TLS for a channel: whom to trust, what to present, which name to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CAs a server's certificate must chain to and, for servers that
    /// require one (mTLS), the client certificate and key.
    pub files: ClientFiles,
    /// The name the server's certificate must carry. Default: the host the
    /// channel was given (`HOST` of `HOST:PORT`).
    pub server_name: Option<String>,
}

/// A channel over several connections, one per address; each call goes on
/// one of them (power of two choices, every connection weighing the same:
/// what tonic's `balance_list` does).
pub type Balanced = BoxCloneService<Request<Body>, Response<Body>, BoxError>;

/// A [`Balanced`] channel and the addresses it spreads calls over.
#[derive(Debug)]
pub struct Resolved {
    /// The channel.
    pub channel: Balanced,
    /// Every address the name resolved to, once.
    pub addrs: Vec<SocketAddr>,
}

/// One channel to `addr` (`HOST:PORT`), connected before it returns: every
/// call on one HTTP/2 connection. Over TLS the server's certificate must
/// name `HOST` (or `tls.server_name`).
pub async fn direct(addr: &str, tls: Option<&Tls>) -> anyhow::Result<Channel> {
    let connector = Connector::new(host_of(addr), tls)?;
    let endpoint = connector.endpoint(addr, addr)?;
    let how = match &connector.tls {
        Some((_, name)) => format!(" over TLS as {}", name.to_str()),
        None => String::new(),
    };
    endpoint
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to {addr}{how}"))
}

/// A channel over every address `host_port` resolves to, resolved once,
/// each connected on its first call: the headless-Service way. Calls carry
/// `:authority` `host_port`; over TLS every server's certificate must name
/// `HOST` (or `tls.server_name`), as a DNS client verifies the name it
/// resolved, not the addresses.
pub async fn dns(host_port: &str, tls: Option<&Tls>) -> anyhow::Result<Resolved> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "{host_port} resolves to no address");
    let connector = Connector::new(host_of(host_port), tls)?;
    let channels = addrs
        .iter()
        .map(|addr| {
            let endpoint = connector.endpoint(&addr.to_string(), host_port)?;
            Ok(Constant::new(
                endpoint.connect_with_connector_lazy(connector.clone()),
                0,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let balance = Balance::new(ServiceList::new(channels));
    Ok(Resolved {
        channel: BoxCloneService::new(Buffer::new(balance, BALANCED_QUEUE)),
        addrs,
    })
}

/// `HOST` of `HOST:PORT`, without an IPv6 address's brackets.
fn host_of(host_port: &str) -> &str {
    host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Dials the address of the URI it is given (as tonic's own connector
/// does), then, for TLS, makes the handshake verifying one name.
#[derive(Clone)]
struct Connector {
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Connector {
    /// A connector for servers at `host`; over TLS when `tls` is given.
    fn new(host: &str, tls: Option<&Tls>) -> anyhow::Result<Self> {
        let Some(tls) = tls else {
            return Ok(Self { tls: None });
        };
        let config = tls.files.load()?;
        let name = tls.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_owned())
            .with_context(|| format!("{name:?} is not a name TLS can verify"))?;
        Ok(Self {
            tls: Some((TlsConnector::from(Arc::new(config)), name)),
        })
    }

    /// An endpoint that dials `addr` and whose calls carry `:authority`
    /// `authority`.
    fn endpoint(&self, addr: &str, authority: &str) -> anyhow::Result<Endpoint> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let origin: Uri = format!("{scheme}://{authority}")
            .parse()
            .with_context(|| format!("bad address {authority:?}"))?;
        Ok(Endpoint::from_shared(format!("{scheme}://{addr}"))
            .with_context(|| format!("bad address {addr:?}"))?
            .origin(origin)
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT))
    }
}

impl tower::Service<Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Stream>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, std::io::Result<Self::Response>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to dial")
            })?;
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            let stream = match tls {
                None => Either::Left(tcp),
                Some((connector, name)) => {
                    Either::Right(Box::new(connector.connect(name, tcp).await?))
                }
            };
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A connection in plaintext or over TLS.
type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

#[cfg(test)]
mod tests {
    use super::{dns, host_of};
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn dns_calls_carry_the_name_resolved_as_authority() {
        // A bare HTTP/2 server that answers every request with the
        // `:authority` it came with, in a header.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    let authority = request.uri().authority().map(|a| a.to_string());
                    hyper::Response::builder()
                        .header("authority", authority.unwrap_or_default())
                        .body(String::new())
                },
            );
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await
        });
        let resolved = dns(&format!("localhost:{port}"), None).await.unwrap();
        let request = tonic::codegen::http::Request::builder()
            .uri("/helloworld.Greeter/SayHello")
            .body(tonic::body::Body::empty())
            .unwrap();
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            resolved.channel.oneshot(request),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            response.headers()["authority"],
            format!("localhost:{port}").as_str()
        );
        server.abort();
    }

    #[test]
    fn the_name_verified_by_default_is_the_host_without_brackets() {
        assert_eq!(
            host_of("greeter-headless.default:50051"),
            "greeter-headless.default"
        );
        assert_eq!(host_of("127.0.0.1:50051"), "127.0.0.1");
        assert_eq!(host_of("[::1]:50051"), "::1");
    }
}
