//! `lookaside.v1.Discovery/Watch`: the current snapshot at once, then every newer one.
//!
//! Written by hand rather than generated so that a snapshot is encoded once
//! per version and the same bytes go to every subscriber: with thousands of
//! subscribers per service, per-subscriber message building and encoding
//! would dominate a push. Each response stream also keeps a small encode
//! buffer rather than tonic's default 8 KiB, since idle subscribers are the
//! common case.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes};
use futures::Stream;
use lookaside_proto::lookaside::v1::WatchRequest;
use prost::Message;
use tonic::{
    Request, Response, Status,
    body::Body,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    server::{Grpc, NamedService, ServerStreamingService},
};

use super::{MAX_REQUEST_BYTES, Protocol, Shared, pb};
use crate::model::{ServiceKey, Snapshot};

/// An encoded `WatchResponse`, shared by every subscriber of one version.
#[derive(Debug, Clone)]
pub struct EncodedWatchResponse(Bytes);

impl EncodedWatchResponse {
    /// The snapshot's encoding, made once per snapshot (see [`Snapshot::encoded`]).
    fn of(key: &ServiceKey, snapshot: &Snapshot) -> Self {
        let bytes = snapshot
            .encoded
            .get_or_init(|| Bytes::from(pb::watch_response(key, snapshot).encode_to_vec()));
        Self(bytes.clone())
    }
}

/// The Discovery service, as a tonic-compatible tower service.
#[derive(Debug, Clone)]
pub struct DiscoveryApi {
    shared: Shared,
}

impl DiscoveryApi {
    /// The service, ready for `Server::add_service`.
    pub fn server(shared: Shared) -> Self {
        Self { shared }
    }

    async fn watch(self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let peer = super::peer(&request);
        let key = self
            .shared
            .parse_target("discovery", &request.into_inner().target)?;
        let subscription = self.shared.store.subscribe(&key);
        let guard = self
            .shared
            .subscribers
            .register(peer, key.to_string(), Protocol::Discovery);
        tracing::debug!(target_key = %key, "discovery watch started");
        // The shutdown future lives as long as the stream, so it registers
        // with the token once, not once per push.
        let stopped = self.shared.stream_stopped();
        let state = (subscription, guard, true, self, stopped);
        let stream = futures::stream::unfold(
            state,
            |(mut sub, guard, first, api, mut stopped)| async move {
                let snapshot = if first {
                    sub.current()
                } else {
                    tokio::select! {
                        _ = &mut stopped => return None,
                        snapshot = sub.next() => {
                            api.shared.record_push(Protocol::Discovery, Some(snapshot.event_at));
                            snapshot
                        }
                    }
                };
                guard.sent(snapshot.version);
                let encoded = EncodedWatchResponse::of(sub.key(), &snapshot);
                Some((Ok(encoded), (sub, guard, false, api, stopped)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<EncodedWatchResponse, Status>> + Send>>;

impl NamedService for DiscoveryApi {
    const NAME: &'static str = "lookaside.v1.Discovery";
}

struct WatchMethod(DiscoveryApi);

impl ServerStreamingService<WatchRequest> for WatchMethod {
    type Response = EncodedWatchResponse;
    type ResponseStream = WatchStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<WatchStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<WatchRequest>) -> Self::Future {
        Box::pin(self.0.clone().watch(request))
    }
}

impl<B> tower::Service<http::Request<B>> for DiscoveryApi
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            if request.uri().path() != "/lookaside.v1.Discovery/Watch" {
                return Ok(
                    Status::unimplemented("no such method in lookaside.v1.Discovery").into_http(),
                );
            }
            let mut grpc =
                Grpc::new(WatchCodec).apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
            Ok(grpc.server_streaming(WatchMethod(api), request).await)
        })
    }
}

/// Decodes `WatchRequest` with prost; "encodes" a response by copying its bytes.
struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = EncodedWatchResponse;
    type Decode = WatchRequest;
    type Encoder = PassThrough;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> PassThrough {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Copies pre-encoded bytes into the frame.
struct PassThrough;

impl Encoder for PassThrough {
    type Item = EncodedWatchResponse;
    type Error = Status;

    fn encode(
        &mut self,
        item: EncodedWatchResponse,
        dst: &mut EncodeBuf<'_>,
    ) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // A small first buffer (it grows for larger snapshots); the default
        // yield threshold.
        BufferSettings::new(512, 32 * 1024)
    }
}
