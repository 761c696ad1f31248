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
//! Draining endpoints get no new calls while calls in flight finish; failing
//! endpoints are ejected with backoff (never all of them); when the LB server
//! is unreachable the channel keeps its last list and resubscribes with
//! jittered backoff. With no usable endpoint a call fails fast with
//! `UNAVAILABLE` and a message that says why.
//!
//! # Layout
//! - [`channel`]: the builder and the `tower::Service` (the hot path).
//! - `picker`: round-robin, peak-EWMA and least-request picks.
//! - `pool`: one connection per backend, ejection, list updates.
//! - `resolver`: the LB subscription, failover and fallback.
//! - `endpoint`: per-backend atomics (load, latency, health).
//! - `body`: the response body that ends a call and reads its status.
//! - [`stats`]: counters a user can export.

mod body;
pub mod channel;
mod endpoint;
mod picker;
mod pool;
mod resolver;
pub mod stats;
mod tls;

pub use body::ResponseBody;
pub use channel::{Builder, Channel, Error, ResponseFuture};
pub use picker::Policy;
pub use stats::{ChannelStats, EndpointStats};
pub use tls::ClientTls;
pub use lookaside_tls::TlsError;
