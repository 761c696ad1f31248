//! The protocol state of one delta (incremental) ADS stream:
//! `DeltaAggregatedResources`.
//!
//! A [`DeltaSession`] is an [`Ads`] of the [`Delta`] rules, as
//! [`Session`](super::session::Session) is of state of the world's: the
//! bookkeeping both share (subscriptions per type, versions, nonces, what is
//! owed, the loop that builds responses) is in [`ads`](super::ads), and this
//! module adds what delta xDS says differently. It does no I/O: the stream
//! feeds it requests and a [`View`] of the store and asks it for the next
//! response, so every rule below is unit-tested here. The resources are the same ones, from
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
    collections::{BTreeSet, HashMap, HashSet},
    hash::BuildHasher,
    sync::LazyLock,
    time::SystemTime,
};

use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
    google::protobuf::Any,
};

use super::{
    ads::{Ads, Carried, Desired, Handled, Protocol, Reply, TypeState, View, control_plane},
    resources::ResourceType,
};
use crate::model::{ServiceKey, parse_target};

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

/// The state of one delta ADS stream.
pub type DeltaSession = Ads<Delta>;

/// The rules of delta xDS, for [`Ads`]: the epoch of the versions it
/// sends, and per type a [`Holding`].
#[derive(Debug)]
pub struct Delta {
    /// Prefix of every version: this process's, unless a test sets it.
    pub(super) epoch: u64,
}

impl Default for Delta {
    fn default() -> Self {
        Self { epoch: *EPOCH }
    }
}

/// The content a client holds of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Listener, route or cluster of an existing service.
    Present,
    /// An assignment of this snapshot version.
    Version(u64),
    /// A version that is not one of this process's: re-sent if still wanted.
    Foreign,
}

/// What a delta client holds of one type, and what it has yet to be told.
#[derive(Debug, Default)]
pub struct Holding {
    /// Names subscribed since the last response: told if they do not exist.
    fresh: BTreeSet<String>,
    /// What the client holds from us, by name.
    held: HashMap<String, Held>,
}

impl TypeState<Holding> {
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
            self.sent
                .fresh
                .extend(new.iter().map(|name| (*name).to_owned()));
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
            self.sent.fresh.retain(|name| !gone.contains(name.as_str()));
            // The client drops what it unsubscribed; a wildcard keeps it sent.
            if !self.wildcard() {
                self.sent
                    .held
                    .retain(|name, _| !gone.contains(name.as_str()));
            }
        }
        changed
    }
}

impl DeltaSession {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream whose versions carry `epoch` instead of the process's: a
    /// test's way to stand for another lb-server process.
    pub fn with_epoch(epoch: u64) -> Self {
        Self::with_protocol(Delta { epoch })
    }

    /// How many resource names a request carries, against the per-request limit.
    pub fn names_in(request: &DeltaDiscoveryRequest) -> usize {
        request.resource_names_subscribe.len()
            + request.resource_names_unsubscribe.len()
            + request.initial_resource_versions.len()
    }

    /// Applies one request.
    pub fn handle(&mut self, request: &DeltaDiscoveryRequest) -> Handled {
        let Some(ty) = self.begin(request.node.as_ref(), &request.type_url) else {
            return Handled::UnknownType;
        };
        let epoch = self.protocol.epoch;
        let state = &mut self.types[ty.index()];
        let first = !state.requested;
        state.requested = true;

        let nonce = &request.response_nonce;
        let latest = !nonce.is_empty() && *nonce == state.nonce;
        let reply = if latest {
            // An ACK names no version in delta: it is of the latest response.
            let version = state.version.to_string();
            state.answer(nonce, request.error_detail.as_ref(), &version)
        } else {
            Reply::Subscribe
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
                        .sent
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
            self.touch(ty);
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
}

impl Delta {
    /// The version string of a content.
    fn version(&self, held: Held) -> String {
        match held {
            Held::Present => format!("{:x}:p", self.epoch),
            Held::Version(version) => format!("{:x}:{version}", self.epoch),
            Held::Foreign => String::new(),
        }
    }
}

impl Protocol for Delta {
    type Sent = Holding;
    type Content = Held;
    /// The names the client holds that are gone, or that it subscribed to
    /// and do not exist: `removed_resources`.
    type Extra = Vec<String>;
    type Response = DeltaDiscoveryResponse;

    fn content(
        ty: ResourceType,
        _: &TypeState<Holding>,
        _: &str,
        key: &ServiceKey,
        view: &View,
    ) -> Option<Held> {
        match ty {
            ResourceType::Endpoint => view
                .snapshots
                .get(key)
                .filter(|snapshot| snapshot.exists)
                .map(|snapshot| Held::Version(snapshot.version)),
            _ => view.exists(key).then_some(Held::Present),
        }
    }

    /// What the client does not hold, and what it holds (or was just
    /// subscribed to) that is not there.
    fn plan<'d>(
        _: ResourceType,
        state: &TypeState<Holding>,
        desired: &'d Desired<Held>,
    ) -> Option<(Carried<'d, Held>, Vec<String>)> {
        let Holding { fresh, held } = &state.sent;
        let changed: Carried<'d, Held> = desired
            .iter()
            .filter(|(name, (content, _))| held.get(*name) != Some(content))
            .collect();
        let mut removed: Vec<String> = held
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        removed.extend(
            fresh
                .iter()
                .filter(|name| !desired.contains_key(*name) && !held.contains_key(*name))
                .cloned(),
        );
        removed.sort_unstable();
        if changed.is_empty() && removed.is_empty() && !state.owed {
            return None;
        }
        Some((changed, removed))
    }

    fn commit(
        _: ResourceType,
        sent: &mut Holding,
        _: &Desired<Held>,
        carried: &Carried<'_, Held>,
        removed: &Vec<String>,
    ) {
        for name in removed {
            sent.held.remove(name);
        }
        for (name, (held, _)) in carried {
            sent.held.insert((*name).clone(), *held);
        }
        sent.fresh.clear();
    }

    fn response(
        &self,
        ty: ResourceType,
        version: u64,
        nonce: String,
        resources: Vec<(&String, Held, Any)>,
        removed: Vec<String>,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: version.to_string(),
            resources: resources
                .into_iter()
                .map(|(name, held, any)| Resource {
                    name: name.clone(),
                    version: self.version(held),
                    resource: Some(any),
                    ..Resource::default()
                })
                .collect(),
            type_url: ty.type_url().to_owned(),
            removed_resources: removed,
            nonce,
            control_plane: control_plane(),
            ..DeltaDiscoveryResponse::default()
        }
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
