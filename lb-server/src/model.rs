//! The domain model: service keys, targets, endpoints and snapshots.
//!
//! Invariants: a [`ServiceKey`] is always valid (it can only be built by parsing
//! or from already-validated parts), a [`Snapshot`]'s endpoints are sorted and
//! unique by address and port, and every endpoint has a weight of at least 1.

use std::{
    fmt,
    net::IpAddr,
    str::FromStr,
    sync::{Arc, OnceLock},
    time::{Instant, SystemTime},
};

use bytes::Bytes;

/// The longest target we accept, in bytes (grpclb caps names below 256 bytes).
pub const MAX_TARGET_LEN: usize = 255;

/// A service port, by name (`grpc`) or number (`50051`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    /// A named port, as in the EndpointSlice's `ports[].name`.
    Name(String),
    /// A port number: the port endpoints listen on.
    Number(u16),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Name(name) => f.write_str(name),
            PortRef::Number(number) => write!(f, "{number}"),
        }
    }
}

/// One service port in one namespace: what a client subscribes to.
///
/// Its canonical text form is `NAME.NAMESPACE:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    namespace: String,
    name: String,
    port: PortRef,
}

impl ServiceKey {
    /// Builds a key from parts, validating each as [`parse_target`] would.
    pub fn new(namespace: &str, name: &str, port: PortRef) -> Result<Self, TargetError> {
        check_label(name, "service name")?;
        check_label(namespace, "namespace")?;
        if let PortRef::Name(port_name) = &port {
            check_port_name(port_name)?;
        }
        if port == PortRef::Number(0) {
            return Err(TargetError::BadPort("0".into()));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port,
        })
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service port.
    pub fn port(&self) -> &PortRef {
        &self.port
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{}", self.name, self.namespace, self.port)
    }
}

impl FromStr for ServiceKey {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_target(s)
    }
}

/// Why a target was rejected. Each message says what is wrong and what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Nothing was given.
    #[error("empty target: expected NAME.NAMESPACE:PORT")]
    Empty,
    /// Longer than [`MAX_TARGET_LEN`].
    #[error("target is {0} bytes long; the limit is {MAX_TARGET_LEN}")]
    TooLong(usize),
    /// A scheme other than `dns:///`.
    #[error("unsupported scheme in {0:?}: only an optional \"dns:///\" prefix is accepted")]
    Scheme(String),
    /// No `:PORT` suffix.
    #[error("missing port in {0:?}: expected NAME.NAMESPACE:PORT")]
    MissingPort(String),
    /// The port is neither a valid name nor a number in 1..=65535.
    #[error(
        "bad port {0:?}: expected a port name (a DNS label with a letter) or a number in 1..=65535"
    )]
    BadPort(String),
    /// The host is not `NAME.NAMESPACE` or `NAME.NAMESPACE.svc.cluster.local`.
    #[error("bad host {0:?}: expected NAME.NAMESPACE or NAME.NAMESPACE.svc.cluster.local")]
    BadHost(String),
    /// A service name or namespace that is not a DNS label.
    #[error(
        "bad {what} {value:?}: expected a DNS label (lowercase letters, digits and '-', at most 63)"
    )]
    BadLabel {
        /// Which part was wrong.
        what: &'static str,
        /// The offending text.
        value: String,
    },
}

/// Parses a target: `NAME.NAMESPACE:PORT`, `NAME.NAMESPACE.svc.cluster.local:PORT`,
/// either with an optional `dns:///` prefix. PORT is a port name or a number.
pub fn parse_target(target: &str) -> Result<ServiceKey, TargetError> {
    if target.is_empty() {
        return Err(TargetError::Empty);
    }
    if target.len() > MAX_TARGET_LEN {
        return Err(TargetError::TooLong(target.len()));
    }
    let rest = match target.strip_prefix("dns:///") {
        Some(rest) => rest,
        None if target.contains("://") || target.starts_with("dns:") => {
            return Err(TargetError::Scheme(target.into()));
        }
        None => target,
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| TargetError::MissingPort(target.into()))?;
    let port = parse_port(port)?;
    let host = host.strip_suffix(".svc.cluster.local").unwrap_or(host);
    let (name, namespace) = host
        .split_once('.')
        .filter(|(_, ns)| !ns.contains('.'))
        .ok_or_else(|| TargetError::BadHost(host.into()))?;
    ServiceKey::new(namespace, name, port)
}

fn parse_port(port: &str) -> Result<PortRef, TargetError> {
    if port.is_empty() {
        return Err(TargetError::BadPort(port.into()));
    }
    if port.bytes().all(|b| b.is_ascii_digit()) {
        return match port.parse::<u16>() {
            Ok(n) if n > 0 => Ok(PortRef::Number(n)),
            _ => Err(TargetError::BadPort(port.into())),
        };
    }
    check_port_name(port)?;
    Ok(PortRef::Name(port.into()))
}

