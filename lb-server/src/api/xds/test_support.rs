//! What the unit tests of both kinds of ADS session share: a store as a
//! stream sees it ([`World`]), and looking at a session for its next response.

use std::{cell::Cell, fmt::Debug, sync::Arc};

use envoy_types::pb::google::rpc::Status;

use super::{
    ads::{Ads, Handled, Outgoing, Protocol, Reply, View},
    resources::{ResourceType, Resources},
};
use crate::{
    api::subscribers::{XdsNack, XdsStatus, XdsTypeStatus},
    config::XdsLbPolicy,
    model::{Endpoint, ServiceKey, Snapshot, parse_target},
};

pub(super) const GREETER: &str = "greeter.default:grpc";
pub(super) const OTHER: &str = "other.default:80";

/// What every test session serves.
pub(super) fn resources() -> Resources {
    Resources::new(XdsLbPolicy::RoundRobin)
}

/// The service a valid target names.
pub(super) fn key(target: &str) -> ServiceKey {
    parse_target(target).unwrap()
}

/// The `error_detail` of a NACK.
pub(super) fn rejection(message: &str) -> Status {
    Status {
        code: 3,
        message: message.into(),
        details: vec![],
    }
}

/// The store as a stream sees it, and whether it changed since the last look.
#[derive(Default)]
pub(super) struct World {
    pub(super) view: View,
    /// Set by every edit, taken by the next look: what the stream's
    /// store watches do with `view_changed` (`Some(existence changed)`).
    changed: Cell<Option<bool>>,
}

impl World {
    /// `target` exists at `version` with these endpoints.
    pub(super) fn set_endpoints(
        &mut self,
        target: &str,
        version: u64,
        endpoints: Vec<Endpoint>,
    ) -> &mut Self {
        let key = key(target);
        let snapshot = Snapshot {
            version,
            exists: true,
            endpoints: endpoints.into(),
            ..Snapshot::unknown()
        };
        let existed = !self.view.existing.insert(key.clone());
        self.view.snapshots.insert(key, Arc::new(snapshot));
        self.note(!existed);
        self
    }

    /// `target` exists at `version` with one endpoint per address suffix.
    pub(super) fn set(&mut self, target: &str, version: u64, endpoints: &[u8]) -> &mut Self {
        let endpoints = endpoints
            .iter()
            .map(|i| Endpoint::new(format!("10.0.0.{i}").parse().unwrap(), 80))
            .collect();
        self.set_endpoints(target, version, endpoints)
    }

    /// `target` is gone at `version`.
    pub(super) fn remove(&mut self, target: &str, version: u64) -> &mut Self {
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

    /// Notes a change, of existence or of endpoints only.
    pub(super) fn note(&self, existence: bool) {
        let before = self.changed.get().unwrap_or(false);
        self.changed.set(Some(before || existence));
    }
}

/// The session's next response, after telling it what changed.
pub(super) fn look<P: Protocol>(
    session: &mut Ads<P>,
    world: &World,
) -> Option<Outgoing<P::Response>> {
    if let Some(existence) = world.changed.take() {
        session.view_changed(existence);
    }
    session.next_response(&world.view, &resources())
}

/// The session's next response, which there must be.
pub(super) fn next<P: Protocol>(session: &mut Ads<P>, world: &World) -> Outgoing<P::Response> {
    look(session, world).expect("a response")
}

/// There is no response to send, even when every type is looked at.
pub(super) fn quiet<P: Protocol>(session: &mut Ads<P>, world: &World)
where
    P::Response: Debug,
{
    if let Some(out) = look(session, world) {
        panic!("unexpected response: {:?}", out.response);
    }
    // Whatever the dirty flags say, a full look finds nothing either.
    session.view_changed(true);
    if let Some(out) = session.next_response(&world.view, &resources()) {
        panic!("unexpected response after a full look: {:?}", out.response);
    }
}

/// What a plain ACK of `version` of `ty` is handled as.
pub(super) fn acked(ty: ResourceType, version: &str) -> Handled {
    Handled::Request {
        ty,
        reply: Reply::Ack {
            version: version.into(),
        },
        names_changed: false,
    }
}

/// The NACK a request was handled as; anything else fails the test.
pub(super) fn nacked(handled: Handled) -> XdsNack {
    let Handled::Request {
        reply: Reply::Nack(nack),
        ..
    } = handled
    else {
        panic!("NACK expected, got {handled:?}");
    };
    nack
}

/// What Admin shows of `ty` once `nack` is recorded (with the subscribed
/// names when `names`).
pub(super) fn recorded<P: Protocol>(
    session: &Ads<P>,
    ty: ResourceType,
    nack: XdsNack,
    names: bool,
) -> XdsTypeStatus {
    let mut status = XdsStatus::default();
    session.record(ty, Some(&Reply::Nack(nack)), names, &mut status);
    status.types.remove(0)
}

/// Whether a request was handled as a new subscription that changed the names.
pub(super) fn subscribes(handled: &Handled) -> bool {
    matches!(
        handled,
        Handled::Request {
            reply: Reply::Subscribe,
            names_changed: true,
            ..
        }
    )
}
