//! The gRPC edge: Discovery, grpclb, xDS, Admin, plus the subscriber registry they share.
//!
//! This is the only place domain errors become `tonic::Status`. It knows
//! nothing of Kubernetes: it reads the [`Store`](crate::store::Store).

pub mod admin;
pub mod client_text;
pub mod convert;
pub mod discovery;
pub mod grpclb;
pub mod rate;
pub mod subscribers;
pub mod xds;
pub mod zones;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, body::Body, server::NamedService};

use crate::{
    metrics::{Metrics, PushMetrics},
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
    /// True once the source has synced: its first full list is in the store.
    synced: tokio::sync::watch::Receiver<bool>,
    /// Push metrics by protocol, in [`Protocol::ALL`] order.
    push_metrics: Arc<[PushMetrics; 3]>,
}

impl Shared {
    /// What the APIs share, with the push metrics of each protocol looked up once.
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        subscribers: Arc<Subscribers>,
        shutdown: CancellationToken,
        synced: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let push_metrics = Arc::new(Protocol::ALL.map(|p| metrics.push_metrics(p.as_str())));
        Self {
            store,
            metrics,
            subscribers,
            shutdown,
            synced,
            push_metrics,
        }
    }

    /// Whether the source has synced.
    pub(crate) fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the source has synced; false if the server stops first.
    /// Until then the store knows no service: an answer would tell a client
    /// that the service it watches does not exist, and the client would drop
    /// the list it holds (lb-client riding out an lb-server restart on its
    /// cached list, Envoy its clusters). So every API answers only after it.
    pub(crate) async fn synced(&self) -> bool {
        let mut synced = self.synced.clone();
        tokio::select! {
            ok = synced.wait_for(|s| *s) => ok.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// The status of a call that ended before the source synced.
    pub(crate) fn not_synced() -> Status {
        Status::unavailable("lb-server stopped before its source had synced")
    }

    /// Parses a client's target, counting and converting a bad one into `InvalidArgument`.
    pub(crate) fn parse_target(&self, api: &str, target: &str) -> Result<ServiceKey, Status> {
        parse_target(target).map_err(|error| self.reject(api, &error))
    }

    /// Completes when the server shuts down; one per stream, kept for the
    /// stream's life and polled on each of its wake-ups. It waits on a child
    /// of the shutdown token: every poll takes its token's lock, and a child
    /// token's lock is the stream's own rather than one all streams share.
    pub(crate) fn stream_stopped(&self) -> Pin<Box<WaitForCancellationFutureOwned>> {
        Box::pin(self.shutdown.child_token().cancelled_owned())
    }

    /// Counts an update pushed to a subscriber and, when the source event
    /// behind it is known, its latency from that event.
    pub(crate) fn record_push(&self, protocol: Protocol, event_at: Option<std::time::Instant>) {
        let metrics = &self.push_metrics[protocol.index()];
        metrics.pushes.inc();
        if let Some(event_at) = event_at {
            metrics.latency.observe(event_at.elapsed().as_secs_f64());
        }
    }

    /// The status for a request message that could not be read. A string
    /// field that is not UTF-8 (a target, an xDS resource name) is the
    /// client's mistake: prost refuses it and tonic calls that `INTERNAL`;
    /// it is `INVALID_ARGUMENT` here, counted as
    /// `rejected_requests_total{reason="not_utf8"}`. Other statuses pass as they are.
    pub(crate) fn request_error(&self, api: &str, status: Status) -> Status {
        let Some(field) = not_utf8_field(&status) else {
            return status;
        };
        self.metrics
            .rejected
            .with_label_values(&[api, "not_utf8"])
            .inc();
        Status::invalid_argument(format!("invalid request: {field} is not valid UTF-8"))
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

/// The field named by tonic's status for a prost decode error that is a
/// string field not in UTF-8 (`WatchRequest.target`), if `status` is one.
/// prost names the error kind only in its text, so the text is matched;
/// a test pins it for every API.
fn not_utf8_field(status: &Status) -> Option<&str> {
    if status.code() != tonic::Code::Internal {
        return None;
    }
    let path = status
        .message()
        .strip_prefix("failed to decode Protobuf message: ")?
        .strip_suffix(": invalid string value: data is not UTF-8 encoded")?;
    // A nested field reads `Inner.field: Outer.field`: the innermost names it.
    path.split(": ").next()
}

/// The peer address of a request as text, or `unknown`: from the
/// listener's [`ConnInfo`](crate::limits::ConnInfo), or tonic's own when a
/// test serves the APIs on a listener of its own.
pub(crate) fn peer<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<crate::limits::ConnInfo>()
        .and_then(|info| info.remote)
        .or_else(|| request.remote_addr())
        .map_or_else(|| "unknown".to_owned(), |addr: SocketAddr| addr.to_string())
}

/// A gRPC service that reads and writes the HTTP/2 request and response
/// itself instead of through tonic's generated codec (Discovery, ADS), so
/// that one encoded message can be shared by every stream it goes to.
pub trait RawService: Clone + Send + 'static {
    /// The response to one request, errors included (as `Status::into_http`).
    fn respond(self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>>;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A [`RawService`] as the tower service tonic's router takes (as a
/// generated `FooServer<T>` wraps a `T: Foo`).
#[derive(Debug, Clone)]
pub struct RawServer<S>(S);

impl<S: NamedService> NamedService for RawServer<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for RawServer<S>
where
    S: RawService,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.0.clone().respond(request.map(Body::new));
        Box::pin(async move { Ok(response.await) })
    }
}

/// One gRPC message: the 5-byte prefix (uncompressed, length) and the
/// encoded message, in a buffer of exactly that size.
pub(crate) fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut framed = BytesMut::with_capacity(5 + len);
    framed.put_u8(0);
    framed.put_u32(u32::try_from(len).expect("a message encodes to under 4 GiB"));
    message
        .encode(&mut framed)
        .expect("the buffer was sized for the message");
    framed.freeze()
}

/// The response of a hand-written streaming method: each item of `messages`
/// is one message made by [`grpc_frame`] (or shared bytes made by it once),
/// sent as it is; OK trailers when the stream ends, the status if it fails.
/// No encoder or buffer stays with the stream between messages.
pub(crate) fn streaming_response<S>(messages: S) -> http::Response<Body>
where
    S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static,
{
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(MessagesBody {
            messages,
            ended: false,
        }))
        .expect("static headers are valid")
}

struct MessagesBody<S> {
    messages: S,
    ended: bool,
}

impl<S> http_body::Body for MessagesBody<S>
where
    S: Stream<Item = Result<Bytes, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.messages.poll_next_unpin(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
