//! The protocol state of one ADS stream (state of the world, SotW).
//!
//! Per resource type it keeps what the client subscribed to, what it was last
//! sent (name → a stamp of the content), the version and nonce of the last
//! response, and the client's last ACK and NACK. It does no I/O: the stream
//! feeds it requests and a [`View`] of the store, and asks it for the next
//! response, so every rule below is unit-tested here.
//!
//! Rules:
//! - `version_info` counts the responses of a type on this stream (`1`, `2`, ...);
//!   every response has a fresh nonce (one counter over all types).
//! - A request whose `response_nonce` is not the latest one sent for its type is
//!   stale and ignored whole, as the protocol asks: the client will answer the
//!   newer response anyway. The first request of a type on a stream is never stale.
//! - With the latest nonce, a request is an ACK, or a NACK when `error_detail` is
//!   set. A NACK is recorded and nothing is re-sent: the next change of the store
//!   produces the next version. A NACK never affects other types or streams.
//! - A request that changes the subscribed names, or carries no nonce (a new
//!   subscription), is owed a response even if nothing it names exists: that is
//!   how a proxyless gRPC client learns at once that a Listener does not exist.
//! - LDS and CDS accept wildcard subscriptions (`*`, or no names on the first
//!   request, kept while the client keeps sending no names), and each response
//!   lists every subscribed resource: one that is missing was deleted. RDS and
//!   EDS are always named, and a response lists only what changed; an EDS
//!   resource whose service disappears is sent once more with no endpoints, so
//!   a client that still holds the cluster stops using stale endpoints.
//! - A name that is not a valid target, or a service that does not exist (and
//!   was not sent before), is left out of responses; it is sent once it appears.
//! - The node of the first request that has one fixes the client's kind and
//!   zone for the stream: assignments put that zone's locality at priority 0
//!   while it has a serving endpoint ([`load_assignment`](super::resources::load_assignment)).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Instant, SystemTime},
};

use envoy_types::pb::envoy::{
    config::core::v3::{ControlPlane, Node},
    service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
};

use super::{
    resources::{ClientKind, ResourceType, Resources},
    sorted_map::SortedMap,
};
use crate::{
    api::{
        client_text::kept,
        subscribers::{XdsNack, XdsStatus},
    },
    model::{ServiceKey, Snapshot, parse_target},
};

/// What the session sees of the store.
#[derive(Debug, Default)]
pub struct View {
    /// The current snapshots of the services the client names.
    pub snapshots: HashMap<ServiceKey, Arc<Snapshot>>,
    /// Every existing service, kept up to date while a wildcard subscription exists.
    pub existing: BTreeSet<ServiceKey>,
}

impl View {
    pub(super) fn exists(&self, key: &ServiceKey) -> bool {
        match self.snapshots.get(key) {
            Some(snapshot) => snapshot.exists,
            None => self.existing.contains(key),
        }
    }
}

/// The content a client was sent for one resource, to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    /// Listener, route or cluster of an existing service: it depends on nothing else.
    Present,
    /// An assignment of this snapshot version.
    Version(u64),
    /// An assignment with no endpoints, for a service that went away.
    Empty,
}

#[derive(Debug, Default)]
struct TypeState {
    /// The client asked for this type on this stream.
    requested: bool,
    /// The first request named nothing; stays until the client names something.
    legacy_wildcard: bool,
    /// Subscribed to every resource.
    wildcard: bool,
    /// Named subscriptions (without `*`), each parsed once: `None` if not a target.
    names: SortedMap<Option<ServiceKey>>,
    /// Responses sent so far; the last one's `version_info`.
    version: u64,
    /// Nonce of the last response, empty before the first.
    nonce: String,
    /// What the client holds from us, by name.
    sent: SortedMap<Stamp>,
    /// A response is owed to a request even if nothing changed.
    owed: bool,
}

