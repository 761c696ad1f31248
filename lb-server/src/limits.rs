//! Every limit that protects lb-server from its clients, in one place.
//!
//! A client, hostile or broken, meets a named limit before it can take more
//! than its share of memory, time or connections; each limit is a flag (see
//! [`Limits`]) or a constant here, and each hit is counted in
//! `lookaside_rejected_connections_total{listener,reason}` or
//! `lookaside_rejected_requests_total{api,reason}`.
//!
//! | limit | protects against |
//! |---|---|
//! | [`Limits::max_connections`] | file descriptors and per-connection memory |
//! | [`Limits::handshake_timeout`] | connections that never finish TLS or never send the HTTP/2 preface |
//! | [`Limits::max_streams_per_connection`] | one connection opening thousands of streams |
//! | [`max_message_bytes`] (per API) | one request message declaring megabytes |
//! | [`Limits::request_memory`], [`CONNECTION_REQUEST_BYTES`] | many half-sent messages, each reserving its declared size |
//! | [`Limits::request_timeout`] | streams that never send their first message, messages that never complete |
//! | [`Limits::metrics_header_timeout`], [`MAX_HTTP_CONNECTIONS`] | idle or slow connections on the metrics port |
//! | [`MAX_XDS_NAMES_PER_REQUEST`], [`XDS_REQUESTS_PER_SECOND`] (with the rest of the xDS stream limits in [`crate::api::xds`]) | one ADS stream keeping a core busy |
//! | the NACK log limits in [`crate::api::xds`], [`crate::api::client_text`] | log floods and forged log lines |
//! | `lookaside_proto::lookaside::v1::MAX_WATCH_RESPONSE_BYTES` (responses, agreed with lb-client) | a Watch message larger than clients accept |
//! | [`MAX_ADMIN_RESPONSE_BYTES`](crate::api::admin::MAX_ADMIN_RESPONSE_BYTES) (Admin answers are paged) | an Admin answer larger than grpcurl and stock clients accept |
//! | [`Closer`](crate::listener::Closer), at half of `--shutdown-timeout` | clients that stop reading holding the process at shutdown |
//! | [`MAX_FILE_BYTES`](crate::source::file::MAX_FILE_BYTES), [`MAX_NESTING`](crate::source::file::MAX_NESTING) (the file source, parsed off the runtime) | a huge or deeply nested YAML file stalling the APIs or the memory |
//!
//! The request limits are enforced by [`RequestLimitsLayer`], which reads the
//! gRPC framing of every request body as it arrives: it knows each message's
//! declared length from its 5-byte prefix before tonic's decoder reserves
//! room for it, so an oversized or over-budget message is refused before any
//! memory is set aside for it.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http_body::Frame;
use prometheus::IntCounterVec;
use tokio::time::Sleep;
use tonic::{Status, body::Body};

pub use crate::api::xds::{MAX_XDS_NAMES_PER_REQUEST, XDS_REQUESTS_PER_SECOND};
use crate::api::{MAX_REQUEST_BYTES, xds::MAX_XDS_REQUEST_BYTES};

/// Bytes of request messages one connection may be receiving at once
/// (declared sizes of messages begun but not complete): two of the largest
/// request any API takes.
pub const CONNECTION_REQUEST_BYTES: usize = 2 * MAX_XDS_REQUEST_BYTES;

/// Connections the metrics port serves at once (Prometheus needs one; a
/// kubelet probe one more).
pub const MAX_HTTP_CONNECTIONS: usize = 256;

/// File descriptors kept back from [`Limits::max_connections`] for
/// everything else lb-server opens (the Kubernetes API, the file source, the
/// metrics port, logs).
pub const RESERVED_FDS: u64 = 512;

/// The limits lb-server puts on its clients; the flags of the same names set
/// them (see [`crate::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// gRPC connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Time from accepting a connection to its TLS handshake and HTTP/2
    /// preface being done.
    pub handshake_timeout: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Time a stream may take to send its first complete message, and any
    /// later message may take from its first byte to its last.
    pub request_timeout: Duration,
    /// Bytes of request messages all connections together may be receiving
    /// at once.
    pub request_memory: usize,
    /// Time a client of the metrics port has to send a request's headers;
    /// a kept-alive connection idle that long is closed.
    pub metrics_header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 100,
            request_timeout: Duration::from_secs(10),
            request_memory: 64 * 1024 * 1024,
            metrics_header_timeout: Duration::from_secs(5),
        }
    }
}

/// The largest request message a method accepts, by its path: ADS requests
/// name every resource a client knows, so they may be larger; every other
/// request names one target or nothing.
pub fn max_message_bytes(path: &str) -> usize {
    if path.starts_with("/envoy.service.discovery.v3.") {
        MAX_XDS_REQUEST_BYTES
    } else {
        MAX_REQUEST_BYTES
    }
}

/// The `api` label of a method's path, as `rejected_requests_total` counts it.
pub fn api_label(path: &str) -> &'static str {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split('/').next())
        .unwrap_or("");
    match service {
        "lookaside.v1.Discovery" => "discovery",
        "lookaside.v1.Admin" => "admin",
        "grpc.lb.v1.LoadBalancer" => "grpclb",
        "grpc.health.v1.Health" => "health",
        s if s.starts_with("envoy.service.discovery.") => "xds",
        s if s.starts_with("grpc.reflection.") => "reflection",
        _ => "other",
    }
}

/// A number of bytes that may be taken up to a limit and given back.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes, none of them taken.
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes if that keeps the total within the limit.
    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What one connection brings to each of its requests: its peer and its
