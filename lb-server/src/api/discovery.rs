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

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lookaside_proto::lookaside::v1::WatchRequest;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, body::Body, codec::Streaming, server::NamedService};

use super::{
    RawService, BoxFuture, RawServer, MAX_REQUEST_BYTES, Protocol, Shared, grpc_frame, convert,
    streaming_response, subscribers::SubscriberGuard,
};
use crate::{
    model::{ServiceKey, Snapshot},
    store::SnapshotStream,
};

const WATCH_PATH: &str = "/lookaside.v1.Discovery/Watch";

/// A snapshot as one gRPC message of the Watch response, framed once per
/// snapshot and shared by every subscriber of its service (see
/// [`Snapshot::encoded`]).
pub fn framed(key: &ServiceKey, snapshot: &Snapshot) -> Bytes {
    snapshot
        .encoded
        .get_or_init(|| grpc_frame(&convert::watch_response(key, snapshot)))
        .clone()
}

/// The Discovery service, as a tonic-compatible tower service.
#[derive(Debug, Clone)]
pub struct DiscoveryApi {
    shared: Shared,
}

impl DiscoveryApi {
    /// The service, ready for `Server::add_service`.
    pub fn server(shared: Shared) -> RawServer<Self> {
        RawServer(Self { shared })
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
        let messages = WatchMessages {
            first: Some(framed(&key, &current)),
            key,
            updates: subscription.into_stream(),
            guard,
            stopped: self.shared.stream_stopped(),
            shared: self.shared,
        };
        Ok(streaming_response(messages))
    }
}

/// The messages of one Watch response: the current snapshot at once, then
/// every newer one, each as the shared bytes [`framed`] made (no
/// per-subscriber encoding or copy); they end at shutdown.
struct WatchMessages {
    first: Option<Bytes>,
    key: ServiceKey,
    updates: SnapshotStream,
    guard: SubscriberGuard,
    /// Shutdown, for this stream.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Shared,
}

impl Stream for WatchMessages {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match ready!(this.updates.poll_next_unpin(cx)) {
            Some(snapshot) => {
                this.shared
                    .record_push(Protocol::Discovery, Some(snapshot.event_at));
                this.guard.sent(snapshot.version);
                Poll::Ready(Some(Ok(framed(&this.key, &snapshot))))
            }
            None => Poll::Ready(None),
        }
    }
}

impl NamedService for DiscoveryApi {
    const NAME: &'static str = "lookaside.v1.Discovery";
}

impl RawService for DiscoveryApi {
    fn respond(self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>> {
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
