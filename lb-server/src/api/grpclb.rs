//! `grpc.lb.v1.LoadBalancer/BalanceLoad`: the grpclb protocol for stock gRPC clients.
//!
//! The client sends `initial_request` with a target name; we answer with
//! `initial_response` (the client stats interval), then a `server_list` of the
//! non-draining endpoints, and a new one on every change. For an unknown
//! service we send `fallback_response`. Weights repeat an entry (interleaved,
//! by `lookaside_weights::schedule`), since grpclb clients round-robin over
//! the list.

use std::{net::IpAddr, pin::Pin, time::Duration};

use futures::Stream;
use lookaside_proto::grpclb::v1::{
    ClientStats, FallbackResponse, InitialLoadBalanceResponse, LoadBalanceRequest,
    LoadBalanceResponse, Server, ServerList,
    load_balance_request::LoadBalanceRequestType,
    load_balance_response::LoadBalanceResponseType,
    load_balancer_server::{LoadBalancer, LoadBalancerServer},
};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Request, Response, Status, Streaming};

use super::{MAX_REQUEST_BYTES, Protocol, Shared, subscribers::SubscriberGuard};
use crate::{model::Snapshot, store::Subscription};

/// Names of this many bytes or more are rejected, as the protocol specifies.
pub const MAX_NAME_BYTES: usize = 256;

/// The grpclb service.
#[derive(Debug, Clone)]
pub struct GrpclbApi {
    shared: Shared,
    stats_interval: Duration,
}