/// A port name as Services and EndpointSlices allow it: a DNS-1123 label
/// with at least one letter (all digits would read as a number).
fn check_port_name(port: &str) -> Result<(), TargetError> {
    if check_label(port, "port").is_ok() && port.bytes().any(|b| b.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(TargetError::BadPort(port.into()))
    }
}

/// A DNS-1123 label: at most 63 of `[a-z0-9-]`, starting and ending alphanumeric.
fn check_label(value: &str, what: &'static str) -> Result<(), TargetError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(TargetError::BadLabel {
            what,
            value: value.into(),
        })
    }
}

/// The longest zone name: a zone is a label value (`topology.kubernetes.io/zone`).
pub const MAX_ZONE_LEN: usize = 63;

/// The longest node name: a node name is a DNS-1123 subdomain.
pub const MAX_NODE_LEN: usize = 253;

/// Why a zone or node name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Longer than [`MAX_ZONE_LEN`] or [`MAX_NODE_LEN`] (the name itself is
    /// not repeated: it may be anything a client sent).
    #[error("{what} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// `zone` or `node`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Characters Kubernetes does not allow in such a name.
    #[error("bad {what} {value:?}: expected {expected}")]
    BadName {
        /// `zone` or `node`.
        what: &'static str,
        /// The name, at most the limit long.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
}

/// Checks a zone name as Kubernetes allows a label value: at most
/// [`MAX_ZONE_LEN`] of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
/// Empty is accepted: it means unknown, and callers that need a zone say so.
pub fn check_zone(zone: &str) -> Result<(), TopologyError> {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    check_topology(
        zone,
        "zone",
        MAX_ZONE_LEN,
        |b| alnum(b) || matches!(b, b'-' | b'_' | b'.'),
        alnum,
        "a label value (letters, digits, '-', '_' and '.', starting and ending with a letter or digit)",
    )
}

/// Checks a node name as Kubernetes allows it: a DNS-1123 subdomain, at most
/// [`MAX_NODE_LEN`] of `[a-z0-9.-]`, starting and ending alphanumeric.
/// Empty is accepted: it means unknown.
pub fn check_node(node: &str) -> Result<(), TopologyError> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    check_topology(
        node,
        "node",
        MAX_NODE_LEN,
        |b| alnum(b) || matches!(b, b'-' | b'.'),
        alnum,
        "a DNS subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)",
    )
}

fn check_topology(
    value: &str,
    what: &'static str,
    max: usize,
    allowed: impl Fn(u8) -> bool,
    ends: impl Fn(u8) -> bool,
    expected: &'static str,
) -> Result<(), TopologyError> {
    if value.len() > max {
        return Err(TopologyError::TooLong {
            what,
            len: value.len(),
            max,
        });
    }
    let bytes = value.as_bytes();
    let ok = match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => true,
        (Some(&first), Some(&last)) => {
            ends(first) && ends(last) && bytes.iter().all(|&b| allowed(b))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(TopologyError::BadName {
            what,
            value: value.to_owned(),
            expected,
        })
    }
}

/// Whole endpoint sets of several services, as a source produces them.
pub type Services = std::collections::HashMap<ServiceKey, Vec<Endpoint>>;

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// The backend's IP address.
    pub address: IpAddr,
    /// The port it serves the service port on.
    pub port: u16,
    /// Relative weight, at least 1.
    pub weight: u32,
    /// Topology zone, empty if unknown. Shared: the copies of an endpoint
    /// (per port key, per published list, per snapshot) hold one string,
    /// and cloning or comparing a copy costs no allocation or byte compare.
    pub zone: Arc<str>,
    /// Node name, empty if unknown (shared, as `zone`).
    pub node: Arc<str>,
    /// Pod name, empty if unknown (shared, as `zone`).
    pub pod: Arc<str>,
    /// Serving but terminating: no new calls.
    pub draining: bool,
    /// EndpointSlice hints, `None` when the endpoint has none (most have
    /// none, so an endpoint without them costs one pointer). Shared: the
    /// endpoints of one slice hinted alike hold one copy, and the many
    /// copies of an endpoint (per port, per published list) one each.
    pub hints: Option<Arc<Hints>>,
}

/// An endpoint's EndpointSlice hints (topology-aware routing): the zones,
/// and the nodes, whose clients should use it. Never both empty when held.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    /// `hints.forZones[].name`.
    pub for_zones: Box<[Arc<str>]>,
    /// `hints.forNodes[].name`.
    pub for_nodes: Box<[Arc<str>]>,
}

/// The hints of an endpoint without any.
static NO_HINTS: std::sync::LazyLock<Hints> = std::sync::LazyLock::new(Hints::default);

