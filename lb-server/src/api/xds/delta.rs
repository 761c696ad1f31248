//! The protocol state of one delta (incremental) ADS stream:
//! `DeltaAggregatedResources`.
//!
//! Beside [`Session`](super::session::Session) (state of the world), with the
//! same shape: it does no I/O, the stream feeds it requests and a [`View`] of
//! the store and asks it for the next response, so every rule below is
//! unit-tested here. The resources are the same ones, from
//! [`Resources`](super::resources::Resources): zones, `--xds-lb-policy` and
//! `--xds-upstream-tls` apply alike.
//!
//! Rules:
//! - Per type the session keeps what the client holds: name → the version of
//!   its content. A response carries the resources whose content the client
//!   does not hold, each with its own version, and the names it holds that
//!   are gone (`removed_resources`). A resource whose content is unchanged is
//!   never re-sent.
//! - A resource's version is a stamp of its content, prefixed by an epoch
//!   drawn at random once per process: `"{epoch}:p"` for a Listener,
//!   RouteConfiguration or Cluster (they depend only on the service existing
//!   and on the process's flags), `"{epoch}:{snapshot version}"` for an
//!   assignment (a stream's zone and client kind are fixed). A version from
//!   before an lb-server restart never matches, so the client is re-sent
//!   everything it holds.
//! - `system_version_info` counts the responses of a type on this stream;
//!   every response has a fresh nonce (one counter over all types).
//! - `resource_names_subscribe` and `resource_names_unsubscribe` apply
//!   whatever the nonce, as the delta protocol asks. A request carrying the
//!   latest nonce of its type is an ACK, or a NACK when `error_detail` is set;
//!   with an older nonce its ACK or NACK is ignored (and a request with
//!   nothing else is [`Handled::Stale`]). A NACK is recorded and nothing is
//!   re-sent: the next change of the store produces the next version.
//! - LDS and CDS accept wildcard subscriptions: `*`, kept until `*` is
//!   unsubscribed, or an empty subscribe list on the first request of a type
//!   (legacy wildcard), kept until the client subscribes to a name. RDS and
//!   EDS are always named (`*` is ignored for them). A name unsubscribed is
//!   dropped by the client itself, so it is not sent as removed, unless a
//!   wildcard still covers it; resources only a wildcard covered are sent as
//!   removed when the wildcard goes.
//! - A newly subscribed name that does not exist (or is not a valid target)
//!   is answered in `removed_resources`, which is how the delta protocol says
//!   "does not exist"; every request that subscribes something is owed a
//!   response, even an empty one, so a client's initial fetch ends at once.
//! - `initial_resource_versions` on the first request of a type (a client
//!   that reconnects) says what the client holds: those of its subscribed
//!   names whose version matches are not re-sent, those that are gone are
//!   removed.
//! - The node of the first request that has one fixes the client's kind and
//!   zone for the stream, as in state of the world.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::BuildHasher,
    sync::{Arc, LazyLock},
    time::{Instant, SystemTime},
};

use envoy_types::pb::envoy::{
    config::core::v3::ControlPlane,
    service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
};

use super::{
    resources::{ClientKind, ResourceType, Resources},
    session::{Handled, NodeInfo, Outgoing, Reply, View, record_type},
    sorted_map::SortedMap,
};
use crate::{
    api::{
        client_text::kept,
        subscribers::{XdsNack, XdsStatus},
    },
    model::{ServiceKey, parse_target},
};

/// This process's epoch: random, so that versions never match across a restart.
static EPOCH: LazyLock<u64> = LazyLock::new(|| {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // std's hasher keys are drawn from the OS's randomness.
    std::collections::hash_map::RandomState::new().hash_one(nanos)
});

/// Subscribing more names than this at once rebuilds the sorted name list
/// instead of inserting one by one, so a request costs O(n log n) at most.
const INSERT_ONE_BY_ONE: usize = 16;

/// The content a client holds of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Listener, route or cluster of an existing service.
    Present,
    /// An assignment of this snapshot version.
    Version(u64),
    /// A version that is not one of this process's: re-sent if still wanted.
    Foreign,
}

#[derive(Debug, Default)]
struct TypeState {
    /// The client asked for this type on this stream.
    requested: bool,
    /// Subscribed to `*` explicitly.
    star: bool,
    /// The first request named nothing; stays until the client names something.
    legacy_wildcard: bool,
    /// Named subscriptions (without `*`), each parsed once: `None` if not a target.
    names: SortedMap<Option<ServiceKey>>,
    /// Names subscribed since the last response: told if they do not exist.
    fresh: BTreeSet<String>,
    /// What the client holds from us, by name.
    held: HashMap<String, Held>,
    /// Responses sent so far; the last one's `system_version_info`.
    version: u64,
    /// Nonce of the last response, empty before the first.
    nonce: String,
    /// A response is owed to a request even if nothing changed.
    owed: bool,
}

impl TypeState {
    fn wildcard(&self) -> bool {
        self.star || self.legacy_wildcard
    }

