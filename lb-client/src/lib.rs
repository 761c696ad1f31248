//! lb-client: Lookaside's client library.
//!
//! It subscribes to an LB server with `lookaside.v1.Discovery/Watch`, keeps one
//! HTTP/2 connection per backend, and balances every call: request-level
//! balancing without a proxy hop. Its [`Channel`] is a `tower::Service` that
//! tonic-generated clients accept as their transport:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use lookaside_proto::helloworld::greeter_client::GreeterClient;
//! let channel = lb_client::Channel::builder("greeter.default:grpc")
//!     .lb("http://lb-server.lookaside:7000")
//!     .policy(lb_client::Policy::PeakEwma)
//!     .connect()
//!     .await?;
//! let client = GreeterClient::new(channel);
//! # Ok(()) }
//! ```
//!
//! Over TLS: `https://` LB URLs are TLS, and [`Builder::tls`] sets the CAs and
//! the client certificate (mTLS) for the LB connection and the backends at
//! once ([`Builder::lb_tls`] and [`Builder::backend_tls`] set them apart).
//! The files are reloaded when they change. A backend's certificate must
//! carry `NAME.NAMESPACE.svc` ([`Builder::tls_server_name`] overrides it),
//! and calls carry `:authority` `NAME.NAMESPACE.svc:PORT`
//! ([`Builder::authority`] overrides it). A call's `grpc-timeout` is
//! enforced: it ends with `DEADLINE_EXCEEDED` and the stream is reset.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use lookaside_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
//! let tls = lb_client::ClientTls::ca_file("/etc/lookaside/tls/ca.crt")
//!     .identity("/etc/lookaside/tls/tls.crt", "/etc/lookaside/tls/tls.key");
//! let channel = lb_client::Channel::builder("greeter.default:grpc")
//!     .lb("https://lb-server.lookaside:7000")
//!     .tls(tls)
//!     .connect()
//!     .await?;
//! let mut request = tonic::Request::new(HelloRequest { name: "you".into() });
//! request.set_timeout(std::time::Duration::from_secs(1));
//! GreeterClient::new(channel).say_hello(request).await?;
//! # Ok(()) }
//! ```
//!
//! Draining endpoints get no new calls while calls in flight finish; failing
//! endpoints are ejected with backoff (never all of them, even when they fail
//! at the same moment): at once on `UNAVAILABLE` or a broken connection, after
//! a streak of server errors or passed deadlines
//! ([`Builder::consecutive_failures`]), so that one slow call does not eject a
//! healthy backend; when the LB server
//! is unreachable the channel keeps its last list and resubscribes with
//! jittered backoff. With no usable endpoint a call fails fast with
//! `UNAVAILABLE` and a message that says why.
//!
//! Zones: a channel that knows its zone ([`Builder::zone`], default from the
//! `LB_ZONE` environment variable) says it on its Watch, and the LB server,
//! which knows the zones of every client and every endpoint, answers with the
//! share of its calls each zone should take: calls stay in the local zone
//! while it has the capacity and spill over to the others in proportion. A
//! zone with no usable endpoint is skipped at once, within the call.
//! EndpointSlice hints are honoured as kube-proxy honours them (see
//! [`Builder::zone`]); [`Channel::calls_per_zone`] shows where calls went.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let channel = lb_client::Channel::builder("greeter.default:grpc")
//!     .lb("http://lb-server.lookaside:7000")
//!     .zone("europe-west1-b")
//!     .connect()
//!     .await?;
//! println!("{:?}", channel.zone_shares());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`channel`]: the builder and the `tower::Service` (the hot path).
//! - `picker`: round-robin, peak-EWMA, least-request and weighted round
//!   robin picks.
//! - `wrr`: weighted round robin's weights from backend load reports (ORCA).
//! - `zones`: zone-aware picks: EndpointSlice hints, then zone shares, then
//!   every endpoint, each layer falling through to the next within a call.
//! - `pool`: one connection per backend, ejection, list updates.
//! - `resolver`: the LB subscription, failover and fallback.
//! - `endpoint`: per-backend atomics (load, latency, health).
//! - `body`: the response body that ends a call and reads its status.
//! - [`stats`]: counters a user can export.
//! - `tls`: [`ClientTls`], the files a channel's TLS is loaded from.

mod body;
pub mod channel;
mod endpoint;
mod picker;
mod pool;
mod resolver;
pub mod stats;
mod tls;
mod wrr;
mod zones;

pub use body::ResponseBody;
pub use channel::{Builder, Channel, Error, ResponseFuture};
pub use lookaside_tls::TlsError;
pub use picker::Policy;
pub use stats::{ChannelStats, EndpointStats};
pub use tls::ClientTls;
pub use wrr::WrrConfig;
