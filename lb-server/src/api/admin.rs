//! `lookaside.v1.Admin`: what operators query with grpcurl.

use lookaside_proto::lookaside::v1::{
    GetServiceRequest, GrpclbClientStats, ListServicesRequest, ListServicesResponse,
    ListSubscribersRequest, ListSubscribersResponse, Service, ServiceSummary, Subscriber,
    XdsClient, XdsNack, XdsResourceType, ZoneShare,
    admin_server::{Admin, AdminServer},
};
use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use bytes::Bytes;
use tonic::{Code, Request, Response, Status, body::Body, server::NamedService};

use super::{BoxFuture, MAX_REQUEST_BYTES, Shared, convert, not_utf8_field};

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    shared: Shared,
}

impl AdminApi {
    /// Wraps the service for tonic, with the request size limit.
    pub fn server(shared: Shared) -> AdminService {
        AdminService {
            inner: AdminServer::new(Self {
                shared: shared.clone(),
            })
            .max_decoding_message_size(MAX_REQUEST_BYTES),
            shared,
        }
    }
}

/// The generated Admin server, with one answer of its own: a request whose
/// target is not UTF-8 is `INVALID_ARGUMENT` (see
/// [`Shared::request_error`]), not the `INTERNAL` the generated code gives
/// for any request it cannot decode, since it decodes before
/// [`AdminApi`] sees the request.
#[derive(Debug, Clone)]
pub struct AdminService {
    inner: AdminServer<AdminApi>,
    shared: Shared,
}

impl NamedService for AdminService {
    const NAME: &'static str = <AdminServer<AdminApi> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for AdminService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        let shared = self.shared.clone();
        Box::pin(async move {
            let response = response.await?;
            // A request that fails to decode gets a trailers-only response:
            // its status is in the headers.
            match Status::from_header_map(response.headers()) {
                Some(status)
                    if status.code() == Code::Internal && not_utf8_field(&status).is_some() =>
                {
                    Ok(shared.request_error("admin", status).into_http())
                }
                _ => Ok(response),
            }
        })
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let services = self
            .shared
            .store
            .services()
            .into_iter()
            .map(|view| ServiceSummary {
                target: view.key.to_string(),
                version: view.snapshot.version,
                endpoints: count(view.snapshot.endpoints.len()),
                draining: count(
                    view.snapshot
                        .endpoints
                        .iter()
                        .filter(|e| e.draining)
                        .count(),
                ),
                subscribers: count(view.subscribers),
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn get_service(
        &self,
        request: Request<GetServiceRequest>,
    ) -> Result<Response<Service>, Status> {
        let key = self
            .shared
            .parse_target("admin", &request.into_inner().target)?;
        let snapshot = self
            .shared
            .store
            .get(&key)
            .ok_or_else(|| Status::not_found(format!("no service {key}")))?;
        Ok(Response::new(Service {
            target: key.to_string(),
            version: snapshot.version,
            exists: snapshot.exists,
            endpoints: snapshot.endpoints.iter().map(convert::endpoint).collect(),
            updated: Some(convert::timestamp(snapshot.updated)),
            subscribers: count(self.shared.store.subscribers(&key)),
        }))
    }

    async fn list_subscribers(
        &self,
        _request: Request<ListSubscribersRequest>,
    ) -> Result<Response<ListSubscribersResponse>, Status> {
        let subscribers = self
            .shared
            .subscribers
            .list()
            .into_iter()
            .map(|info| Subscriber {
                peer: info.peer.clone(),
                target: info.target.clone(),
                protocol: info.protocol.as_str().to_owned(),
                connected_since: Some(convert::timestamp(info.since)),
                last_version_sent: info.last_version(),
                grpclb_stats: info.grpclb().map(|t| GrpclbClientStats {
                    last_report: t.last_report.map(convert::timestamp),
                    reports: t.reports,
                    num_calls_started: t.calls_started,
                    num_calls_finished: t.calls_finished,
                    num_calls_finished_with_client_failed_to_send: t.calls_failed_to_send,
                    num_calls_finished_known_received: t.calls_known_received,
                    num_calls_dropped: t.calls_dropped,
                }),
                xds: info.xds().map(|x| XdsClient {
                    node_id: x.node_id,
                    node_cluster: x.node_cluster,
                    user_agent: x.user_agent,
                    resource_types: x
                        .types
                        .into_iter()
                        .map(|t| XdsResourceType {
                            type_url: t.type_url,
                            resource_names: t.names,
                            last_version_sent: t.version_sent,
                            last_acked_version: t.acked_version,
                            nacks: t.nacks,
                            last_nack: t.last_nack.map(|n| XdsNack {
                                version: n.version,
                                nonce: n.nonce,
                                code: n.code,
                                message: n.message,
                                at: Some(convert::timestamp(n.at)),
                            }),
                        })
                        .collect(),
                }),
                zone: info.zone(),
                zone_shares: info
                    .zone_shares()
                    .iter()
                    .map(|s| ZoneShare {
                        zone: s.zone.to_string(),
                        share: s.share,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListSubscribersResponse { subscribers }))
    }
}
