//! The registry of open subscriber streams, for Admin and metrics.
//!
//! A stream registers when it starts and its [`SubscriberGuard`] removes it
//! when the stream is dropped, however it ends.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use super::{client_text, zones::ZoneBoard};
use crate::zones::Shares;

/// The protocol a subscriber speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `lookaside.v1.Discovery/Watch` (lb-client).
    Discovery,
    /// `grpc.lb.v1.LoadBalancer/BalanceLoad` (stock grpclb clients).
    Grpclb,
    /// xDS ADS (Envoy, proxyless gRPC).
    Xds,
}

impl Protocol {
    /// Every protocol, for metrics that list each.
    pub const ALL: [Protocol; 3] = [Protocol::Discovery, Protocol::Grpclb, Protocol::Xds];

    /// The protocol's place in [`Protocol::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The protocol's name in Admin and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Discovery => "discovery",
            Protocol::Grpclb => "grpclb",
            Protocol::Xds => "xds",
        }
    }
}

/// Running totals of the `ClientStats` a grpclb client reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpclbTotals {
    /// When the last report arrived.
    pub last_report: Option<SystemTime>,
    /// How many reports arrived.
    pub reports: u64,
    /// Calls started.
    pub calls_started: i64,
    /// Calls finished.
    pub calls_finished: i64,
    /// Calls that failed to send.
    pub calls_failed_to_send: i64,
    /// Calls known to have been received by a server.
    pub calls_known_received: i64,
    /// Calls the client dropped.
    pub calls_dropped: i64,
}

/// A response an xDS client rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsNack {
    /// `version_info` of the rejected response.
    pub version: String,
    /// Nonce of the rejected response.
    pub nonce: String,
    /// The `google.rpc.Code` of the client's `error_detail`.
    pub code: i32,
    /// The client's error message.
    pub message: String,
    /// When the NACK arrived.
    pub at: SystemTime,
}

/// One resource type on an xDS stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdsTypeStatus {
    /// The type URL.
    pub type_url: String,
    /// Subscribed names, sorted; `*` for a wildcard subscription.
    pub names: Vec<String>,
    /// `version_info` of the last response sent.
    pub version_sent: String,
    /// `version_info` of the last response the client ACKed.
    pub acked_version: String,
    /// Responses the client rejected.
    pub nacks: u64,
    /// The last rejection.
    pub last_nack: Option<XdsNack>,
}

/// What an xDS client told us and acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`.
    pub node_cluster: String,
    /// `node.user_agent_name`.
    pub user_agent: String,
    /// Every type the client asked for, sorted by type URL.
    pub types: Vec<XdsTypeStatus>,
}

impl XdsStatus {
    /// The entry of a type, added in type URL order if new.
    pub fn type_mut(&mut self, type_url: &str) -> &mut XdsTypeStatus {
        let index = match self
            .types
            .binary_search_by(|t| t.type_url.as_str().cmp(type_url))
        {
            Ok(index) => index,
            Err(index) => {
                let entry = XdsTypeStatus {
                    type_url: type_url.to_owned(),
                    ..XdsTypeStatus::default()
                };
                self.types.insert(index, entry);
                // One entry per type a client asks for (three or four), kept
                // for the stream's life: no room for more.
                self.types.shrink_to_fit();
                index
            }
        };
        &mut self.types[index]
    }
}

/// One open stream.
#[derive(Debug)]
pub struct SubscriberInfo {
    /// The client's address.
    pub peer: String,
    /// The canonical target it watches.
    pub target: String,
    /// The protocol it speaks.
    pub protocol: Protocol,
    /// When the stream opened.
    pub since: SystemTime,
    last_version: AtomicU64,
    // std Mutex: short updates, never held across `.await`.
    grpclb: Mutex<Option<GrpclbTotals>>,
    // std Mutex: per stream, touched only when an xDS request or response
    // passes, never held across `.await`.
    xds: Mutex<Option<XdsStatus>>,
    // std Mutex: set once or twice per stream and when its shares change,
    // never held across `.await`.
    zone: Mutex<ZoneInfo>,
}

/// A subscriber's zone and the shares it was last sent.
#[derive(Debug, Clone, Default)]
struct ZoneInfo {
    zone: String,
    shares: Option<Shares>,
}

impl SubscriberInfo {
    /// The last version sent to this subscriber.
    pub fn last_version(&self) -> u64 {
        self.last_version.load(Ordering::Relaxed)
    }

    /// The grpclb client stats, for grpclb subscribers that reported any.
    pub fn grpclb(&self) -> Option<GrpclbTotals> {
        self.grpclb.lock().unwrap().clone()
    }

