//! `lookaside.v1.Discovery/Watch`: the current snapshot at once, then every newer one.
//!
//! Written by hand rather than generated so that a snapshot is encoded and
//! framed once per version and the same bytes go to every subscriber: with
//! thousands of subscribers per service, per-subscriber message building,
//! encoding or even copying would dominate a push. The response body is ours
//! too (no tonic encoder and its per-stream buffer), since idle subscribers
//! are the common case.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use lookaside_proto::lookaside::v1::WatchRequest;
use prost::Message;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, body::Body, codec::Streaming, server::NamedService};

use super::{
    Answer, BoxFuture, HandWritten, MAX_REQUEST_BYTES, Protocol, Shared, pb,
    subscribers::SubscriberGuard,
};
use crate::{
    model::{ServiceKey, Snapshot},
    store::SnapshotStream,
};

const WATCH_PATH: &str = "/lookaside.v1.Discovery/Watch";

/// A snapshot as one gRPC message of the Watch response (the 5-byte length
/// prefix and the encoded `WatchResponse`), made once per snapshot and shared
/// by every subscriber of its service (see [`Snapshot::encoded`]).
fn framed(key: &ServiceKey, snapshot: &Snapshot) -> Bytes {
    snapshot
        .encoded
        .get_or_init(|| {
            let message = pb::watch_response(key, snapshot);
            let len = message.encoded_len();
            let mut framed = BytesMut::with_capacity(5 + len);
            framed.put_u8(0); // not compressed
            framed.put_u32(u32::try_from(len).expect("a snapshot encodes to under 4 GiB"));
            message
                .encode(&mut framed)
                .expect("the buffer was sized for the message");
            framed.freeze()
        })
        .clone()
}

/// The Discovery service, as a tonic-compatible tower service.
#[derive(Debug, Clone)]
pub struct DiscoveryApi {
    shared: Shared,
}

impl DiscoveryApi {
    /// The service, ready for `Server::add_service`.
    pub fn server(shared: Shared) -> HandWritten<Self> {
        HandWritten(Self { shared })
    }

    /// Reads the one `WatchRequest`, then answers with headers and a body
    /// that streams snapshots.
    async fn watch(self, request: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let (parts, body) = request.into_parts();
        let peer = super::peer(&tonic::Request::from_http(http::Request::from_parts(
            parts,
            (),
        )));
        let decoder = tonic_prost::ProstDecoder::<WatchRequest>::default();
        let mut requests = Streaming::new_request(decoder, body, None, Some(MAX_REQUEST_BYTES));
        let request = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("Watch needs a WatchRequest message"))?;
        let key = self.shared.parse_target("discovery", &request.target)?;
        let mut subscription = self.shared.store.subscribe(&key);
        let guard = self
            .shared
            .subscribers
            .register(peer, key.to_string(), Protocol::Discovery);
        tracing::debug!(target_key = %key, "discovery watch started");
        let current = subscription.current();
        guard.sent(current.version);
        let body = WatchBody {
            first: Some(framed(&key, &current)),
            key,
            updates: subscription.into_stream(),
            guard,
            stopped: self.shared.stream_stopped(),
            shared: self.shared,
            ended: false,
        };
        Ok(http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Body::new(body))
            .expect("static headers are valid"))
    }
}

/// The body of one Watch response: the current snapshot at once, then every
/// newer one, each as the shared bytes [`framed`] made (no per-subscriber
/// encoding or copy); at shutdown, OK trailers.
struct WatchBody {
    first: Option<Bytes>,
    key: ServiceKey,
    updates: SnapshotStream,
    guard: SubscriberGuard,
    /// Shutdown, for this stream.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Shared,
    ended: bool,
}

impl WatchBody {
    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if this.stopped.as_mut().poll(cx).is_ready() {
            return this.end();
        }
        match ready!(this.updates.poll_next_unpin(cx)) {
            Some(snapshot) => {
                this.shared
                    .record_push(Protocol::Discovery, Some(snapshot.event_at));
                this.guard.sent(snapshot.version);
                Poll::Ready(Some(Ok(Frame::data(framed(&this.key, &snapshot)))))
            }
            None => this.end(),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.first.is_none()
    }
}

impl NamedService for DiscoveryApi {
    const NAME: &'static str = "lookaside.v1.Discovery";
}

impl Answer for DiscoveryApi {
    fn answer(self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>> {
        Box::pin(async move {
            if request.uri().path() != WATCH_PATH {
                return Status::unimplemented("no such method in lookaside.v1.Discovery")
                    .into_http();
            }
            self.watch(request)
                .await
                .unwrap_or_else(|status| status.into_http())
        })
    }
}