/// What a request turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// A type URL we do not serve.
    UnknownType,
    /// A response nonce that is not the latest of its type: ignored.
    Stale {
        /// The request's type.
        ty: ResourceType,
    },
    /// A request we act on.
    Request {
        /// Its type.
        ty: ResourceType,
        /// What it says about our last response.
        reply: Reply,
        /// Whether it changed the subscribed names.
        names_changed: bool,
    },
}

/// What a request says about the latest response of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No nonce: a new subscription.
    Subscribe,
    /// Accepted: the client now runs this version.
    Ack {
        /// The version acknowledged.
        version: String,
    },
    /// Rejected.
    Nack(XdsNack),
}

/// A response ready to send, with what the stream needs for metrics and Admin:
/// a [`DiscoveryResponse`] of state of the world, or a delta one.
#[derive(Debug)]
pub struct Outgoing<R = DiscoveryResponse> {
    /// The message.
    pub response: R,
    /// Its type.
    pub ty: ResourceType,
    /// True when a store change caused it, false when it answers a request.
    pub push: bool,
    /// The newest store version among the assignments it carries (0 for other types).
    pub store_version: u64,
    /// The oldest source event among the assignments it carries, for push latency.
    pub oldest_event: Option<Instant>,
}

/// What lb-server keeps of the `Node` a client describes itself with: the
/// fields Admin and the logs show and the zone its assignments prefer, each
/// cut to [`MAX_KEPT_BYTES`](crate::api::client_text::MAX_KEPT_BYTES). The
/// rest (metadata, extensions, region, sub-zone) is never read, so it is not
/// kept for the stream's life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.user_agent_name`.
    pub user_agent: String,
    /// `node.locality.zone`, empty if none: its locality is priority 0 in
    /// every assignment that has a serving endpoint there.
    pub zone: String,
}

impl NodeInfo {
    /// What is kept of `node`, and the kind of client it describes.
    pub(super) fn of(node: &Node) -> (ClientKind, Self) {
        // The whole user agent, not the kept one, decides the kind.
        let kind = ClientKind::of(&node.user_agent_name);
        let info = NodeInfo {
            id: kept(&node.id),
            cluster: kept(&node.cluster),
            user_agent: kept(&node.user_agent_name),
            zone: node
                .locality
                .as_ref()
                .map(|locality| kept(&locality.zone))
                .unwrap_or_default(),
        };
        (kind, info)
    }

    /// Copies the node's fields into Admin's `status`, once.
    pub(super) fn record(&self, status: &mut XdsStatus) {
        if status.node_id.is_empty() {
            status.node_id.clone_from(&self.id);
            status.node_cluster.clone_from(&self.cluster);
            status.user_agent.clone_from(&self.user_agent);
        }
    }
}

/// The state of one ADS stream.
#[derive(Debug, Default)]
pub struct Session {
    types: [TypeState; 4],
    nonces: u64,
    /// Boxed: most streams never look at it after the first request.
    node: Option<Box<NodeInfo>>,
    /// From the node's user agent: what shape of Cluster the client reads.
    kind: ClientKind,
    /// Per type, something may need sending: a request is owed an answer or
    /// the view changed in a way that matters to the type. A plain ACK leaves
    /// it clear, and an endpoint change marks only EDS, so neither costs a
    /// recomputation of the other types.
    dirty: [bool; 4],
}