    fn subscribe(&mut self, ty: ResourceType, names: &[String]) -> bool {
        let mut changed = false;
        let mut new = Vec::new();
        for name in names {
            if name == "*" {
                if ty.allows_wildcard() && !self.star {
                    self.star = true;
                    changed = true;
                }
            } else if !self.names.contains_key(name) {
                new.push(name.as_str());
            }
        }
        if !new.is_empty() {
            // Naming a resource ends a legacy wildcard (an explicit `*` stays).
            self.legacy_wildcard = false;
            changed = true;
            self.fresh.extend(new.iter().map(|name| (*name).to_owned()));
            let parsed = new
                .into_iter()
                .map(|name| (name.to_owned(), parse_target(name).ok()));
            if parsed.len() <= INSERT_ONE_BY_ONE {
                for (name, key) in parsed {
                    self.names.insert(name, key);
                }
            } else {
                let names = std::mem::take(&mut self.names);
                self.names = names
                    .into_iter()
                    .map(|(name, key)| (name.clone(), key.clone()))
                    .chain(parsed)
                    .collect();
            }
        }
        changed
    }

    fn unsubscribe(&mut self, names: &[String]) -> bool {
        let mut gone = HashSet::new();
        let mut changed = false;
        for name in names {
            if name == "*" {
                changed |= self.star || self.legacy_wildcard;
                self.star = false;
                self.legacy_wildcard = false;
            } else if self.names.contains_key(name) {
                gone.insert(name.as_str());
            }
        }
        if !gone.is_empty() {
            changed = true;
            self.names.retain(|name| !gone.contains(name));
            self.fresh.retain(|name| !gone.contains(name.as_str()));
            // The client drops what it unsubscribed; a wildcard keeps it sent.
            if !self.wildcard() {
                self.held.retain(|name, _| !gone.contains(name.as_str()));
            }
        }
        changed
    }
}

/// The state of one delta ADS stream.
#[derive(Debug)]
pub struct DeltaSession {
    types: [TypeState; 4],
    nonces: u64,
    /// Boxed: most streams never look at it after the first request.
    node: Option<Box<NodeInfo>>,
    kind: ClientKind,
    /// Per type, something may need sending (as in state of the world).
    dirty: [bool; 4],
    /// Prefix of every version: this process's, unless a test sets it.
    epoch: u64,
}

impl Default for DeltaSession {
    fn default() -> Self {
        Self::new()
    }
}