impl Endpoint {
    /// A ready endpoint with weight 1 and no topology.
    pub fn new(address: IpAddr, port: u16) -> Self {
        Self {
            address,
            port,
            weight: 1,
            zone: Arc::default(),
            node: Arc::default(),
            pod: Arc::default(),
            draining: false,
            hints: None,
        }
    }

    /// The endpoint's hints, empty if it has none.
    pub fn hints(&self) -> &Hints {
        self.hints.as_deref().unwrap_or(&NO_HINTS)
    }

    /// Builder: sets the zones it is hinted for (`hints.forZones`).
    pub fn for_zones<S: AsRef<str>>(self, zones: impl IntoIterator<Item = S>) -> Self {
        let for_zones = zones.into_iter().map(|z| Arc::from(z.as_ref())).collect();
        let for_nodes = self.hints().for_nodes.clone();
        self.with_hints(Hints {
            for_zones,
            for_nodes,
        })
    }

    /// Builder: sets the nodes it is hinted for (`hints.forNodes`).
    pub fn for_nodes<S: AsRef<str>>(self, nodes: impl IntoIterator<Item = S>) -> Self {
        let for_nodes = nodes.into_iter().map(|n| Arc::from(n.as_ref())).collect();
        let for_zones = self.hints().for_zones.clone();
        self.with_hints(Hints {
            for_zones,
            for_nodes,
        })
    }

    /// Builder: sets the hints; empty hints are stored as none.
    pub fn with_hints(mut self, hints: Hints) -> Self {
        self.hints =
            (!hints.for_zones.is_empty() || !hints.for_nodes.is_empty()).then(|| Arc::new(hints));
        self
    }

    /// Builder: sets the zone.
    pub fn zone(mut self, zone: impl AsRef<str>) -> Self {
        self.zone = Arc::from(zone.as_ref());
        self
    }

    /// Builder: sets the weight (at least 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Builder: sets the node name.
    pub fn node(mut self, node: impl AsRef<str>) -> Self {
        self.node = Arc::from(node.as_ref());
        self
    }

    /// Builder: sets the pod name.
    pub fn pod(mut self, pod: impl AsRef<str>) -> Self {
        self.pod = Arc::from(pod.as_ref());
        self
    }

    /// Builder: marks the endpoint draining.
    pub fn draining(mut self) -> Self {
        self.draining = true;
        self
    }
}

/// Sorts endpoints and removes duplicates by address and port, keeping the
/// first of each (callers put the preferred copy first).
pub fn normalize(mut endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    // Stable sort: among equal address+port, the caller's order decides.
    endpoints.sort_by_key(|e| (e.address, e.port));
    endpoints.dedup_by(|later, first| (later.address, later.port) == (first.address, first.port));
    for endpoint in &mut endpoints {
        endpoint.weight = endpoint.weight.max(1);
    }
    endpoints
}

/// Whether `endpoints` are as [`normalize`] leaves them: sorted by address
/// and port, unique, every weight at least 1.
pub fn is_normalized(endpoints: &[Endpoint]) -> bool {
    endpoints
        .windows(2)
        .all(|pair| (pair[0].address, pair[0].port) < (pair[1].address, pair[1].port))
        && endpoints.iter().all(|e| e.weight >= 1)
}

/// The whole state of one service at one version.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Grows with every change; 0 only for a service never seen.
    pub version: u64,
    /// False when the service is unknown (never seen, or removed).
    pub exists: bool,
    /// Sorted by address and port, unique (as [`normalize`] leaves them);
    /// shared with the source that published them, which may keep the same
    /// list for several keys and versions.
    pub endpoints: Arc<[Endpoint]>,
    /// Wall-clock time of the change, for operators.
    pub updated: SystemTime,
    /// When the source saw the event that produced this version, for push latency.
    pub event_at: Instant,
    /// This snapshot as the Discovery API sends it (an encoded `WatchResponse`
    /// with its gRPC length prefix), made by the first stream that sends it
    /// and shared by every other: a snapshot belongs to one service, so its
    /// encoding is the same for all of that service's subscribers.
    pub encoded: OnceLock<Bytes>,
    /// This snapshot as diffs from older ones of its service, for Watch
    /// streams that asked for incremental updates: made once per older
    /// version and shared by every stream that goes from it to this one.
    pub diffs: DiffCache,
}

/// Encodings of a snapshot as a diff from an older version, keyed by that
/// version: what the Discovery API sends an incremental stream (its bytes, or
/// nothing when it sends the full snapshot instead). Bounded: it holds the
/// diffs from the last [`DiffCache::CAPACITY`] older versions asked for; a
/// stream going from an evicted one makes its own.
#[derive(Debug, Default)]
pub struct DiffCache {
    // std Mutex: held only to find or add an entry, never across `.await`
    // nor while a diff is made (the entry's OnceLock makes it once).
    entries: std::sync::Mutex<Vec<(u64, DiffEntry)>>,
}

