//! The bookkeeping of one ADS stream that state of the world
//! ([`session`](super::session)) and delta ([`delta`](super::delta)) share.
//!
//! Both kinds of session are an [`Ads`] over a [`Protocol`]: the node that
//! fixes the client's kind and zone, per type whether it was requested, its
//! wildcard and named subscriptions, the version and nonce of its last
//! response, whether a response is owed, and which types may have something
//! to send. The loop that turns a [`View`] of the store into the next
//! response is here too: per type, in [`ResourceType::SEND_ORDER`], what the
//! client should hold now ([`Protocol::content`]), what of it goes out
//! ([`Protocol::plan`]), one fresh nonce over all types and the next
//! version of the type. What a client is told and how it answers differ by
//! protocol and stay in its module: which request is stale, what an ACK
//! carries, how names are (un)subscribed, what the client is recorded to hold
//! ([`Protocol::Sent`]), and the message itself ([`Protocol::response`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    sync::Arc,
    time::{Instant, SystemTime},
};

use envoy_types::pb::{
    envoy::config::core::v3::{ControlPlane, Node},
    google::{protobuf::Any, rpc::Status},
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
    model::{ServiceKey, Snapshot},
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
/// a state-of-the-world [`DiscoveryResponse`](envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse)
/// by default, or a delta one.
#[derive(Debug)]
pub struct Outgoing<R = envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse> {
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

/// What a client should hold of one type now: name → (content, service).
pub type Desired<C> = BTreeMap<String, (C, ServiceKey)>;

/// The entries of a [`Desired`] that a response carries.
pub type Carried<'d, C> = Vec<(&'d String, &'d (C, ServiceKey))>;

/// The rules in which state of the world and delta xDS differ, for the
/// shared loop of [`Ads::next_response`]. The value is the session-wide
/// part of the protocol's state (delta: the epoch of its versions).
pub trait Protocol: Debug + Default + Send + 'static {
    /// What the stream records per type of what the client holds.
    type Sent: Debug + Default + Send;
    /// The content of one resource as sent, to tell whether it changed.
    type Content: Copy + PartialEq + Debug;
    /// What a response says beside the resources it carries.
    type Extra;
    /// The response message.
    type Response;

    /// The content the client should hold of the resource `name` (of the
    /// service `key`) now, if any.
    fn content(
        ty: ResourceType,
        state: &TypeState<Self::Sent>,
        name: &str,
        key: &ServiceKey,
        view: &View,
    ) -> Option<Self::Content>;

    /// What of `desired` a response carries now, and what it says beside;
    /// `None` when the client holds it all and nothing is owed.
    fn plan<'d>(
        ty: ResourceType,
        state: &TypeState<Self::Sent>,
        desired: &'d Desired<Self::Content>,
    ) -> Option<(Carried<'d, Self::Content>, Self::Extra)>;

    /// Records that the client now holds what the response carries.
    fn commit(
        ty: ResourceType,
        sent: &mut Self::Sent,
        desired: &Desired<Self::Content>,
        carried: &Carried<'_, Self::Content>,
        extra: &Self::Extra,
    );

    /// The message: the type's `version`, the `nonce`, the resources
    /// carried, each with its name and content, and the extra.
    fn response(
        &self,
        ty: ResourceType,
        version: u64,
        nonce: String,
        resources: Vec<(&String, Self::Content, Any)>,
        extra: Self::Extra,
    ) -> Self::Response;
}

/// The state of one type on one stream, beside what the protocol records the
/// client holds (`sent`).
#[derive(Debug, Default)]
pub struct TypeState<H> {
    /// The client asked for this type on this stream.
    pub(super) requested: bool,
    /// Subscribed to `*` explicitly (only LDS and CDS allow it).
    pub(super) star: bool,
    /// The first request named nothing; stays until the client names something.
    pub(super) legacy_wildcard: bool,
    /// Named subscriptions (without `*`), each parsed once: `None` if not a target.
    pub(super) names: SortedMap<Option<ServiceKey>>,
    /// Responses sent so far; the last one's version.
    pub(super) version: u64,
    /// Nonce of the last response, empty before the first.
    pub(super) nonce: String,
    /// A response is owed to a request even if nothing changed.
    pub(super) owed: bool,
    /// What the client holds from us.
    pub(super) sent: H,
}

impl<H> TypeState<H> {
    /// Subscribed to every resource of the type.
    pub(super) fn wildcard(&self) -> bool {
        self.star || self.legacy_wildcard
    }

    /// What a request carrying the latest nonce says: a NACK when it has an
    /// `error`, else an ACK of `acked`.
    pub(super) fn answer(&self, nonce: &str, error: Option<&Status>, acked: &str) -> Reply {
        match error {
            Some(error) => Reply::Nack(XdsNack {
                version: self.version.to_string(),
                nonce: nonce.to_owned(),
                code: error.code,
                message: kept(&error.message),
                at: SystemTime::now(),
            }),
            None => Reply::Ack {
                version: acked.to_owned(),
            },
        }
    }

    /// The subscribed names as Admin shows them (`*` for a wildcard).
    fn subscribed(&self) -> Vec<String> {
        let star = self.wildcard().then(|| "*".to_owned());
        star.into_iter().chain(self.names.keys().cloned()).collect()
    }
}

/// The state of one ADS stream, of protocol `P`.
#[derive(Debug, Default)]
pub struct Ads<P: Protocol> {
    pub(super) types: [TypeState<P::Sent>; 4],
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
    /// The protocol's session-wide state.
    pub(super) protocol: P,
}

impl<P: Protocol> Ads<P> {
    /// A stream of protocol `protocol` that has received nothing yet.
    pub(super) fn with_protocol(protocol: P) -> Self {
        Self {
            types: Default::default(),
            nonces: 0,
            node: None,
            kind: ClientKind::default(),
            dirty: [false; 4],
            protocol,
        }
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
    /// exist. The next call to [`Ads::next_response`] looks at the types
    /// that depend on it.
    pub fn view_changed(&mut self, existence: bool) {
        for ty in ResourceType::SEND_ORDER {
            if existence || ty == ResourceType::Endpoint {
                self.dirty[ty.index()] = true;
            }
        }
    }

    /// The first step of every request: keeps the first node seen, and
    /// finds the request's type (`None`: one we do not serve).
    pub(super) fn begin(&mut self, node: Option<&Node>, type_url: &str) -> Option<ResourceType> {
        if self.node.is_none()
            && let Some(node) = node
        {
            let (kind, info) = NodeInfo::of(node);
            self.kind = kind;
            self.node = Some(Box::new(info));
        }
        ResourceType::from_type_url(type_url)
    }

    /// Marks `ty` as possibly having something to send.
    pub(super) fn touch(&mut self, ty: ResourceType) {
        self.dirty[ty.index()] = true;
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
        self.types.iter().any(TypeState::wildcard)
    }

    /// The subscribed names of a type as Admin shows them (`*` for a wildcard).
    pub fn subscribed(&self, ty: ResourceType) -> Vec<String> {
        self.types[ty.index()].subscribed()
    }

    /// What the client should hold of a type now.
    fn desired(&self, ty: ResourceType, view: &View) -> Desired<P::Content> {
        let state = &self.types[ty.index()];
        let mut desired = BTreeMap::new();
        if state.wildcard() && ty.allows_wildcard() {
            for key in &view.existing {
                let name = key.to_string();
                if let Some(content) = P::content(ty, state, &name, key, view) {
                    desired.insert(name, (content, key.clone()));
                }
            }
        }
        for (name, key) in &state.names {
            if let Some(key) = key
                && let Some(content) = P::content(ty, state, name, key, view)
            {
                desired.insert(name.clone(), (content, key.clone()));
            }
        }
        desired
    }

    /// The next response owed or caused by a change, if any, in the order
    /// CDS, EDS, LDS, RDS. Call until it returns `None`.
    pub fn next_response(
        &mut self,
        view: &View,
        resources: &Resources,
    ) -> Option<Outgoing<P::Response>> {
        for ty in ResourceType::SEND_ORDER {
            if !self.dirty[ty.index()] || !self.types[ty.index()].requested {
                self.dirty[ty.index()] = false;
                continue;
            }
            let desired = self.desired(ty, view);
            let Some((carried, extra)) = P::plan(ty, &self.types[ty.index()], &desired) else {
                self.dirty[ty.index()] = false;
                continue;
            };

            let zone = self.node.as_ref().map_or("", |node| node.zone.as_str());
            let mut store_version = 0;
            let mut oldest_event: Option<Instant> = None;
            let mut built = Vec::with_capacity(carried.len());
            for (name, (content, key)) in &carried {
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
                let any = resources.build(ty, name, key, snapshot, self.kind, zone);
                built.push((*name, *content, any));
            }

            self.nonces += 1;
            let nonce = self.nonces.to_string();
            let state = &mut self.types[ty.index()];
            let push = !state.owed;
            P::commit(ty, &mut state.sent, &desired, &carried, &extra);
            state.owed = false;
            state.version += 1;
            state.nonce.clone_from(&nonce);
            let version = state.version;
            return Some(Outgoing {
                response: self.protocol.response(ty, version, nonce, built, extra),
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
        let entry = status.type_mut(ty.type_url());
        if names_changed {
            entry.names = self.subscribed(ty);
        }
        let version = self.types[ty.index()].version;
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
}

/// Who lb-server says it is in every response (`control_plane`).
pub(super) fn control_plane() -> Option<ControlPlane> {
    Some(ControlPlane {
        identifier: concat!("lookaside lb-server ", env!("CARGO_PKG_VERSION")).to_owned(),
    })
}