impl GrpclbApi {
    /// Wraps the service for tonic, with the request size limit.
    pub fn server(shared: Shared, stats_interval: Duration) -> LoadBalancerServer<Self> {
        LoadBalancerServer::new(Self {
            shared,
            stats_interval,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

type BalanceLoadStream = Pin<Box<dyn Stream<Item = Result<LoadBalanceResponse, Status>> + Send>>;

/// What the response stream sends next.
enum Phase {
    Initial,
    Current,
    Watching,
}

struct StreamState {
    phase: Phase,
    subscription: Subscription,
    guard: SubscriberGuard,
    inbound: Streaming<LoadBalanceRequest>,
    inbound_open: bool,
    last_sent: Option<LoadBalanceResponseType>,
    /// Shutdown, for this stream.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Shared,
    stats_interval: Duration,
}

#[tonic::async_trait]
impl LoadBalancer for GrpclbApi {
    type BalanceLoadStream = BalanceLoadStream;

    async fn balance_load(
        &self,
        request: Request<Streaming<LoadBalanceRequest>>,
    ) -> Result<Response<BalanceLoadStream>, Status> {
        let peer = super::peer(&request);
        let mut inbound = request.into_inner();
        // `--request-timeout` bounds the wait (crate::limits).
        let first = inbound
            .message()
            .await
            .map_err(|status| self.shared.request_error("grpclb", status))?;
        let name = match first.and_then(|m| m.load_balance_request_type) {
            Some(LoadBalanceRequestType::InitialRequest(initial)) => initial.name,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be initial_request",
                ));
            }
        };
        if name.len() >= MAX_NAME_BYTES {
            self.shared
                .metrics
                .rejected
                .with_label_values(&["grpclb", "too_long"])
                .inc();
            return Err(Status::invalid_argument(format!(
                "initial_request.name is {} bytes; it must be under {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        let key = self.shared.parse_target("grpclb", &name)?;
        if !self.shared.synced().await {
            return Err(Shared::not_synced());
        }
        tracing::debug!(target_key = %key, %peer, "grpclb stream started");
        let state = StreamState {
            phase: Phase::Initial,
            subscription: self.shared.store.subscribe(&key),
            guard: self
                .shared
                .subscribers
                .register(peer, key.to_string(), Protocol::Grpclb),
            inbound,
            inbound_open: true,
            last_sent: None,
            stopped: self.shared.stream_stopped(),
            shared: self.shared.clone(),
            stats_interval: self.stats_interval,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            next_response,
        ))))
    }
}

/// Produces the next response, reading client stats while it waits.
async fn next_response(
    mut s: StreamState,
) -> Option<(Result<LoadBalanceResponse, Status>, StreamState)> {
    loop {
        let response = match s.phase {
            Phase::Initial => {
                s.phase = Phase::Current;
                let interval =
                    prost_types::Duration::try_from(s.stats_interval).unwrap_or_default();
                LoadBalanceResponseType::InitialResponse(InitialLoadBalanceResponse {
                    client_stats_report_interval: (!s.stats_interval.is_zero()).then_some(interval),
                })
            }
            Phase::Current => {
                s.phase = Phase::Watching;
                let snapshot = s.subscription.current();
                s.guard.sent(snapshot.version);
                response_for(&snapshot)
            }
            Phase::Watching => {
                tokio::select! {
                    _ = &mut s.stopped => return None,
                    snapshot = s.subscription.next() => {
                        s.guard.sent(snapshot.version);
                        let response = response_for(&snapshot);
                        if s.last_sent.as_ref() == Some(&response) {
                            continue;
                        }
                        s.shared.record_push(Protocol::Grpclb, Some(snapshot.event_at));
                        response
                    }
                    message = s.inbound.message(), if s.inbound_open => {
                        match message {
                            Ok(Some(LoadBalanceRequest {
                                load_balance_request_type: Some(LoadBalanceRequestType::ClientStats(stats)),
                            })) => record_stats(&s, &stats),
                            Ok(Some(_)) => {
                                tracing::debug!("ignoring a second initial_request");
                            }
                            Ok(None) => s.inbound_open = false,
                            Err(status) => {
                                // A client that went away reads nothing; one
                                // that broke a limit learns which.
                                tracing::debug!(%status, "grpclb stream ended by its client");
                                s.inbound_open = false;
                                return Some((Err(status), s));
                            }
                        }
                        continue;
                    }
                }
            }
        };
        s.last_sent = Some(response.clone());
        let message = LoadBalanceResponse {
            load_balance_response_type: Some(response),
        };
        return Some((Ok(message), s));
    }
}

/// Adds a client's report to the metrics and its subscriber's totals, which
/// saturate; a report with a negative count is refused whole and counted
/// (`rejected_requests_total{api="grpclb",reason="negative_stats"}`).
fn record_stats(s: &StreamState, stats: &ClientStats) {
    let drops = || stats.calls_finished_with_drop.iter().map(|d| d.num_calls);
    let counts = [
        stats.num_calls_started,
        stats.num_calls_finished,
        stats.num_calls_finished_with_client_failed_to_send,
        stats.num_calls_finished_known_received,
    ];
    if counts.iter().copied().chain(drops()).any(|count| count < 0) {
        s.shared
            .metrics
            .rejected
            .with_label_values(&["grpclb", "negative_stats"])
            .inc();
        tracing::debug!("grpclb client stats with a negative count ignored");
        return;
    }
    let dropped = drops().fold(0i64, i64::saturating_add);
    let [started, finished, failed_to_send, known_received] = counts;
    let counter = &s.shared.metrics.grpclb_client_calls;
    for (kind, value) in [
        ("started", started),
        ("finished", finished),
        ("failed_to_send", failed_to_send),
        ("known_received", known_received),
        ("dropped", dropped),
    ] {
        counter
            .with_label_values(&[kind])
            .inc_by(value.unsigned_abs());
    }
    s.guard.record_grpclb(|totals| {
        totals.last_report = Some(std::time::SystemTime::now());
        totals.reports = totals.reports.saturating_add(1);
        totals.calls_started = totals.calls_started.saturating_add(started);
        totals.calls_finished = totals.calls_finished.saturating_add(finished);
        totals.calls_failed_to_send = totals.calls_failed_to_send.saturating_add(failed_to_send);
        totals.calls_known_received = totals.calls_known_received.saturating_add(known_received);
        totals.calls_dropped = totals.calls_dropped.saturating_add(dropped);
    });
}

/// A server list for an existing service, fallback for an unknown one.
fn response_for(snapshot: &Snapshot) -> LoadBalanceResponseType {
    if !snapshot.exists {
        return LoadBalanceResponseType::FallbackResponse(FallbackResponse {});
    }
    LoadBalanceResponseType::ServerList(server_list(snapshot))
}

/// The non-draining endpoints, each repeated in proportion to its weight and
/// interleaved so that consecutive picks spread out: the workspace's one
/// weighted scheduler (`lookaside_weights::schedule`, which lb-client's
/// round-robin picker uses too), since grpclb clients round-robin over the
/// list as it comes.
fn server_list(snapshot: &Snapshot) -> ServerList {
    let serving: Vec<_> = snapshot.serving().collect();
    let weights: Vec<u32> = serving.iter().map(|e| e.weight).collect();
    let servers = lookaside_weights::schedule(&weights)
        .into_iter()
        .map(|index| {
            let endpoint = serving[index as usize];
            Server {
                ip_address: match endpoint.address {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                },
                port: i32::from(endpoint.port),
                load_balance_token: String::new(),
                drop: false,
            }
        })
        .collect();
    ServerList { servers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    fn snapshot(endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            endpoints: endpoints.into(),
            exists: true,
            ..Snapshot::unknown()
        }
    }

    #[test]
    fn weights_repeat_interleaved_and_draining_is_left_out() {
        let a = Endpoint::new("10.0.0.1".parse().unwrap(), 80).weight(4);
        let b = Endpoint::new("::1".parse().unwrap(), 81).weight(2);
        let c = Endpoint::new("10.0.0.3".parse().unwrap(), 82).draining();
        let list = server_list(&snapshot(vec![a, b, c]));
        let ports: Vec<i32> = list.servers.iter().map(|s| s.port).collect();
        assert_eq!(ports, [80, 81, 80], "weights 4:2 reduce to 2:1");
        assert_eq!(list.servers[0].ip_address, [10, 0, 0, 1]);
        assert_eq!(list.servers[1].ip_address.len(), 16);
    }

    #[test]
    fn unknown_service_gets_fallback() {
        assert!(matches!(
            response_for(&Snapshot::unknown()),
            LoadBalanceResponseType::FallbackResponse(_)
        ));
        let huge = Endpoint::new("10.0.0.1".parse().unwrap(), 80).weight(1_000_000);
        let one = Endpoint::new("10.0.0.2".parse().unwrap(), 80);
        assert_eq!(server_list(&snapshot(vec![huge, one])).servers.len(), 101);
    }
}
