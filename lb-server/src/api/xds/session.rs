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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Instant, SystemTime},
};

use envoy_types::pb::envoy::{
    config::core::v3::ControlPlane,
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
    fn exists(&self, key: &ServiceKey) -> bool {
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

/// A response ready to send, with what the stream needs for metrics and Admin.
#[derive(Debug)]
pub struct Outgoing {
    /// The message.
    pub response: DiscoveryResponse,
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
/// fields Admin and the logs show, each cut to
/// [`MAX_KEPT_BYTES`](crate::api::client_text::MAX_KEPT_BYTES). The rest (metadata,
/// extensions, locality) is never read, so it is not kept for the stream's life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.user_agent_name`.
    pub user_agent: String,
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
            // The whole user agent, not the kept one, decides the kind.
            self.kind = ClientKind::of(&node.user_agent_name);
            self.node = Some(Box::new(NodeInfo {
                id: kept(&node.id),
                cluster: kept(&node.cluster),
                user_agent: kept(&node.user_agent_name),
            }));
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
                resources_out.push(resources.build(ty, name, key, snapshot, self.kind));
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
        if let Some(node) = &self.node
            && status.node_id.is_empty()
        {
            status.node_id.clone_from(&node.id);
            status.node_cluster.clone_from(&node.cluster);
            status.user_agent.clone_from(&node.user_agent);
        }
        let state = &self.types[ty.index()];
        let entry = status.type_mut(ty.type_url());
        if names_changed {
            entry.names = self.subscribed(ty);
        }
        if state.version > 0 {
            entry.version_sent = state.version.to_string();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::xds::resources::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE},
        config::XdsLbPolicy,
        model::Endpoint,
    };
    use envoy_types::pb::{
        envoy::config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener,
        },
        google::rpc::Status,
    };
    use prost::Message;

    const GREETER: &str = "greeter.default:grpc";

    fn resources() -> Resources {
        Resources::new(XdsLbPolicy::RoundRobin)
    }

    fn key(target: &str) -> ServiceKey {
        parse_target(target).unwrap()
    }

    fn request(type_url: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            response_nonce: nonce.into(),
            ..DiscoveryRequest::default()
        }
    }

    fn ack(response: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: response.version_info.clone(),
            ..request(&response.type_url, names, &response.nonce)
        }
    }

    fn nack(response: &DiscoveryResponse, names: &[&str], message: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: message.into(),
                details: vec![],
            }),
            ..request(&response.type_url, names, &response.nonce)
        }
    }

    /// A view with each service at `version`, existing with one endpoint per
    /// listed address suffix, or gone.
    struct World {
        view: View,
        /// Set by every edit, taken by the next look: what the stream's
        /// store watches do with `view_changed` (`Some(existence changed)`).
        changed: std::cell::Cell<Option<bool>>,
    }

    impl World {
        fn new() -> Self {
            Self {
                view: View::default(),
                changed: std::cell::Cell::new(None),
            }
        }

        fn set(&mut self, target: &str, version: u64, endpoints: &[u8]) -> &mut Self {
            let key = key(target);
            let snapshot = Snapshot {
                version,
                exists: true,
                endpoints: endpoints
                    .iter()
                    .map(|i| Endpoint::new(format!("10.0.0.{i}").parse().unwrap(), 80))
                    .collect(),
                ..Snapshot::unknown()
            };
            let existed = self.view.existing.contains(&key);
            self.view.snapshots.insert(key.clone(), Arc::new(snapshot));
            self.view.existing.insert(key);
            self.note(!existed);
            self
        }

        fn remove(&mut self, target: &str, version: u64) -> &mut Self {
            let key = key(target);
            let snapshot = Snapshot {
                version,
                ..Snapshot::unknown()
            };
            self.view.snapshots.insert(key.clone(), Arc::new(snapshot));
            let existed = self.view.existing.remove(&key);
            self.note(existed);
            self
        }

        fn note(&self, existence: bool) {
            let before = self.changed.get().unwrap_or(false);
            self.changed.set(Some(before || existence));
        }
    }

    fn names<M: Message + Default>(
        response: &DiscoveryResponse,
        name: impl Fn(&M) -> &str,
    ) -> Vec<String> {
        response
            .resources
            .iter()
            .map(|any| name(&M::decode(any.value.as_slice()).unwrap()).to_owned())
            .collect()
    }

    fn listeners(response: &DiscoveryResponse) -> Vec<String> {
        names::<Listener>(response, |l| &l.name)
    }

    fn clusters(response: &DiscoveryResponse) -> Vec<String> {
        names::<Cluster>(response, |c| &c.name)
    }

    fn assignments(response: &DiscoveryResponse) -> Vec<(String, usize)> {
        response
            .resources
            .iter()
            .map(|any| {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                let count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                (cla.cluster_name, count)
            })
            .collect()
    }

    fn look(session: &mut Session, world: &World) -> Option<Outgoing> {
        if let Some(existence) = world.changed.take() {
            session.view_changed(existence);
        }
        session.next_response(&world.view, &resources())
    }

    fn next(session: &mut Session, world: &World) -> Outgoing {
        look(session, world).expect("a response")
    }

    fn quiet(session: &mut Session, world: &World) {
        if let Some(out) = look(session, world) {
            panic!("unexpected response: {:?}", out.response);
        }
        // Whatever the dirty flags say, a full look finds nothing either.
        session.view_changed(true);
        if let Some(out) = session.next_response(&world.view, &resources()) {
            panic!("unexpected response after a full look: {:?}", out.response);
        }
    }

    #[test]
    fn unknown_listener_gets_an_empty_answer_then_the_listener_when_it_appears() {
        let mut session = Session::new();
        let mut world = World::new();
        let handled = session.handle(&request(LISTENER_TYPE, &[GREETER], ""));
        assert!(matches!(
            handled,
            Handled::Request {
                reply: Reply::Subscribe,
                names_changed: true,
                ..
            }
        ));
        assert_eq!(session.named_services(), BTreeSet::from([key(GREETER)]));
        let first = next(&mut session, &world);
        assert!(
            first.response.resources.is_empty(),
            "does-not-exist, at once"
        );
        assert_eq!(first.response.version_info, "1");
        assert!(!first.push);
        quiet(&mut session, &world);

        session.handle(&ack(&first.response, &[GREETER]));
        world.set(GREETER, 5, &[1]);
        let second = next(&mut session, &world);
        assert_eq!(listeners(&second.response), [GREETER]);
        assert_eq!(second.response.version_info, "2");
        assert_ne!(second.response.nonce, first.response.nonce);
        assert!(second.push);
        quiet(&mut session, &world);

        world.set(GREETER, 6, &[1, 2]);
        quiet(&mut session, &world);
    }

    #[test]
    fn ack_nack_and_stale_nonces() {
        let mut session = Session::new();
        let mut world = World::new();
        world.set(GREETER, 1, &[1]);
        session.handle(&request(CLUSTER_TYPE, &[GREETER], ""));
        let v1 = next(&mut session, &world).response;
        let handled = session.handle(&ack(&v1, &[GREETER]));
        assert_eq!(
            handled,
            Handled::Request {
                ty: ResourceType::Cluster,
                reply: Reply::Ack {
                    version: "1".into()
                },
                names_changed: false
            }
        );

        world.set("other.default:80", 2, &[3]);
        session.handle(&request(
            CLUSTER_TYPE,
            &[GREETER, "other.default:80"],
            &v1.nonce,
        ));
        let v2 = next(&mut session, &world).response;
        assert_eq!(clusters(&v2), [GREETER, "other.default:80"]);

        // A NACK of v2 is recorded with v2's version and nonce; nothing is re-sent.
        let handled = session.handle(&nack(&v2, &[GREETER, "other.default:80"], "bad cluster"));
        let Handled::Request {
            reply: Reply::Nack(rejected),
            ..
        } = handled
        else {
            panic!("NACK expected, got {handled:?}");
        };
        assert_eq!(
            (rejected.version.as_str(), rejected.nonce.as_str()),
            ("2", v2.nonce.as_str())
        );
        assert_eq!(rejected.message, "bad cluster");
        quiet(&mut session, &world);
        let mut status = XdsStatus::default();
        session.record(
            ResourceType::Cluster,
            Some(&Reply::Nack(rejected)),
            false,
            &mut status,
        );
        assert_eq!(status.types[0].nacks, 1);
        assert_eq!(status.types[0].version_sent, "2");

        // Stale nonces (old, unknown, or from another type) change nothing,
        // not even the names they carry.
        for stale in [&v1.nonce, "no-such-nonce"] {
            assert_eq!(
                session.handle(&request(CLUSTER_TYPE, &[], stale)),
                Handled::Stale {
                    ty: ResourceType::Cluster
                }
            );
        }
        quiet(&mut session, &world);
        assert_eq!(
            session.subscribed(ResourceType::Cluster),
            [GREETER, "other.default:80"]
        );

        // The next change still goes out, as version 3.
        world.remove("other.default:80", 3);
        let v3 = next(&mut session, &world).response;
        assert_eq!(v3.version_info, "3");
        assert_eq!(clusters(&v3), [GREETER], "a removed cluster is left out");
    }

    #[test]
    fn legacy_and_explicit_wildcards() {
        let mut world = World::new();
        world.set(GREETER, 1, &[1]).set("b.ns:80", 2, &[2]);

        let mut envoy = Session::new();
        envoy.handle(&request(CLUSTER_TYPE, &[], ""));
        assert!(envoy.has_wildcard());
        assert!(envoy.named_services().is_empty());
        let v1 = next(&mut envoy, &world).response;
        assert_eq!(clusters(&v1), ["b.ns:80", GREETER]);
        envoy.handle(&ack(&v1, &[]));
        assert!(
            envoy.has_wildcard(),
            "an empty ACK keeps the legacy wildcard"
        );
        assert_eq!(envoy.subscribed(ResourceType::Cluster), ["*"]);

        world.set("c.ns:80", 3, &[3]);
        let v2 = next(&mut envoy, &world).response;
        assert_eq!(clusters(&v2), ["b.ns:80", "c.ns:80", GREETER]);
        world.remove("b.ns:80", 4);
        let v3 = next(&mut envoy, &world).response;
        assert_eq!(clusters(&v3), ["c.ns:80", GREETER]);
        world.set(GREETER, 5, &[1, 2]);
        quiet(&mut envoy, &world);

        // Naming something ends a legacy wildcard; an empty list then means nothing.
        envoy.handle(&ack(&v3, &["c.ns:80"]));
        assert!(!envoy.has_wildcard());
        assert_eq!(clusters(&next(&mut envoy, &world).response), ["c.ns:80"]);
        let mut explicit = Session::new();
        explicit.handle(&request(LISTENER_TYPE, &["*", "late.ns:80"], ""));
        assert_eq!(
            explicit.subscribed(ResourceType::Listener),
            ["*", "late.ns:80"]
        );
        assert_eq!(
            listeners(&next(&mut explicit, &world).response),
            ["c.ns:80", GREETER]
        );

        // RDS and EDS never wildcard.
        let mut named_only = Session::new();
        named_only.handle(&request(ENDPOINT_TYPE, &[], ""));
        assert!(!named_only.has_wildcard());
        assert!(next(&mut named_only, &world).response.resources.is_empty());
    }

    #[test]
    fn eds_sends_what_changed_and_an_empty_assignment_on_removal() {
        let mut session = Session::new();
        let mut world = World::new();
        world.set(GREETER, 1, &[1, 2]).set("b.ns:80", 2, &[3]);
        session.handle(&request(
            ENDPOINT_TYPE,
            &[GREETER, "b.ns:80", "never.ns:80"],
            "",
        ));
        let first = next(&mut session, &world);
        assert_eq!(
            assignments(&first.response),
            [("b.ns:80".into(), 1), (GREETER.into(), 2)],
            "an unknown service is left out"
        );
        assert_eq!(first.store_version, 2);

        world.set(GREETER, 3, &[1, 2, 4]);
        let update = next(&mut session, &world);
        assert_eq!(
            assignments(&update.response),
            [(GREETER.into(), 3)],
            "only what changed"
        );
        assert!(update.push);
        assert_eq!(update.store_version, 3);
        assert!(update.oldest_event.is_some());

        world.remove("b.ns:80", 4);
        let removed = next(&mut session, &world);
        assert_eq!(assignments(&removed.response), [("b.ns:80".into(), 0)]);
        quiet(&mut session, &world);

        world.set("b.ns:80", 5, &[5]).set("never.ns:80", 6, &[6]);
        let back = next(&mut session, &world);
        assert_eq!(
            assignments(&back.response),
            [("b.ns:80".into(), 1), ("never.ns:80".into(), 1)]
        );

        // Unsubscribing forgets; subscribing again sends the current state.
        session.handle(&ack(&back.response, &[GREETER]));
        assert!(next(&mut session, &world).response.resources.is_empty());
        let latest = session.types[ResourceType::Endpoint.index()].nonce.clone();
        session.handle(&DiscoveryRequest {
            ..request(ENDPOINT_TYPE, &[GREETER, "b.ns:80"], &latest)
        });
        assert_eq!(
            assignments(&next(&mut session, &world).response),
            [("b.ns:80".into(), 1)]
        );
    }

    #[test]
    fn types_are_independent_and_sent_clusters_first() {
        let mut session = Session::new();
        let mut world = World::new();
        world.set(GREETER, 1, &[1]);
        session.handle(&request(LISTENER_TYPE, &[GREETER], ""));
        session.handle(&request(ROUTE_TYPE, &[GREETER], ""));
        session.handle(&request(ENDPOINT_TYPE, &[GREETER], ""));
        session.handle(&request(CLUSTER_TYPE, &[GREETER], ""));
        let order: Vec<&str> =
            std::iter::from_fn(|| session.next_response(&world.view, &resources()))
                .map(|out| out.ty.short())
                .collect();
        assert_eq!(order, ["cds", "eds", "lds", "rds"]);
        let versions: BTreeSet<String> = ResourceType::SEND_ORDER
            .iter()
            .map(|ty| session.types[ty.index()].version.to_string())
            .collect();
        assert_eq!(
            versions,
            BTreeSet::from(["1".to_owned()]),
            "versions count per type"
        );

        // A NACK of EDS leaves the others alone.
        let eds_nonce = session.types[ResourceType::Endpoint.index()].nonce.clone();
        let mut bad = request(ENDPOINT_TYPE, &[GREETER], &eds_nonce);
        bad.error_detail = Some(Status {
            code: 3,
            message: "no".into(),
            details: vec![],
        });
        session.handle(&bad);
        world.set(GREETER, 2, &[1, 2]);
        let out = next(&mut session, &world);
        assert_eq!(out.ty, ResourceType::Endpoint);
        assert_eq!(out.response.version_info, "2");
        quiet(&mut session, &world);
    }

    #[test]
    fn bad_input_is_ignored_without_harm() {
        let mut session = Session::new();
        let world = World::new();
        assert_eq!(
            session.handle(&request(
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                &["x"],
                ""
            )),
            Handled::UnknownType
        );
        assert_eq!(session.handle(&request("", &[], "7")), Handled::UnknownType);
        // Invalid targets are accepted as names but never resolve.
        session.handle(&request(
            LISTENER_TYPE,
            &["not a target", "UPPER.case:1"],
            "99",
        ));
        assert!(session.named_services().is_empty());
        assert!(next(&mut session, &world).response.resources.is_empty());
        quiet(&mut session, &world);
    }

    #[test]
    fn record_fills_node_and_names() {
        let mut session = Session::new();
        let mut first = request(LISTENER_TYPE, &[GREETER], "");
        first.node = Some(Node {
            id: "node-1".into(),
            cluster: "c".into(),
            user_agent_name: "gRPC Python".into(),
            ..Node::default()
        });
        session.handle(&first);
        let mut status = XdsStatus::default();
        session.record(
            ResourceType::Listener,
            Some(&Reply::Subscribe),
            true,
            &mut status,
        );
        assert_eq!(status.node_id, "node-1");
        assert_eq!(status.user_agent, "gRPC Python");
        assert_eq!(status.types[0].names, [GREETER]);
        assert_eq!(status.types[0].type_url, LISTENER_TYPE);
        assert_eq!(status.types[0].version_sent, "");
    }

    #[test]
    fn the_first_node_decides_the_cluster_shape() {
        let tls = Resources::new(XdsLbPolicy::RoundRobin).with_upstream_tls(Some(
            crate::api::xds::resources::UpstreamTls {
                sds_dir: "/sds".into(),
            },
        ));
        let mut world = World::new();
        world.set(GREETER, 1, &[1]);
        let cluster_for = |user_agent: Option<&str>| {
            let mut session = Session::new();
            let mut first = request(CLUSTER_TYPE, &[GREETER], "");
            first.node = user_agent.map(|agent| Node {
                id: "n".into(),
                user_agent_name: agent.into(),
                ..Node::default()
            });
            session.handle(&first);
            // A later node does not change what the stream is.
            let mut later = request(LISTENER_TYPE, &[GREETER], "");
            later.node = Some(Node {
                user_agent_name: "envoy".into(),
                ..Node::default()
            });
            session.handle(&later);
            let kind = session.client_kind();
            let out = session.next_response(&world.view, &tls).unwrap();
            let cluster = Cluster::decode(out.response.resources[0].value.as_slice()).unwrap();
            (kind, cluster.transport_socket.unwrap())
        };
        let (envoy, envoy_socket) = cluster_for(Some("envoy"));
        let (grpc, grpc_socket) = cluster_for(Some("gRPC Python"));
        assert_eq!((envoy, grpc), (ClientKind::Envoy, ClientKind::Grpc));
        assert_ne!(envoy_socket, grpc_socket);
        assert_eq!(
            cluster_for(None).0,
            ClientKind::Envoy,
            "the later node counts when the first had none"
        );
    }

    #[test]
    fn huge_node_fields_and_nack_messages_are_kept_cut() {
        use crate::api::client_text::MAX_KEPT_BYTES;
        let mut session = Session::new();
        let world = World::new();
        let mut first = request(LISTENER_TYPE, &[GREETER], "");
        first.node = Some(Node {
            id: "n".repeat(500_000),
            user_agent_name: "u".repeat(500_000),
            ..Node::default()
        });
        session.handle(&first);
        let node = session.node().unwrap();
        assert!(node.id.len() <= MAX_KEPT_BYTES && node.id.starts_with("nnnn"));
        assert!(node.user_agent.len() <= MAX_KEPT_BYTES);
        let sent = next(&mut session, &world);
        let Handled::Request {
            reply: Reply::Nack(nack),
            ..
        } = session.handle(&nack(&sent.response, &[GREETER], &"x".repeat(1 << 20)))
        else {
            panic!("a NACK");
        };
        assert!(
            nack.message.len() <= MAX_KEPT_BYTES,
            "{}",
            nack.message.len()
        );
        assert!(nack.message.ends_with('…'));
    }
}
