//! `lookaside.v1.Admin`: what operators query with grpcurl.
//!
//! Every answer that lists things (services, a service's endpoints,
//! subscribers) is paged so that none is larger than
//! [`MAX_ADMIN_RESPONSE_BYTES`]: gRPC clients, grpcurl among them, refuse a
//! message over 4 MiB by default, so a service of a few thousand pods or a
//! fleet of xDS clients naming thousands of resources would otherwise be
//! invisible to the operator who needs to see it. A page that stops early
//! says where the next one starts (`next_offset`) and how many there are in
//! all; a request may also ask for at most `limit` entries.

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

use super::{
    BoxFuture, MAX_REQUEST_BYTES, Shared, convert, not_utf8_field, subscribers::SubscriberInfo,
};

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

/// The largest Admin response lb-server sends: gRPC's default receive limit
/// (4 MiB, what grpcurl and every stock client accept), less room for the
/// fields around the paged list.
pub const MAX_ADMIN_RESPONSE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One page of a list of `total` entries: those from `offset`, at most
/// `limit` of them (0: no limit), while their encoding fits in `budget`
/// bytes. The first entry of a page is always taken, so every page moves on.
#[derive(Debug, PartialEq)]
struct Page<T> {
    items: Vec<T>,
    total: u32,
    /// Where the next page starts; 0 when this page reaches the end.
    next_offset: u32,
}

fn page<T: prost::Message>(
    total: usize,
    offset: u32,
    limit: u32,
    budget: usize,
    mut item: impl FnMut(usize) -> T,
) -> Page<T> {
    let start = (offset as usize).min(total);
    let end = match limit {
        0 => total,
        limit => start.saturating_add(limit as usize).min(total),
    };
    let mut items = Vec::new();
    let mut used = 0;
    let mut next = end;
    for i in start..end {
        let entry = item(i);
        // A repeated field's entry: its tag, its length, then itself.
        let len = entry.encoded_len();
        let size = 1 + prost::length_delimiter_len(len) + len;
        if !items.is_empty() && used + size > budget {
            next = i;
            break;
        }
        used += size;
        items.push(entry);
    }
    Page {
        items,
        total: count(total),
        next_offset: if next < total { count(next) } else { 0 },
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn list_services(
        &self,
        request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let request = request.into_inner();
        let views = self.shared.store.services();
        let page = page(
            views.len(),
            request.offset,
            request.limit,
            MAX_ADMIN_RESPONSE_BYTES,
            |i| {
                let view = &views[i];
                ServiceSummary {
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
                }
            },
        );
        Ok(Response::new(ListServicesResponse {
            services: page.items,
            total: page.total,
            next_offset: page.next_offset,
        }))
    }

    async fn get_service(
        &self,
        request: Request<GetServiceRequest>,
    ) -> Result<Response<Service>, Status> {
        let request = request.into_inner();
        let key = self.shared.parse_target("admin", &request.target)?;
        let snapshot = self
            .shared
            .store
            .get(&key)
            .ok_or_else(|| Status::not_found(format!("no service {key}")))?;
        let page = page(
            snapshot.endpoints.len(),
            request.offset,
            request.limit,
            MAX_ADMIN_RESPONSE_BYTES,
            |i| convert::endpoint(&snapshot.endpoints[i]),
        );
        Ok(Response::new(Service {
            target: key.to_string(),
            version: snapshot.version,
            exists: snapshot.exists,
            endpoints: page.items,
            updated: Some(convert::timestamp(snapshot.updated)),
            subscribers: count(self.shared.store.subscribers(&key)),
            total_endpoints: page.total,
            next_offset: page.next_offset,
        }))
    }

    async fn list_subscribers(
        &self,
        request: Request<ListSubscribersRequest>,
    ) -> Result<Response<ListSubscribersResponse>, Status> {
        let request = request.into_inner();
        let list = self.shared.subscribers.list();
        let page = page(
            list.len(),
            request.offset,
            request.limit,
            MAX_ADMIN_RESPONSE_BYTES,
            |i| subscriber(&list[i]),
        );
        Ok(Response::new(ListSubscribersResponse {
            subscribers: page.items,
            total: page.total,
            next_offset: page.next_offset,
        }))
    }
}

fn subscriber(info: &SubscriberInfo) -> Subscriber {
    Subscriber {
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
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn summary(i: usize) -> ServiceSummary {
        ServiceSummary {
            target: format!("svc-{i:04}.default:grpc"),
            ..Default::default()
        }
    }

    /// Every page of a list, walked by `next_offset` as grpcurl users do.
    fn walk(total: usize, limit: u32, budget: usize) -> Vec<Page<ServiceSummary>> {
        let mut pages = vec![page(total, 0, limit, budget, summary)];
        while pages.last().unwrap().next_offset != 0 {
            let offset = pages.last().unwrap().next_offset;
            pages.push(page(total, offset, limit, budget, summary));
        }
        pages
    }

    #[test]
    fn pages_stay_within_the_budget_and_cover_the_list_once() {
        let one = summary(0).encoded_len() + 2;
        for (total, limit, budget) in [(1000, 0, 100 * one), (1000, 7, usize::MAX), (5, 0, 1)] {
            let pages = walk(total, limit, budget);
            let all: Vec<String> = pages
                .iter()
                .flat_map(|p| p.items.iter().map(|s| s.target.clone()))
                .collect();
            let want: Vec<String> = (0..total).map(|i| summary(i).target).collect();
            assert_eq!(all, want, "total {total} limit {limit} budget {budget}");
            for p in &pages {
                assert_eq!(p.total as usize, total);
                let response = ListServicesResponse {
                    services: p.items.clone(),
                    ..Default::default()
                };
                // A budget below one entry still moves on, one entry a page.
                assert!(
                    response.encoded_len() <= budget.max(one),
                    "{} > {budget}",
                    response.encoded_len()
                );
                if limit > 0 {
                    assert!(p.items.len() <= limit as usize);
                }
            }
        }
        // 100 entries fit a budget of 100 entries exactly: ten pages.
        assert_eq!(walk(1000, 0, 100 * one).len(), 10);
    }

    #[test]
    fn an_offset_past_the_end_is_an_empty_last_page() {
        let p = page(3, 10, 0, MAX_ADMIN_RESPONSE_BYTES, summary);
        assert_eq!(
            p,
            Page {
                items: vec![],
                total: 3,
                next_offset: 0
            }
        );
    }
}