    /// The xDS state, for xDS subscribers.
    pub fn xds(&self) -> Option<XdsStatus> {
        self.xds.lock().unwrap().clone()
    }

    /// Records the client's zone, for Admin: the zone a Discovery client
    /// said on its Watch, or an xDS client's node locality. Client text: kept
    /// at most [`client_text::MAX_KEPT_BYTES`]. Only Discovery subscribers
    /// are counted for zone shares (see [`crate::api::zones`]); this counts nothing.
    pub fn set_zone(&self, zone: &str) {
        self.zone.lock().unwrap().zone = client_text::kept(zone);
    }

    /// The client's zone; empty if unknown.
    pub fn zone(&self) -> String {
        self.zone.lock().unwrap().zone.clone()
    }

    /// The zone shares last sent to this subscriber; empty if none.
    pub fn zone_shares(&self) -> Shares {
        self.zone
            .lock()
            .unwrap()
            .shares
            .clone()
            .unwrap_or_else(|| Arc::from([]))
    }
}

/// Every open subscriber stream, and how many Discovery subscribers each
/// service has per zone (its [`ZoneBoard`]).
#[derive(Debug, Default)]
pub struct Subscribers {
    next_id: AtomicU64,
    // std Mutex: insert/remove/copy only, never held across `.await`.
    open: Mutex<HashMap<u64, Arc<SubscriberInfo>>>,
    zones: Arc<ZoneBoard>,
}

impl Subscribers {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The zones of every service's Discovery subscribers.
    pub fn zones(&self) -> &Arc<ZoneBoard> {
        &self.zones
    }

    /// Registers a stream; it stays listed while the guard lives.
    pub fn register(
        self: &Arc<Self>,
        peer: String,
        target: String,
        protocol: Protocol,
    ) -> SubscriberGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(SubscriberInfo {
            peer,
            target,
            protocol,
            since: SystemTime::now(),
            last_version: AtomicU64::new(0),
            grpclb: Mutex::new(None),
            xds: Mutex::new(None),
            zone: Mutex::new(ZoneInfo::default()),
        });
        self.open.lock().unwrap().insert(id, Arc::clone(&info));
        SubscriberGuard {
            id,
            info,
            registry: Arc::clone(self),
        }
    }

    /// Every open stream, oldest first.
    pub fn list(&self) -> Vec<Arc<SubscriberInfo>> {
        let mut list: Vec<(u64, Arc<SubscriberInfo>)> = self
            .open
            .lock()
            .unwrap()
            .iter()
            .map(|(id, info)| (*id, Arc::clone(info)))
            .collect();
        list.sort_by_key(|(id, _)| *id);
        list.into_iter().map(|(_, info)| info).collect()
    }

    /// How many streams are open per protocol.
    pub fn count(&self, protocol: Protocol) -> usize {
        self.open
            .lock()
            .unwrap()
            .values()
            .filter(|info| info.protocol == protocol)
            .count()
    }
}

/// Keeps a stream listed; unlists it on drop.
#[derive(Debug)]
pub struct SubscriberGuard {
    id: u64,
    info: Arc<SubscriberInfo>,
    registry: Arc<Subscribers>,
}

impl SubscriberGuard {
    /// The client's address.
    pub fn peer(&self) -> &str {
        &self.info.peer
    }

    /// Records the version just sent.
    pub fn sent(&self, version: u64) {
        self.info.last_version.store(version, Ordering::Relaxed);
    }

    /// The subscriber's entry, to record its zone ([`SubscriberInfo::set_zone`]).
    pub fn info(&self) -> &SubscriberInfo {
        &self.info
    }

    /// Records the zone shares just sent.
    pub fn sent_shares(&self, shares: &Shares) {
        self.info.zone.lock().unwrap().shares = Some(Arc::clone(shares));
    }

    /// Adds a grpclb client stats report to the totals.
    pub fn record_grpclb(&self, update: impl FnOnce(&mut GrpclbTotals)) {
        let mut totals = self.info.grpclb.lock().unwrap();
        update(totals.get_or_insert_with(GrpclbTotals::default));
    }

    /// Updates the xDS state shown in Admin.
    pub fn record_xds(&self, update: impl FnOnce(&mut XdsStatus)) {
        let mut status = self.info.xds.lock().unwrap();
        update(status.get_or_insert_with(XdsStatus::default));
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.registry.open.lock().unwrap().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::Protocol;

    #[test]
    fn protocol_index_is_its_place_in_all() {
        for (place, protocol) in Protocol::ALL.iter().enumerate() {
            assert_eq!(protocol.index(), place, "{protocol:?}");
        }
    }
}
