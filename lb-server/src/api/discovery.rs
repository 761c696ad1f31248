//! `lookaside.v1.Discovery/Watch`: the current snapshot at once, then every newer one.

use std::pin::Pin;

use futures::Stream;
use lookaside_proto::lookaside::v1::{
    WatchRequest, WatchResponse,
    discovery_server::{Discovery, DiscoveryServer},
};
use tonic::{Request, Response, Status};

use super::{MAX_REQUEST_BYTES, Protocol, Shared, pb};

/// The Discovery service.
#[derive(Debug, Clone)]
pub struct DiscoveryApi {
    shared: Shared,
}

impl DiscoveryApi {
    /// Wraps the service for tonic, with the request size limit.
    pub fn server(shared: Shared) -> DiscoveryServer<Self> {
        DiscoveryServer::new(Self { shared }).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryApi {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
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
        let shared = self.shared.clone();
        let state = (subscription, guard, true);
        let stream = futures::stream::unfold(state, move |(mut sub, guard, first)| {
            let shared = shared.clone();
            async move {
                let snapshot = if first {
                    sub.current()
                } else {
                    tokio::select! {
                        _ = shared.shutdown.cancelled() => return None,
                        snapshot = sub.next() => {
                            let protocol = Protocol::Discovery.as_str();
                            shared.metrics.pushes.with_label_values(&[protocol]).inc();
                            shared
                                .metrics
                                .push_latency
                                .with_label_values(&[protocol])
                                .observe(snapshot.event_at.elapsed().as_secs_f64());
                            snapshot
                        }
                    }
                };
                guard.sent(snapshot.version);
                let response = pb::watch_response(sub.key(), &snapshot);
                Some((Ok(response), (sub, guard, false)))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