/// One cached diff: `None` when the full snapshot is sent instead.
pub type DiffEntry = std::sync::Arc<OnceLock<Option<Bytes>>>;

impl DiffCache {
    /// How many older versions a snapshot keeps diffs from: live readers all
    /// go from the previous version, readers that fell behind from a few more.
    pub const CAPACITY: usize = 4;

    /// The entry for the diff from version `base`, new and empty if none is cached.
    pub fn entry(&self, base: u64) -> DiffEntry {
        let mut entries = self.entries.lock().unwrap();
        if let Some((_, entry)) = entries.iter().find(|(version, _)| *version == base) {
            return std::sync::Arc::clone(entry);
        }
        if entries.len() == Self::CAPACITY {
            entries.remove(0);
        }
        let entry = DiffEntry::default();
        entries.push((base, std::sync::Arc::clone(&entry)));
        entry
    }
}

/// A copy starts empty: a cache is never worth copying.
impl Clone for DiffCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Snapshot {
    /// The snapshot of a service nobody has published.
    pub fn unknown() -> Self {
        Self {
            version: 0,
            exists: false,
            endpoints: Arc::default(),
            updated: SystemTime::now(),
            event_at: Instant::now(),
            encoded: OnceLock::new(),
            diffs: DiffCache::default(),
        }
    }

    /// Endpoints that may take new calls.
    pub fn serving(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| !e.draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str, port: PortRef) -> ServiceKey {
        ServiceKey::new(ns, name, port).unwrap()
    }

    #[test]
    fn accepts_every_documented_form() {
        let want = key("default", "greeter", PortRef::Name("grpc".into()));
        for target in [
            "greeter.default:grpc",
            "greeter.default.svc.cluster.local:grpc",
            "dns:///greeter.default:grpc",
            "dns:///greeter.default.svc.cluster.local:grpc",
        ] {
            assert_eq!(parse_target(target).unwrap(), want, "{target}");
        }
        assert_eq!(
            parse_target("greeter.default:50051").unwrap(),
            key("default", "greeter", PortRef::Number(50051))
        );
        assert_eq!(want.to_string(), "greeter.default:grpc");
        // Service port names are DNS labels: longer than IANA's 15 is fine.
        assert!(parse_target("greeter.default:grpc-web-internal-v2").is_ok());
    }

    #[test]
    fn rejects_malformed_targets_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "empty target"),
            ("greeter.default", "missing port"),
            ("greeter:grpc", "bad host"),
            ("a.b.c:grpc", "bad host"),
            ("greeter.default.svc:grpc", "bad host"),
            ("greeter.default:0", "bad port"),
            ("greeter.default:65536", "bad port"),
            ("greeter.default:", "bad port"),
            ("greeter.default:GRPC", "bad port"),
            ("greeter.default:-grpc", "bad port"),
            (&format!("greeter.default:{}", "p".repeat(64)), "bad port"),
            ("greeter.default:123-", "bad port"),
            ("Greeter.default:grpc", "bad service name"),
            ("greeter.-ns:grpc", "bad namespace"),
            (".default:grpc", "bad service name"),
            ("http://greeter.default:grpc", "unsupported scheme"),
            ("dns://8.8.8.8/greeter.default:grpc", "unsupported scheme"),
            ("greeter.default:grpc extra", "bad port"),
        ];
        for (target, reason) in cases {
            let err = parse_target(target).unwrap_err().to_string();
            assert!(err.contains(reason), "{target:?}: {err:?} lacks {reason:?}");
        }
        let long = format!("{}.default:grpc", "a".repeat(300));
        assert!(matches!(
            parse_target(&long),
            Err(TargetError::TooLong(313))
        ));
        let label = format!("{}.default:grpc", "a".repeat(64));
        assert!(
            parse_target(&label)
                .unwrap_err()
                .to_string()
                .contains("bad service name")
        );
    }

    #[test]
    fn normalize_sorts_and_keeps_the_first_duplicate() {
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.1".parse().unwrap();
        let out = normalize(vec![
            Endpoint::new(a, 80).zone("first"),
            Endpoint::new(b, 80),
            Endpoint::new(a, 80).zone("second"),
            Endpoint::new(a, 81).weight(0),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].address, b);
        assert_eq!(&*out[1].zone, "first");
        assert_eq!(out[2].weight, 1);
        assert!(is_normalized(&out));
        assert!(is_normalized(&[]));
        let (first, second, third) = (out[0].clone(), out[1].clone(), out[2].clone());
        assert!(!is_normalized(&[second.clone(), first]), "unsorted");
        assert!(
            !is_normalized(&[second.clone(), second.clone()]),
            "a duplicate"
        );
        let unweighted = Endpoint { weight: 0, ..third };
        assert!(!is_normalized(&[second, unweighted]), "a weight of 0");
    }
}