impl DeltaSession {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::with_epoch(*EPOCH)
    }

    /// A stream whose versions carry `epoch` instead of the process's: a
    /// test's way to stand for another lb-server process.
    pub fn with_epoch(epoch: u64) -> Self {
        Self {
            types: Default::default(),
            nonces: 0,
            node: None,
            kind: ClientKind::default(),
            dirty: [false; 4],
            epoch,
        }
    }

    /// The node the client described in its first request, if any.
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_deref()
    }

    /// The kind of client, from the node of its first request that had one.
    pub fn client_kind(&self) -> ClientKind {
        self.kind
    }

    /// Notes that the view changed: endpoints only, or also which services exist.
    pub fn view_changed(&mut self, existence: bool) {
        for ty in ResourceType::SEND_ORDER {
            if existence || ty == ResourceType::Endpoint {
                self.dirty[ty.index()] = true;
            }
        }
    }

    /// How many resource names a request carries, against the per-request limit.
    pub fn names_in(request: &DeltaDiscoveryRequest) -> usize {
        request.resource_names_subscribe.len()
            + request.resource_names_unsubscribe.len()
            + request.initial_resource_versions.len()
    }

    /// Applies one request.
    pub fn handle(&mut self, request: &DeltaDiscoveryRequest) -> Handled {
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
        let epoch = self.epoch;
        let state = &mut self.types[ty.index()];
        let first = !state.requested;
        state.requested = true;

        let nonce = &request.response_nonce;
        let latest = !nonce.is_empty() && *nonce == state.nonce;
        let reply = if !latest {
            Reply::Subscribe
        } else if let Some(error) = &request.error_detail {
            Reply::Nack(XdsNack {
                version: state.version.to_string(),
                nonce: nonce.clone(),
                code: error.code,
                message: kept(&error.message),
                at: SystemTime::now(),
            })
        } else {
            Reply::Ack {
                version: state.version.to_string(),
            }
        };

        if first && ty.allows_wildcard() {
            state.legacy_wildcard = request.resource_names_subscribe.is_empty();
        }
        let wildcard_before = state.wildcard();
        let subscribed = state.subscribe(ty, &request.resource_names_subscribe);
        let unsubscribed = state.unsubscribe(&request.resource_names_unsubscribe);
        if first {
            for (name, version) in &request.initial_resource_versions {
                if state.wildcard() || state.names.contains_key(name) {
                    state
                        .held
                        .insert(name.clone(), parse_version(epoch, version));
                }
            }
        }
        let names_changed = first || subscribed || unsubscribed;
        if first || subscribed || (state.wildcard() && !wildcard_before) {
            state.owed = true;
        }
        if names_changed || state.owed {
            self.dirty[ty.index()] = true;
        }
        if !first && !latest && !names_changed && !nonce.is_empty() {
            return Handled::Stale { ty };
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
        self.types.iter().any(TypeState::wildcard)
    }

    /// The subscribed names of a type as Admin shows them (`*` for a wildcard).
    pub fn subscribed(&self, ty: ResourceType) -> Vec<String> {
        let state = &self.types[ty.index()];
        let star = state.wildcard().then(|| "*".to_owned());
        star.into_iter()
            .chain(state.names.keys().cloned())
            .collect()
    }

    /// The version string of a content.
    fn version(&self, held: Held) -> String {
        match held {
            Held::Present => format!("{:x}:p", self.epoch),
            Held::Version(version) => format!("{:x}:{version}", self.epoch),
            Held::Foreign => String::new(),
        }
    }

    /// What the client should hold of a type now: name → (content, service).
    fn desired(&self, ty: ResourceType, view: &View) -> BTreeMap<String, (Held, ServiceKey)> {
        let state = &self.types[ty.index()];
        let mut desired = BTreeMap::new();
        let held = |key: &ServiceKey| match ty {
            ResourceType::Endpoint => view
                .snapshots
                .get(key)
                .filter(|snapshot| snapshot.exists)
                .map(|snapshot| Held::Version(snapshot.version)),
            _ => view.exists(key).then_some(Held::Present),
        };
        if state.wildcard() && ty.allows_wildcard() {
            for key in &view.existing {
                if let Some(held) = held(key) {
                    desired.insert(key.to_string(), (held, key.clone()));
                }
            }
        }
        for (name, key) in &state.names {
            if let Some(key) = key
                && let Some(held) = held(key)
            {
                desired.insert(name.clone(), (held, key.clone()));
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
    ) -> Option<Outgoing<DeltaDiscoveryResponse>> {
        for ty in ResourceType::SEND_ORDER {
            if !self.dirty[ty.index()] || !self.types[ty.index()].requested {
                self.dirty[ty.index()] = false;
                continue;
            }
            let desired = self.desired(ty, view);
            let state = &self.types[ty.index()];
            let changed: Vec<(&String, &(Held, ServiceKey))> = desired
                .iter()
                .filter(|(name, (held, _))| state.held.get(*name) != Some(held))
                .collect();
            let mut removed: Vec<String> = state
                .held
                .keys()
                .filter(|name| !desired.contains_key(*name))
                .cloned()
                .collect();
            removed.extend(
                state
                    .fresh
                    .iter()
                    .filter(|name| !desired.contains_key(*name) && !state.held.contains_key(*name))
                    .cloned(),
            );
            removed.sort_unstable();
            if changed.is_empty() && removed.is_empty() && !state.owed {
                self.dirty[ty.index()] = false;
                continue;
            }

            let zone = self.node.as_ref().map_or("", |node| node.zone.as_str());
            let mut store_version = 0;
            let mut oldest_event: Option<Instant> = None;
            let mut resources_out = Vec::with_capacity(changed.len());
            for (name, (held, key)) in &changed {
                let snapshot = view.snapshots.get(key).map(Arc::as_ref);
                if ty == ResourceType::Endpoint
                    && let Some(snapshot) = snapshot
                {
                    store_version = store_version.max(snapshot.version);
                    oldest_event = Some(match oldest_event {
                        Some(at) => at.min(snapshot.event_at),
                        None => snapshot.event_at,
                    });
                }
                resources_out.push(Resource {
                    name: (*name).clone(),
                    version: self.version(*held),
                    resource: Some(resources.build(ty, name, key, snapshot, self.kind, zone)),
                    ..Resource::default()
                });
            }

            self.nonces += 1;
            let nonce = self.nonces.to_string();
            let state = &mut self.types[ty.index()];
            let push = !state.owed;
            for name in &removed {
                state.held.remove(name);
            }
            for (name, (held, _)) in &changed {
                state.held.insert((*name).clone(), *held);
            }
            state.fresh.clear();
            state.owed = false;
            state.version += 1;
            state.nonce.clone_from(&nonce);
            return Some(Outgoing {
                response: DeltaDiscoveryResponse {
                    system_version_info: state.version.to_string(),
                    resources: resources_out,
                    type_url: ty.type_url().to_owned(),
                    removed_resources: removed,
                    nonce,
                    control_plane: Some(ControlPlane {
                        identifier: concat!("lookaside lb-server ", env!("CARGO_PKG_VERSION"))
                            .to_owned(),
                    }),
                    ..DeltaDiscoveryResponse::default()
                },
                ty,
                push,
                store_version,
                oldest_event,
            });
        }
        None
    }

    /// Copies what Admin shows of a type into `status`, as
    /// [`Session::record`](super::session::Session::record) does.
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

/// What a version the client states means: one of ours, or foreign.
fn parse_version(epoch: u64, version: &str) -> Held {
    let Some((prefix, stamp)) = version.split_once(':') else {
        return Held::Foreign;
    };
    // Exactly as written: a forged spelling of the epoch is not ours.
    if prefix != format!("{epoch:x}") {
        return Held::Foreign;
    }
    match stamp {
        "p" => Held::Present,
        _ => stamp.parse().map_or(Held::Foreign, Held::Version),
    }
}

#[cfg(test)]
mod tests;
