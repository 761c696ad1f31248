//! The protocol state of one ADS stream (state of the world, SotW).
//!
//! A [`Session`] is an [`Ads`] of the [`SotW`] rules: the bookkeeping both
//! protocols share (subscriptions per type, versions, nonces, what is owed,
//! the loop that builds responses) is in [`ads`](super::ads); what this
//! module adds is what state of the world says differently. Per resource
//! type the client was last sent name → a stamp of the content. It does no
//! I/O: the stream feeds it requests and a [`View`] of the store, and asks
//! it for the next response, so every rule below is unit-tested here.
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

use std::collections::BTreeSet;

use envoy_types::pb::{
    envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    google::protobuf::Any,
};

pub use super::ads::{Handled, NodeInfo, Outgoing, Reply, View};
use super::{
    ads::{Ads, Carried, Desired, Protocol, TypeState, control_plane},
    resources::ResourceType,
    sorted_map::SortedMap,
};
use crate::model::{ServiceKey, parse_target};

/// The state of one ADS stream (state of the world).
pub type Session = Ads<SotW>;

/// The rules of state-of-the-world xDS, for [`Ads`]: they keep nothing
/// beyond the shared state but, per type, [`Stamps`].
#[derive(Debug, Default)]
pub struct SotW;

/// The content a client was sent for one resource, to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Listener, route or cluster of an existing service: it depends on nothing else.
    Present,
    /// An assignment of this snapshot version.
    Version(u64),
    /// An assignment with no endpoints, for a service that went away.
    Empty,
}

/// What a state-of-the-world client holds of one type: name → [`Stamp`].
#[derive(Debug, Default)]
pub struct Stamps(SortedMap<Stamp>);

impl Session {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one request.
    pub fn handle(&mut self, request: &DiscoveryRequest) -> Handled {
        let Some(ty) = self.begin(request.node.as_ref(), &request.type_url) else {
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
            state.sent.0.clear();
            state.owed = true;
            Reply::Subscribe
        } else {
            let error = request.error_detail.as_ref();
            state.answer(&request.response_nonce, error, &request.version_info)
        };

        let mut names: BTreeSet<&str> = request.resource_names.iter().map(String::as_str).collect();
        let star = names.remove("*");
        let wildcard_before = state.wildcard();
        if ty.allows_wildcard() {
            if first {
                state.legacy_wildcard = names.is_empty() && !star;
            } else if !names.is_empty() {
                state.legacy_wildcard = false;
            }
        }
        // Every request says the whole subscription: `*` holds while it is listed.
        state.star = ty.allows_wildcard() && star;
        let wildcard = state.wildcard();
        let same_names = names.len() == state.names.len()
            && names.iter().zip(state.names.keys()).all(|(a, b)| *a == b);
        let names_changed = wildcard != wildcard_before || !same_names;
        if names_changed {
            state.sent.0.retain(|name| wildcard || names.contains(name));
            state.names = names
                .into_iter()
                .map(|name| (name.to_owned(), parse_target(name).ok()))
                .collect();
            state.owed = true;
        }
        if state.owed {
            self.touch(ty);
        }
        Handled::Request {
            ty,
            reply,
            names_changed,
        }
    }
}

impl Protocol for SotW {
    type Sent = Stamps;
    type Content = Stamp;
    type Extra = ();
    type Response = DiscoveryResponse;

    fn content(
        ty: ResourceType,
        state: &TypeState<Stamps>,
        name: &str,
        key: &ServiceKey,
        view: &View,
    ) -> Option<Stamp> {
        match ty {
            ResourceType::Endpoint => match view.snapshots.get(key) {
                Some(snapshot) if snapshot.exists => Some(Stamp::Version(snapshot.version)),
                _ if state.sent.0.contains_key(name) => Some(Stamp::Empty),
                _ => None,
            },
            _ => view.exists(key).then_some(Stamp::Present),
        }
    }

    /// LDS and CDS: everything, whenever anything differs (a name missing
    /// from the response is deleted); RDS and EDS: what changed.
    fn plan<'d>(
        ty: ResourceType,
        state: &TypeState<Stamps>,
        desired: &'d Desired<Stamp>,
    ) -> Option<(Carried<'d, Stamp>, ())> {
        let sent = &state.sent.0;
        let carried: Carried<'d, Stamp> = if ty.full_state() {
            let unchanged = desired.len() == sent.len()
                && desired
                    .iter()
                    .all(|(name, (stamp, _))| sent.get(name) == Some(stamp));
            if unchanged && !state.owed {
                return None;
            }
            desired.iter().collect()
        } else {
            let changed: Carried<'d, Stamp> = desired
                .iter()
                .filter(|(name, (stamp, _))| sent.get(name) != Some(stamp))
                .collect();
            if changed.is_empty() && !state.owed {
                return None;
            }
            changed
        };
        Some((carried, ()))
    }

    fn commit(
        ty: ResourceType,
        sent: &mut Stamps,
        desired: &Desired<Stamp>,
        carried: &Carried<'_, Stamp>,
        _: &(),
    ) {
        if ty.full_state() {
            sent.0.clear();
        } else {
            sent.0.retain(|name| desired.contains_key(name));
        }
        for (name, (stamp, _)) in carried {
            sent.0.insert((*name).clone(), *stamp);
        }
    }

    fn response(
        &self,
        ty: ResourceType,
        version: u64,
        nonce: String,
        resources: Vec<(&String, Stamp, Any)>,
        _: (),
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.to_string(),
            resources: resources.into_iter().map(|(_, _, any)| any).collect(),
            type_url: ty.type_url().to_owned(),
            nonce,
            control_plane: control_plane(),
            ..DiscoveryResponse::default()
        }
    }
}

#[cfg(test)]
mod tests;