/// share of the request memory. The listener makes one per connection and
/// tonic puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: Option<std::net::SocketAddr>,
    /// This connection's request memory ([`CONNECTION_REQUEST_BYTES`]).
    pub budget: Arc<Budget>,
}

impl ConnInfo {
    /// A connection from `remote` with a budget of its own.
    pub fn new(remote: Option<std::net::SocketAddr>) -> Self {
        Self {
            remote,
            budget: Arc::new(Budget::new(CONNECTION_REQUEST_BYTES)),
        }
    }
}

/// A tower layer for tonic's server that puts every request body under the
/// request limits: message size per API, the connection's and the process's
/// request memory, and the request timeout.
#[derive(Debug, Clone)]
pub struct RequestLimitsLayer {
    shared: Arc<LayerShared>,
}

#[derive(Debug)]
struct LayerShared {
    memory: Budget,
    timeout: Duration,
    rejected: IntCounterVec,
}

impl RequestLimitsLayer {
    /// The layer, counting what it refuses in `rejected` (`{api, reason}`).
    pub fn new(limits: &Limits, rejected: IntCounterVec) -> Self {
        Self {
            shared: Arc::new(LayerShared {
                memory: Budget::new(limits.request_memory),
                timeout: limits.request_timeout,
                rejected,
            }),
        }
    }

    /// Bytes of request messages being received now, over all connections.
    pub fn memory_in_use(&self) -> usize {
        self.shared.memory.used()
    }
}

impl<S> tower::Layer<S> for RequestLimitsLayer {
    type Service = RequestLimits<S>;

    fn layer(&self, inner: S) -> RequestLimits<S> {
        RequestLimits {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`RequestLimitsLayer`] makes.
#[derive(Debug, Clone)]
pub struct RequestLimits<S> {
    inner: S,
    shared: Arc<LayerShared>,
}

impl<S> tower::Service<http::Request<Body>> for RequestLimits<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let path = request.uri().path();
        let connection = request
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.budget.clone());
        let api = api_label(path);
        let max_message = max_message_bytes(path);
        let shared = self.shared.clone();
        let request = request.map(|inner| {
            Body::new(LimitedBody {
                inner,
                api,
                max_message,
                connection,
                deadline: Some(Box::pin(tokio::time::sleep(shared.timeout))),
                shared,
                header: [0; 5],
                header_len: 0,
                remaining: 0,
                held: 0,
                failed: false,
            })
        });
        self.inner.call(request)
    }
}

/// A request body that reads the gRPC framing as it passes: it refuses a
/// message whose declared size is over its API's limit or over the memory
/// left, and a message that does not arrive in time. It holds the declared
/// size of the message being received until its last byte arrives (or the
/// body is dropped), as tonic's decoder reserves that much at its header.
struct LimitedBody {
    inner: Body,
    api: &'static str,
    max_message: usize,
    connection: Option<Arc<Budget>>,
    shared: Arc<LayerShared>,
    header: [u8; 5],
    /// Header bytes of the current message seen; 5 once it is in its body.
    header_len: usize,
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// Bytes taken from the budgets for the current message.
    held: usize,
    /// Armed from the stream's start until its first message is complete,
    /// and from each later message's first byte to its last.
    deadline: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl LimitedBody {
    fn reject(&mut self, reason: &str, status: Status) -> Status {
        self.failed = true;
        self.release();
        self.deadline = None;
        self.shared
            .rejected
            .with_label_values(&[self.api, reason])
            .inc();
        tracing::debug!(api = self.api, reason, %status, "request refused");
        status
    }

    fn release(&mut self) {
        if self.held > 0 {
            self.shared.memory.give(self.held);
            if let Some(connection) = &self.connection {
                connection.give(self.held);
            }
            self.held = 0;
        }
    }

    fn take(&mut self, len: usize) -> Result<(), Status> {
        if len > self.max_message {
            return Err(self.reject(
                "too_large",
                Status::resource_exhausted(format!(
                    "request message of {len} bytes is over the limit of {} bytes for this method",
                    self.max_message
                )),
            ));
        }
        if let Some(connection) = &self.connection
            && !connection.try_take(len)
        {
            return Err(self.reject(
                "connection_request_memory",
                Status::resource_exhausted(format!(
                    "this connection is already receiving {CONNECTION_REQUEST_BYTES} bytes of \
                     request messages; finish those first"
                )),
            ));
        }
        if !self.shared.memory.try_take(len) {
            if let Some(connection) = &self.connection {
                connection.give(len);
            }
            return Err(self.reject(
                "request_memory",
                Status::resource_exhausted(
                    "lb-server is receiving too many request bytes at once; retry later",
                ),
            ));
        }
        self.held = len;
        Ok(())
    }

    /// Follows the framing through one chunk of the body.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.header_len < 5 {
                if self.header_len == 0 && self.deadline.is_none() {
                    self.deadline = Some(Box::pin(tokio::time::sleep(self.shared.timeout)));
                }
                let n = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                data.advance(n);
                if self.header_len < 5 {
                    break;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.take(len)?;
                self.remaining = len;
            } else {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data.advance(n);
            }
            if self.remaining == 0 {
                // The message is complete: tonic decodes it from here.
                self.header_len = 0;
                self.release();
                self.deadline = None;
            }
        }
        Ok(())
    }
}

impl Drop for LimitedBody {
    fn drop(&mut self) {
        self.release();
    }
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        // The body first: a message whose bytes are here is not late, even
        // if the service was slow to read it.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.account(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(deadline) = &mut this.deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    let timeout = this.shared.timeout;
                    return Poll::Ready(Some(Err(this.reject(
                        "request_timeout",
                        Status::deadline_exceeded(format!(
                            "no complete request message within {timeout:?}"
                        )),
                    ))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