impl Session {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The node the client described in its first request, if any.
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_deref()
    }

    /// The kind of client, from the node of its first request that had one
    /// ([`ClientKind::Grpc`] until then).
    pub fn client_kind(&self) -> ClientKind {
        self.kind
    }

    /// Notes that the view changed: endpoints only, or also which services
    /// exist. The next call to [`Session::next_response`] looks at the types
    /// that depend on it.
    pub fn view_changed(&mut self, existence: bool) {
        for ty in ResourceType::SEND_ORDER {
            if existence || ty == ResourceType::Endpoint {
                self.dirty[ty.index()] = true;
            }
        }
    }

    /// Applies one request.
    pub fn handle(&mut self, request: &DiscoveryRequest) -> Handled {
        if self.node.is_none()
            && let Some(node) = &request.node
        {
            let (kind, info) = NodeInfo::of(node);
            self.kind = kind;
            self.node = Some(Box::new(info));
        }
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            return Handled::UnknownType;
        };
        let state = &mut self.types[ty.index()];
        let first = !state.requested;
        if !first && !request.response_nonce.is_empty() && request.response_nonce != state.nonce {
            return Handled::Stale { ty };
        }
        state.requested = true;

        let reply = if first || request.response_nonce.is_empty() {
            // A new subscription: the client holds nothing from this stream.
            state.sent.clear();
            state.owed = true;
            Reply::Subscribe
        } else if let Some(error) = &request.error_detail {
            Reply::Nack(XdsNack {
                version: state.version.to_string(),
                nonce: request.response_nonce.clone(),
                code: error.code,
                message: kept(&error.message),
                at: SystemTime::now(),
            })
        } else {
            Reply::Ack {
                version: request.version_info.clone(),
            }
        };

        let mut names: BTreeSet<&str> = request.resource_names.iter().map(String::as_str).collect();
        let star = names.remove("*");
        if ty.allows_wildcard() {
            if first {
                state.legacy_wildcard = names.is_empty() && !star;
            } else if !names.is_empty() {
                state.legacy_wildcard = false;
            }
        }
        let wildcard = ty.allows_wildcard() && (star || state.legacy_wildcard);
        let same_names = names.len() == state.names.len()
            && names.iter().zip(state.names.keys()).all(|(a, b)| *a == b);
        let names_changed = wildcard != state.wildcard || !same_names;
        if names_changed {
            state.sent.retain(|name| wildcard || names.contains(name));
            state.wildcard = wildcard;
            state.names = names
                .into_iter()
                .map(|name| (name.to_owned(), parse_target(name).ok()))
                .collect();
            state.owed = true;
        }
        if state.owed {
            self.dirty[ty.index()] = true;
        }
        Handled::Request {
            ty,
            reply,
            names_changed,
        }
    }

    /// Every service the client names, over all types (wildcards excluded).
    pub fn named_services(&self) -> BTreeSet<ServiceKey> {
        self.types
            .iter()
            .flat_map(|state| state.names.values())
            .flatten()
            .cloned()
            .collect()
    }

    /// Whether any type is subscribed by wildcard.
    pub fn has_wildcard(&self) -> bool {
        self.types.iter().any(|state| state.wildcard)
    }

    /// The subscribed names of a type as Admin shows them (`*` for a wildcard).
    pub fn subscribed(&self, ty: ResourceType) -> Vec<String> {
        let state = &self.types[ty.index()];
        let star = state.wildcard.then(|| "*".to_owned());
        star.into_iter()
            .chain(state.names.keys().cloned())
            .collect()
    }

    /// What the client should hold of a type now: name → (stamp, service).
    fn desired(&self, ty: ResourceType, view: &View) -> BTreeMap<String, (Stamp, ServiceKey)> {
        let state = &self.types[ty.index()];
        let mut desired = BTreeMap::new();
        if state.wildcard {
            for key in &view.existing {
                if view.exists(key) {
                    desired.insert(key.to_string(), (Stamp::Present, key.clone()));
                }
            }
        }
        for (name, key) in &state.names {
            let Some(key) = key else {
                continue;
            };
            let stamp = match ty {
                ResourceType::Endpoint => match view.snapshots.get(key) {
                    Some(snapshot) if snapshot.exists => Some(Stamp::Version(snapshot.version)),
                    _ if state.sent.contains_key(name) => Some(Stamp::Empty),
                    _ => None,
                },
                _ => view.exists(key).then_some(Stamp::Present),
            };
            if let Some(stamp) = stamp {
                desired.insert(name.clone(), (stamp, key.clone()));
            }
        }
        desired
    }

    /// The next response owed or caused by a change, if any, in the order
    /// CDS, EDS, LDS, RDS. Call until it returns `None`.
    pub fn next_response(&mut self, view: &View, resources: &Resources) -> Option<Outgoing> {
        for ty in ResourceType::SEND_ORDER {
            if !self.dirty[ty.index()] || !self.types[ty.index()].requested {
                self.dirty[ty.index()] = false;
                continue;
            }
            let desired = self.desired(ty, view);
            let state = &self.types[ty.index()];
            let include: Vec<(&String, &(Stamp, ServiceKey))> = if ty.full_state() {
                let unchanged = desired.len() == state.sent.len()
                    && desired
                        .iter()
                        .all(|(name, (stamp, _))| state.sent.get(name) == Some(stamp));
                if unchanged && !state.owed {
                    self.dirty[ty.index()] = false;
                    continue;
                }
                desired.iter().collect()
            } else {
                let changed: Vec<_> = desired
                    .iter()
                    .filter(|(name, (stamp, _))| state.sent.get(name) != Some(stamp))
                    .collect();
                if changed.is_empty() && !state.owed {
                    self.dirty[ty.index()] = false;
                    continue;
                }
                changed
            };

            let zone = self.node.as_ref().map_or("", |node| node.zone.as_str());
            let mut store_version = 0;
            let mut oldest_event: Option<Instant> = None;
            let mut resources_out = Vec::with_capacity(include.len());
            for (name, (_, key)) in &include {
                let snapshot = view.snapshots.get(key).map(Arc::as_ref);
                if ty == ResourceType::Endpoint
                    && let Some(snapshot) = snapshot.filter(|s| s.exists)
                {
                    store_version = store_version.max(snapshot.version);
                    oldest_event = Some(match oldest_event {
                        Some(at) => at.min(snapshot.event_at),
                        None => snapshot.event_at,
                    });
                }
                resources_out.push(resources.build(ty, name, key, snapshot, self.kind, zone));
            }

            self.nonces += 1;
            let nonce = self.nonces.to_string();
            let state = &mut self.types[ty.index()];
            let push = !state.owed;
            if ty.full_state() {
                state.sent.clear();
            } else {
                state.sent.retain(|name| desired.contains_key(name));
            }
            for (name, (stamp, _)) in &include {
                state.sent.insert((*name).clone(), *stamp);
            }
            state.owed = false;
            state.version += 1;
            state.nonce.clone_from(&nonce);
            return Some(Outgoing {
                response: DiscoveryResponse {
                    version_info: state.version.to_string(),
                    resources: resources_out,
                    type_url: ty.type_url().to_owned(),
                    nonce,
                    control_plane: Some(ControlPlane {
                        identifier: concat!("lookaside lb-server ", env!("CARGO_PKG_VERSION"))
                            .to_owned(),
                    }),
                    ..DiscoveryResponse::default()
                },
                ty,
                push,
                store_version,
                oldest_event,
            });
        }
        None
    }

    /// Copies what Admin shows of a type into `status`: the reply to our last
    /// response, the version sent, and the names when they changed (copying
    /// an Envoy's thousand EDS names on every ACK would be waste).
    pub fn record(
        &self,
        ty: ResourceType,
        handled: Option<&Reply>,
        names_changed: bool,
        status: &mut XdsStatus,
    ) {
        if let Some(node) = &self.node {
            node.record(status);
        }
        record_type(
            status,
            ty,
            self.types[ty.index()].version,
            names_changed.then(|| self.subscribed(ty)),
            handled,
        );
    }
}

/// Copies what Admin shows of one type into `status` (both kinds of session).
pub(super) fn record_type(
    status: &mut XdsStatus,
    ty: ResourceType,
    version: u64,
    names: Option<Vec<String>>,
    handled: Option<&Reply>,
) {
    let entry = status.type_mut(ty.type_url());
    if let Some(names) = names {
        entry.names = names;
    }
    if version > 0 {
        entry.version_sent = version.to_string();
    }
    match handled {
        Some(Reply::Ack { version }) => entry.acked_version.clone_from(version),
        Some(Reply::Nack(nack)) => {
            entry.nacks += 1;
            entry.last_nack = Some(nack.clone());
        }
        Some(Reply::Subscribe) | None => {}
    }
}

#[cfg(test)]
mod tests;
