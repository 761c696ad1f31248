//! xDS resources built from the store: one Listener, RouteConfiguration,
//! Cluster and ClusterLoadAssignment per service.
//!
//! Naming: every resource of a service is named by its target as the client
//! asked for it (usually the canonical `NAME.NAMESPACE:PORT`); resources that
//! point at others (a route at its cluster, a cluster at its assignment) use
//! the canonical form, so one service has one Cluster and one assignment
//! however its Listener was asked for.
//!
//! Only the assignment depends on endpoints; Listener, RouteConfiguration
//! and Cluster depend only on the service existing (and the configured
//! balancing policy), so they are re-sent only when a service appears or goes.
//!
//! With `--xds-upstream-tls` a Cluster also depends on the kind of client
//! ([`ClientKind`], from its node's user agent): Envoy and proxyless gRPC
//! name their certificates in different, mutually rejected, fields of the
//! `UpstreamTlsContext` (see [`upstream_tls_context`]). Each kind's Cluster
//! is encoded once and shared by every client of that kind.
//!
//! An assignment also depends on the client's zone (its node's
//! `locality.zone`): its own zone's locality is priority 0 and the rest
//! priority 1 while that zone has a serving endpoint ([`load_assignment`]).
//! It is encoded once per version and zone that has an answer of its own;
//! clients of every other zone, or of none, share one encoding. EndpointSlice
//! hints (`forZones`) are not applied over xDS: priorities already keep a
//! client in its zone, and gRPC and Envoy read no hints.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use envoy_types::{
    pb::{
        envoy::{
            config::{
                cluster::v3::{
                    Cluster, LoadBalancingPolicy,
                    cluster::{
                        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig,
                        LbPolicy,
                    },
                    load_balancing_policy,
                },
                core::v3::{
                    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus,
                    Http2ProtocolOptions, Locality, PathConfigSource, SocketAddress,
                    TransportSocket, TypedExtensionConfig, WatchedDirectory, address,
                    config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
                    transport_socket,
                },
                endpoint::v3::{
                    ClusterLoadAssignment, Endpoint as XdsEndpoint, LbEndpoint,
                    LocalityLbEndpoints, lb_endpoint::HostIdentifier,
                },
                listener::v3::{ApiListener, Listener},
                route::v3::{
                    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route,
                    route_action::{ClusterSpecifier, MaxStreamDuration},
                    route_match::PathSpecifier,
                },
            },
            extensions::{
                filters::{
                    http::router::v3::Router,
                    network::http_connection_manager::v3::{
                        HttpConnectionManager, HttpFilter, http_connection_manager::RouteSpecifier,
                        http_filter,
                    },
                },
                load_balancing_policies::{
                    client_side_weighted_round_robin::v3::ClientSideWeightedRoundRobin,
                    round_robin::v3::RoundRobin,
                },
                transport_sockets::tls::v3::{
                    CertificateProviderPluginInstance, CertificateValidationContext,
                    CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher, UpstreamTlsContext,
                    common_tls_context::{
                        CombinedCertificateValidationContext, ValidationContextType,
                    },
                    subject_alt_name_matcher::SanType,
                },
                upstreams::http::v3::{
                    HttpProtocolOptions,
                    http_protocol_options::{
                        ExplicitHttpConfig, UpstreamProtocolOptions,
                        explicit_http_config::ProtocolConfig,
                    },
                },
            },
            r#type::{
                matcher::v3::{StringMatcher, string_matcher::MatchPattern},
                v3::Percent,
            },
        },
        google::protobuf::{Any, BoolValue, Duration, UInt32Value},
    },
    util::pack_any,
};

use crate::{
    config::XdsLbPolicy,
    model::{Endpoint, ServiceKey, Snapshot},
};

/// The four resource types lb-server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// LDS: `envoy.config.listener.v3.Listener`.
    Listener,
    /// RDS: `envoy.config.route.v3.RouteConfiguration`.
    Route,
    /// CDS: `envoy.config.cluster.v3.Cluster`.
    Cluster,
    /// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    Endpoint,
}

/// The type URL of a Listener.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The type URL of a RouteConfiguration.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The type URL of a Cluster.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// The type URL of a ClusterLoadAssignment.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The filter name gRPC and Envoy expect for the router.
const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// The extension-options key for upstream HTTP protocol options.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// With `--xds-lb-policy weighted-round-robin`: how long a backend must have
/// reported load before its weight is used. Shorter than gRPC's 10 s default:
/// a backend's qps over utilization hardly depends on how many calls it got
/// yet, and a new pod (a scale-up, a rolling restart) should take its share
/// soon; until then it gets the mean weight.
pub const WRR_BLACKOUT_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a weight is used after a backend's last report, before it falls
/// back to the mean weight. Shorter than gRPC's 3 min default, so that a
/// backend whose reports stopped does not keep an old weight for long.
pub const WRR_WEIGHT_EXPIRATION_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);
/// How often clients recompute the weights (gRPC's and Envoy's default).
pub const WRR_WEIGHT_UPDATE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

impl ResourceType {
    /// Every type, in the order pending responses are sent: clusters before
    /// their endpoints, listeners before routes, as Envoy's ADS guidance asks
    /// (make before break).
    pub const SEND_ORDER: [ResourceType; 4] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => LISTENER_TYPE,
            ResourceType::Route => ROUTE_TYPE,
            ResourceType::Cluster => CLUSTER_TYPE,
            ResourceType::Endpoint => ENDPOINT_TYPE,
        }
    }

    /// The type of a type URL, if it is one we serve.
    pub fn from_type_url(type_url: &str) -> Option<Self> {
        Self::SEND_ORDER
            .into_iter()
            .find(|ty| ty.type_url() == type_url)
    }

    /// Whether a client may subscribe to every resource of this type
    /// (LDS and CDS; RDS and EDS are always named).
    pub fn allows_wildcard(self) -> bool {
        matches!(self, ResourceType::Listener | ResourceType::Cluster)
    }

    /// Whether a state-of-the-world response must list every subscribed
    /// resource, a missing one meaning deleted (LDS and CDS). For RDS and EDS a
    /// response lists only what changed.
    pub fn full_state(self) -> bool {
        self.allows_wildcard()
    }

    /// A short name for logs: `lds`, `rds`, `cds`, `eds`.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            ResourceType::Listener => 0,
            ResourceType::Route => 1,
            ResourceType::Cluster => 2,
            ResourceType::Endpoint => 3,
        }
    }
}

/// What kind of xDS client a stream serves, from the `user_agent_name` of
/// its node: the two read an `UpstreamTlsContext` differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ClientKind {
    /// Envoy (`user_agent_name: "envoy"`): certificates by SDS.
    Envoy,
    /// Proxyless gRPC (`"gRPC Python"`, `"gRPC Go"`, ...) and any other
    /// client, or one that sent no node: certificate provider instances
    /// from its bootstrap (gRFC A29), the shape other xDS libraries follow.
    #[default]
    Grpc,
}

impl ClientKind {
    /// The kind of a client whose node says `user_agent_name`.
    pub fn of(user_agent_name: &str) -> Self {
        if user_agent_name.eq_ignore_ascii_case("envoy") {
            ClientKind::Envoy
        } else {
            ClientKind::Grpc
        }
    }

    const COUNT: usize = 2;

    fn index(self) -> usize {
        match self {
            ClientKind::Envoy => 0,
            ClientKind::Grpc => 1,
        }
    }
}

/// The SDS secret an Envoy reads its client certificate and key from, in
/// `DIR/lookaside-upstream-cert.yaml` (`--xds-upstream-sds-dir`).
pub const UPSTREAM_CERT_SECRET: &str = "lookaside-upstream-cert";
/// The SDS secret an Envoy reads the backends' CA from, in
/// `DIR/lookaside-upstream-ca.yaml`.
pub const UPSTREAM_CA_SECRET: &str = "lookaside-upstream-ca";
/// The certificate provider instance (in `certificate_providers` of a gRPC
/// bootstrap, e.g. the `file_watcher` plugin) proxyless gRPC takes both its
/// certificate and the backends' CA from.
pub const UPSTREAM_CERTIFICATE_PROVIDER: &str = "lookaside-upstream";
/// The transport socket name both Envoy and gRPC require for TLS.
const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// Clusters that tell their clients to call the backends over mutual TLS
/// (`--xds-upstream-tls`), verifying each backend as `NAME.NAMESPACE.svc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The directory, on the Envoy's side, holding the SDS files of
    /// [`UPSTREAM_CERT_SECRET`] and [`UPSTREAM_CA_SECRET`]; Envoy watches it.
    pub sds_dir: String,
}

/// The most encodings [`Resources`] keeps; past it the cache starts over.
const MAX_CACHED: usize = 50_000;

/// The encodings of one resource name at one content version.
#[derive(Debug)]
struct Cached {
    /// The snapshot version for an assignment, 0 for the other types.
    version: u64,
    /// The zones with a serving endpoint at this version, sorted: a client in
    /// one of them gets an assignment of its own ([`load_assignment`]); every
    /// other client gets the one encoded under the empty zone.
    serving_zones: Vec<String>,
    /// Per zone (empty: no zone preferred), the encoded resource.
    encodings: Vec<(String, Any)>,
}

impl Cached {
    /// The zone whose encoding a client in `zone` gets: its own if it has a
    /// serving endpoint, otherwise the empty zone.
    fn effective<'a>(&self, zone: &'a str) -> &'a str {
        if self
            .serving_zones
            .binary_search_by(|z| z.as_str().cmp(zone))
            .is_ok()
        {
            zone
        } else {
            ""
        }
    }

    fn get(&self, zone: &str) -> Option<&Any> {
        self.encodings
            .iter()
            .find_map(|(z, any)| (z == zone).then_some(any))
    }
}

/// Per type and client kind (by [`Resources::slot`]): name -> its encodings.
type Cache = [HashMap<String, Cached>; 4 * ClientKind::COUNT];

/// Builds resources, holding what the configuration decides about them, and
/// keeps each one encoded for the streams that send it next: ten thousand
/// clients of one service then cost one encoding per change, not ten thousand.
/// An assignment is encoded once per zone that has its own answer (the
/// client's zone holds a serving endpoint), not once per client.
#[derive(Debug, Clone)]
pub struct Resources {
    lb_policy: XdsLbPolicy,
    upstream_tls: Option<Arc<UpstreamTls>>,
    // std Mutex: held for one lookup or insert, never across `.await`.
    cache: Arc<Mutex<Cache>>,
}

impl Resources {
    /// A builder whose clusters use `lb_policy`, and no TLS to the backends.
    pub fn new(lb_policy: XdsLbPolicy) -> Self {
        Self {
            lb_policy,
            upstream_tls: None,
            cache: Arc::default(),
        }
    }

    /// The same, with clusters that ask for mutual TLS to the backends.
    pub fn with_upstream_tls(mut self, upstream_tls: Option<UpstreamTls>) -> Self {
        self.upstream_tls = upstream_tls.map(Arc::new);
        self
    }

    /// How many encodings are cached, over every slot.
    fn cached(cache: &Cache) -> usize {
        cache
            .iter()
            .flat_map(HashMap::values)
            .map(|cached| cached.encodings.len())
            .sum()
    }

    /// Where an encoding is cached: a resource that is the same for every
    /// kind of client is cached once, under [`ClientKind::Envoy`].
    fn slot(&self, ty: ResourceType, kind: ClientKind) -> usize {
        let per_kind = ty == ResourceType::Cluster && self.upstream_tls.is_some();
        let kind = if per_kind { kind } else { ClientKind::Envoy };
        ty.index() * ClientKind::COUNT + kind.index()
    }

    /// One resource of a type, named `name`, for the service `key` at
    /// `snapshot`, as a client of `kind` in `zone` (its node's locality, empty
    /// if it named none) reads it.
    pub fn build(
        &self,
        ty: ResourceType,
        name: &str,
        key: &ServiceKey,
        snapshot: Option<&Snapshot>,
        kind: ClientKind,
        zone: &str,
    ) -> Any {
        // What the content depends on: the snapshot for an assignment, nothing
        // else for the rest. An empty assignment is rare and not cached.
        let version = match (ty, snapshot) {
            (ResourceType::Endpoint, Some(snapshot)) if snapshot.exists => snapshot.version,
            (ResourceType::Endpoint, _) => return self.encode(ty, name, key, snapshot, kind, ""),
            _ => 0,
        };
        let slot = self.slot(ty, kind);
        if let Some(cached) = self.cache.lock().unwrap()[slot].get(name)
            && cached.version == version
            && let Some(any) = cached.get(cached.effective(zone))
        {
            return any.clone();
        }
        let serving_zones = match (ty, snapshot) {
            (ResourceType::Endpoint, Some(snapshot)) => serving_zones(snapshot),
            _ => Vec::new(),
        };
        let zone = if serving_zones.iter().any(|z| z == zone) {
            zone
        } else {
            ""
        };
        let any = self.encode(ty, name, key, snapshot, kind, zone);
        let mut cache = self.cache.lock().unwrap();
        if Self::cached(&cache) >= MAX_CACHED {
            cache.iter_mut().for_each(HashMap::clear);
        }
        let cached = cache[slot]
            .entry(name.to_owned())
            .or_insert_with(|| Cached {
                version,
                serving_zones: Vec::new(),
                encodings: Vec::new(),
            });
        if cached.version != version {
            cached.version = version;
            cached.encodings.clear();
        }
        cached.serving_zones = serving_zones;
        if cached.get(zone).is_none() {
            cached.encodings.push((zone.to_owned(), any.clone()));
        }
        any
    }

    fn encode(
        &self,
        ty: ResourceType,
        name: &str,
        key: &ServiceKey,
        snapshot: Option<&Snapshot>,
        kind: ClientKind,
        zone: &str,
    ) -> Any {
        match ty {
            ResourceType::Listener => pack_any(listener(name, key)),
            ResourceType::Route => pack_any(route_configuration(name, key)),
            ResourceType::Cluster => {
                let tls = self
                    .upstream_tls
                    .as_deref()
                    .map(|tls| upstream_tls_context(key, tls, kind));
                pack_any(cluster(name, key, self.lb_policy, tls))
            }
            ResourceType::Endpoint => pack_any(load_assignment(name, snapshot, zone)),
        }
    }
}

/// The domains a service's virtual host matches: the name asked for, the
/// short and cluster-local host names with and without the port, and last
/// `*`: the route configuration belongs to one target already, and an Envoy
/// sidecar listener that takes it over RDS sees whatever authority the app
/// sends (`localhost:15001`).
fn domains(name: &str, key: &ServiceKey) -> Vec<String> {
    let short = format!("{}.{}", key.name(), key.namespace());
    let long = format!("{short}.svc.cluster.local");
    let port = key.port();
    let mut domains = vec![name.to_owned()];
    for domain in [
        format!("{short}:{port}"),
        short.clone(),
        format!("{long}:{port}"),
        long,
        "*".to_owned(),
    ] {
        if !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    domains
}

/// One virtual host for the service with one default route to its cluster.
/// No route timeout (Envoy's default of 15 s would cut long-lived gRPC
/// streams); the client's `grpc-timeout` is the deadline, in Envoy and gRPC.
fn virtual_host(name: &str, key: &ServiceKey) -> VirtualHost {
    VirtualHost {
        name: key.to_string(),
        domains: domains(name, key),
        routes: vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix(String::new())),
                ..RouteMatch::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(key.to_string())),
                timeout: Some(Duration::default()),
                max_stream_duration: Some(MaxStreamDuration {
                    grpc_timeout_header_max: Some(Duration::default()),
                    ..MaxStreamDuration::default()
                }),
                ..RouteAction::default()
            })),
            ..Route::default()
        }],
        ..VirtualHost::default()
    }
}

/// The RouteConfiguration named `name` (RDS).
pub fn route_configuration(name: &str, key: &ServiceKey) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![virtual_host(name, key)],
        ..RouteConfiguration::default()
    }
}

/// The Listener named `name` (LDS): an `api_listener` holding an
/// HttpConnectionManager with the routes inline and the router filter last,
/// the shape proxyless gRPC requires.
pub fn listener(name: &str, key: &ServiceKey) -> Listener {
    let manager = HttpConnectionManager {
        stat_prefix: "lookaside".to_owned(),
        route_specifier: Some(RouteSpecifier::RouteConfig(route_configuration(name, key))),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..HttpFilter::default()
        }],
        ..HttpConnectionManager::default()
    };
    Listener {
        name: name.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Listener::default()
    }
}

/// The Cluster named `name` (CDS): endpoints over ADS (EDS, service name the
/// canonical target), the configured policy, HTTP/2 upstream (Envoy needs it
/// for gRPC; proxyless gRPC ignores it), and no panic mode, so that draining
/// endpoints never get new calls even when most of them drain. With `tls`,
/// its transport socket is TLS with that context.
///
/// [`XdsLbPolicy::WeightedRoundRobin`] has no `lb_policy` value: it goes in
/// `load_balancing_policy` ([`weighted_round_robin`]), which gRPC and Envoy
/// read in preference to `lb_policy`; `lb_policy` stays `ROUND_ROBIN` for a
/// client that reads only that.
pub fn cluster(
    name: &str,
    key: &ServiceKey,
    policy: XdsLbPolicy,
    tls: Option<UpstreamTlsContext>,
) -> Cluster {
    let lb_policy = match policy {
        XdsLbPolicy::RoundRobin | XdsLbPolicy::WeightedRoundRobin => LbPolicy::RoundRobin,
        XdsLbPolicy::LeastRequest => LbPolicy::LeastRequest,
        XdsLbPolicy::RingHash => LbPolicy::RingHash,
        XdsLbPolicy::Random => LbPolicy::Random,
    };
    let http2 = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..HttpProtocolOptions::default()
    };
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..ConfigSource::default()
            }),
            service_name: key.to_string(),
        }),
        lb_policy: lb_policy as i32,
        load_balancing_policy: (policy == XdsLbPolicy::WeightedRoundRobin)
            .then(weighted_round_robin),
        common_lb_config: Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..CommonLbConfig::default()
        }),
        typed_extension_protocol_options: [(HTTP_PROTOCOL_OPTIONS.to_owned(), pack_any(http2))]
            .into(),
        transport_socket: tls.map(|tls| TransportSocket {
            name: TLS_TRANSPORT_SOCKET.to_owned(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
        }),
        ..Cluster::default()
    }
}

/// The `load_balancing_policy` of [`XdsLbPolicy::WeightedRoundRobin`]:
/// `client_side_weighted_round_robin` with per-call load reports (the
/// `endpoint-load-metrics-bin` trailer, no extra stream per backend) and the
/// `WRR_*` periods, then plain round robin for a client that does not know it
/// (a client takes the first policy of the list it supports). Weights then
/// come from load alone: both policies ignore endpoint weights.
pub fn weighted_round_robin() -> LoadBalancingPolicy {
    let duration = |d: std::time::Duration| Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    };
    let wrr = ClientSideWeightedRoundRobin {
        enable_oob_load_report: Some(BoolValue { value: false }),
        blackout_period: Some(duration(WRR_BLACKOUT_PERIOD)),
        weight_expiration_period: Some(duration(WRR_WEIGHT_EXPIRATION_PERIOD)),
        weight_update_period: Some(duration(WRR_WEIGHT_UPDATE_PERIOD)),
        ..ClientSideWeightedRoundRobin::default()
    };
    let policy = |name: &str, config: Any| load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(config),
        }),
    };
    LoadBalancingPolicy {
        policies: vec![
            policy(
                "envoy.load_balancing_policies.client_side_weighted_round_robin",
                pack_any(wrr),
            ),
            policy(
                "envoy.load_balancing_policies.round_robin",
                pack_any(RoundRobin::default()),
            ),
        ],
    }
}

/// The DNS name a backend of `key` is verified as, and sent as SNI:
/// `NAME.NAMESPACE.svc`, the name pods' certificates carry (not their IPs).
pub fn backend_server_name(key: &ServiceKey) -> String {
    format!("{}.{}.svc", key.name(), key.namespace())
}

/// The `UpstreamTlsContext` of the service `key`'s Cluster for a client of
/// `kind`: mutual TLS, the backend verified as [`backend_server_name`].
///
/// - Envoy reads its certificate ([`UPSTREAM_CERT_SECRET`]) and the CA
///   ([`UPSTREAM_CA_SECRET`]) by SDS from files in `tls.sds_dir`, which it
///   watches, so a Secret's rotation is picked up; the name is matched with
///   `match_typed_subject_alt_names` (DNS). ALPN `h2`.
/// - gRPC rejects SDS (`tls_certificate_sds_secret_configs`,
///   `validation_context_sds_secret_config`: "feature unsupported") and takes
///   both from [`UPSTREAM_CERTIFICATE_PROVIDER`] in its bootstrap
///   (`tls_certificate_provider_instance`,
///   `validation_context.ca_certificate_provider_instance`, gRFC A29); it
///   reads only the older `match_subject_alt_names`, which Envoy ignores when
///   the typed list is set, so each kind gets the one it reads.
pub fn upstream_tls_context(
    key: &ServiceKey,
    tls: &UpstreamTls,
    kind: ClientKind,
) -> UpstreamTlsContext {
    let server_name = backend_server_name(key);
    let common = match kind {
        ClientKind::Envoy => envoy_tls(&server_name, &tls.sds_dir),
        ClientKind::Grpc => grpc_tls(&server_name),
    };
    UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: server_name,
        ..UpstreamTlsContext::default()
    }
}

fn envoy_tls(server_name: &str, sds_dir: &str) -> CommonTlsContext {
    let sds = |name: &str| SdsSecretConfig {
        name: name.to_owned(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(ConfigSourceSpecifier::PathConfigSource(
                PathConfigSource {
                    path: format!("{}/{name}.yaml", sds_dir.trim_end_matches('/')),
                    watched_directory: Some(WatchedDirectory {
                        path: sds_dir.to_owned(),
                        ..WatchedDirectory::default()
                    }),
                    ..PathConfigSource::default()
                },
            )),
            ..ConfigSource::default()
        }),
    };
    CommonTlsContext {
        alpn_protocols: vec!["h2".to_owned()],
        tls_certificate_sds_secret_configs: vec![sds(UPSTREAM_CERT_SECRET)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                        san_type: SanType::Dns as i32,
                        matcher: Some(exact(server_name)),
                        ..SubjectAltNameMatcher::default()
                    }],
                    ..CertificateValidationContext::default()
                }),
                validation_context_sds_secret_config: Some(sds(UPSTREAM_CA_SECRET)),
                ..CombinedCertificateValidationContext::default()
            },
        )),
        ..CommonTlsContext::default()
    }
}

// `match_subject_alt_names` is deprecated in Envoy's API, but it is the only
// SAN list gRPC reads (grpc/src/core/xds/grpc/xds_common_types_parser.cc).
#[allow(deprecated)]
fn grpc_tls(server_name: &str) -> CommonTlsContext {
    let provider = || CertificateProviderPluginInstance {
        instance_name: UPSTREAM_CERTIFICATE_PROVIDER.to_owned(),
        certificate_name: String::new(),
    };
    CommonTlsContext {
        tls_certificate_provider_instance: Some(provider()),
        validation_context_type: Some(ValidationContextType::ValidationContext(
            CertificateValidationContext {
                ca_certificate_provider_instance: Some(provider()),
                match_subject_alt_names: vec![exact(server_name)],
                ..CertificateValidationContext::default()
            },
        )),
        ..CommonTlsContext::default()
    }
}

fn exact(text: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(text.to_owned())),
        ..StringMatcher::default()
    }
}

/// The zones with at least one serving (not draining) endpoint, sorted.
fn serving_zones(snapshot: &Snapshot) -> Vec<String> {
    let mut zones: Vec<String> = Vec::new();
    if snapshot.exists {
        for endpoint in snapshot.endpoints.iter().filter(|e| !e.draining) {
            if let Err(at) = zones.binary_search_by(|z| z.as_str().cmp(&endpoint.zone)) {
                zones.insert(at, endpoint.zone.to_string());
            }
        }
    }
    zones
}

/// The ClusterLoadAssignment named `name` (EDS) for a client in `zone`: one
/// locality per zone (zones in order, the empty zone for endpoints without
/// one), weighted by the sum of its serving endpoints' weights (at least 1,
/// as the API requires); each endpoint with its weight and HEALTHY, or
/// DRAINING when it drains. A service that does not exist has no endpoints.
///
/// Priorities: when `zone` is not empty and has a serving endpoint, its
/// locality is priority 0 and every other locality (endpoints without a zone
/// included) priority 1, so the client keeps its calls in its zone and fails
/// over by priority. Otherwise (no zone, or a zone with nothing serving) every
/// locality is priority 0, as for a client that named no zone: priorities
/// must be contiguous from 0 (gRPC rejects a sparse list), and a zone with
/// only draining endpoints has nothing to prefer.
pub fn load_assignment(
    name: &str,
    snapshot: Option<&Snapshot>,
    zone: &str,
) -> ClusterLoadAssignment {
    let mut zones: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
    for endpoint in snapshot
        .filter(|s| s.exists)
        .map(|s| &s.endpoints[..])
        .unwrap_or_default()
    {
        zones.entry(&*endpoint.zone).or_default().push(endpoint);
    }
    let local = !zone.is_empty()
        && zones
            .get(zone)
            .is_some_and(|endpoints| endpoints.iter().any(|e| !e.draining));
    let endpoints = zones
        .into_iter()
        .map(|(locality_zone, endpoints)| {
            let serving_weight = endpoints
                .iter()
                .filter(|e| !e.draining)
                .fold(0u32, |sum, e| sum.saturating_add(e.weight));
            LocalityLbEndpoints {
                locality: Some(Locality {
                    zone: locality_zone.to_owned(),
                    ..Locality::default()
                }),
                lb_endpoints: endpoints.into_iter().map(lb_endpoint).collect(),
                load_balancing_weight: Some(UInt32Value {
                    value: serving_weight.max(1),
                }),
                priority: u32::from(local && locality_zone != zone),
                ..LocalityLbEndpoints::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints,
        ..ClusterLoadAssignment::default()
    }
}

fn lb_endpoint(endpoint: &Endpoint) -> LbEndpoint {
    let health = if endpoint.draining {
        HealthStatus::Draining
    } else {
        HealthStatus::Healthy
    };
    let address = match endpoint.address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string(),
    };
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(XdsEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address,
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(endpoint.port))),
                    ..SocketAddress::default()
                })),
            }),
            hostname: endpoint.pod.to_string(),
            ..XdsEndpoint::default()
        })),
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value {
            value: endpoint.weight.max(1),
        }),
        ..LbEndpoint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_target;
    use prost::{Message, Name};

    const GREETER_KEY: &str = "greeter.default:grpc";

    fn key() -> ServiceKey {
        parse_target(GREETER_KEY).unwrap()
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint::new(format!("10.0.0.{last}").parse().unwrap(), 8080)
    }

    fn snapshot(endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            version: 7,
            exists: true,
            endpoints: crate::model::normalize(endpoints).into(),
            ..Snapshot::unknown()
        }
    }

    fn socket(lb: &LbEndpoint) -> (String, u32) {
        let Some(HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
            panic!("endpoint expected");
        };
        let Some(address::Address::SocketAddress(socket)) =
            &endpoint.address.as_ref().unwrap().address
        else {
            panic!("socket address expected");
        };
        let Some(PortSpecifier::PortValue(port)) = socket.port_specifier else {
            panic!("port expected");
        };
        (socket.address.clone(), port)
    }

    #[test]
    fn type_urls_match_the_generated_messages() {
        assert_eq!(LISTENER_TYPE, Listener::type_url());
        assert_eq!(ROUTE_TYPE, RouteConfiguration::type_url());
        assert_eq!(CLUSTER_TYPE, Cluster::type_url());
        assert_eq!(ENDPOINT_TYPE, ClusterLoadAssignment::type_url());
        for ty in ResourceType::SEND_ORDER {
            assert_eq!(ResourceType::from_type_url(ty.type_url()), Some(ty));
            assert_eq!(
                ResourceType::SEND_ORDER[..]
                    .iter()
                    .filter(|t| t.index() == ty.index())
                    .count(),
                1
            );
        }
        assert_eq!(
            ResourceType::from_type_url(
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            ),
            None
        );
    }

    #[test]
    fn one_locality_per_zone_weighted_by_its_serving_endpoints() {
        let snapshot = snapshot(vec![
            ep(1).zone("zone-b").weight(3),
            ep(2).zone("zone-a"),
            ep(3).zone("zone-b").weight(2),
            ep(4).zone("zone-b").weight(5).draining(),
            ep(5),
        ]);
        let cla = load_assignment("greeter.default:grpc", Some(&snapshot), "");
        assert_eq!(cla.cluster_name, "greeter.default:grpc");
        let zones: Vec<(&str, u32, usize)> = cla
            .endpoints
            .iter()
            .map(|l| {
                (
                    l.locality.as_ref().unwrap().zone.as_str(),
                    l.load_balancing_weight.unwrap().value,
                    l.lb_endpoints.len(),
                )
            })
            .collect();
        assert_eq!(
            zones,
            [("", 1, 1), ("zone-a", 1, 1), ("zone-b", 5, 3)],
            "zone-b weighs 3 + 2; the draining endpoint's 5 does not count"
        );
        let zone_b = &cla.endpoints[2].lb_endpoints;
        let weights: Vec<u32> = zone_b
            .iter()
            .map(|e| e.load_balancing_weight.unwrap().value)
            .collect();
        assert_eq!(weights, [3, 2, 5]);
        let health: Vec<HealthStatus> = zone_b
            .iter()
            .map(|e| HealthStatus::try_from(e.health_status).unwrap())
            .collect();
        assert_eq!(
            health,
            [
                HealthStatus::Healthy,
                HealthStatus::Healthy,
                HealthStatus::Draining
            ]
        );
        assert_eq!(socket(&zone_b[0]), ("10.0.0.1".to_owned(), 8080));
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
    }

    #[test]
    fn an_all_draining_zone_keeps_a_valid_weight_and_ipv6_has_no_brackets() {
        let v6 = Endpoint::new("fd00::1".parse().unwrap(), 50051)
            .zone("z")
            .pod("greeter-0")
            .draining();
        let cla = load_assignment("x", Some(&snapshot(vec![v6])), "");
        let locality = &cla.endpoints[0];
        assert_eq!(locality.load_balancing_weight.unwrap().value, 1);
        assert_eq!(
            socket(&locality.lb_endpoints[0]),
            ("fd00::1".to_owned(), 50051)
        );
        let Some(HostIdentifier::Endpoint(endpoint)) = &locality.lb_endpoints[0].host_identifier
        else {
            unreachable!()
        };
        assert_eq!(endpoint.hostname, "greeter-0");
    }

    #[test]
    fn a_missing_or_removed_service_has_an_empty_assignment() {
        assert!(load_assignment("gone.ns:80", None, "").endpoints.is_empty());
        let removed = Snapshot {
            exists: false,
            ..snapshot(vec![ep(1)])
        };
        let cla = load_assignment("gone.ns:80", Some(&removed), "");
        assert_eq!(cla.cluster_name, "gone.ns:80");
        assert!(cla.endpoints.is_empty());
    }

    #[test]
    fn listener_is_an_api_listener_routing_everything_to_the_cluster() {
        let asked = "greeter.default.svc.cluster.local:grpc";
        let listener = listener(asked, &key());
        assert_eq!(listener.name, asked);
        let any = listener.api_listener.unwrap().api_listener.unwrap();
        assert_eq!(any.type_url, HttpConnectionManager::type_url());
        let manager = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let last = manager.http_filters.last().unwrap();
        assert_eq!(last.name, ROUTER_FILTER);
        let Some(http_filter::ConfigType::TypedConfig(router)) = &last.config_type else {
            panic!("typed router config expected");
        };
        assert_eq!(router.type_url, Router::type_url());
        let Some(RouteSpecifier::RouteConfig(routes)) = manager.route_specifier else {
            panic!("inline routes expected");
        };
        let host = &routes.virtual_hosts[0];
        assert_eq!(
            host.domains,
            [
                asked,
                "greeter.default:grpc",
                "greeter.default",
                "greeter.default.svc.cluster.local",
                "*"
            ]
        );
        let route = &host.routes[0];
        assert_eq!(
            route.r#match.as_ref().unwrap().path_specifier,
            Some(PathSpecifier::Prefix(String::new()))
        );
        let Some(route::Action::Route(action)) = &route.action else {
            panic!("route action expected");
        };
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster("greeter.default:grpc".into())),
            "routes point at the canonical cluster name"
        );
        assert_eq!(action.timeout, Some(Duration::default()), "no 15 s cut-off");
        let max = action.max_stream_duration.as_ref().unwrap();
        assert_eq!(max.grpc_timeout_header_max, Some(Duration::default()));
    }

    #[test]
    fn cluster_is_eds_over_ads_with_the_configured_policy_and_http2() {
        let cluster = cluster("greeter.default:grpc", &key(), XdsLbPolicy::RingHash, None);
        assert_eq!(cluster.name, "greeter.default:grpc");
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        );
        let eds = cluster.eds_cluster_config.unwrap();
        assert_eq!(eds.service_name, "greeter.default:grpc");
        assert_eq!(
            eds.eds_config.unwrap().config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {}))
        );
        assert_eq!(cluster.lb_policy, LbPolicy::RingHash as i32);
        let options = &cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS];
        let options = HttpProtocolOptions::decode(options.value.as_slice()).unwrap();
        assert!(matches!(
            options.upstream_protocol_options,
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(_))
                }
            ))
        ));
        let round_robin = super::cluster("a.b:80", &key(), XdsLbPolicy::RoundRobin, None);
        assert_eq!(round_robin.lb_policy, LbPolicy::RoundRobin as i32);
        assert_eq!(cluster.transport_socket, None, "plaintext to the backends");
    }

    #[test]
    fn build_reuses_an_encoding_until_the_snapshot_changes() {
        let resources = Resources::new(XdsLbPolicy::RoundRobin);
        let name = "greeter.default:grpc";
        let count = |any: &Any| {
            let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
            cla.endpoints
                .iter()
                .map(|l| l.lb_endpoints.len())
                .sum::<usize>()
        };
        let build = |resources: &Resources, name: &str, snapshot: &Snapshot| {
            resources.build(
                ResourceType::Endpoint,
                name,
                &key(),
                Some(snapshot),
                ClientKind::Grpc,
                "",
            )
        };
        let first = snapshot(vec![ep(1)]);
        let encoded = build(&resources, name, &first);
        assert_eq!(count(&encoded), 1);
        // The store never gives one version two contents; this snapshot does,
        // so that a reused encoding (one endpoint) shows apart from a new one.
        let same_version = Snapshot {
            version: first.version,
            ..snapshot(vec![ep(1), ep(2)])
        };
        assert_eq!(
            build(&resources, name, &same_version),
            encoded,
            "the encoding of a version is reused"
        );
        assert_eq!(
            build(&resources.clone(), name, &same_version),
            encoded,
            "by every clone (every stream)"
        );
        assert_eq!(
            count(&build(&resources, "x.y:1", &same_version)),
            2,
            "per name"
        );
        let second = Snapshot {
            version: first.version + 1,
            ..snapshot(vec![ep(1), ep(2)])
        };
        assert_eq!(
            count(&build(&resources, name, &second)),
            2,
            "a new version is built anew"
        );
        let gone = Snapshot {
            exists: false,
            version: second.version + 1,
            ..Snapshot::unknown()
        };
        assert_eq!(count(&build(&resources, name, &gone)), 0);
        let second_again = Snapshot {
            version: second.version,
            ..snapshot(vec![ep(3)])
        };
        assert_eq!(
            count(&build(&resources, name, &second_again)),
            2,
            "an empty assignment in between leaves the cached one"
        );
    }

    /// (zone, priority, endpoints) per locality.
    fn priorities(cla: &ClusterLoadAssignment) -> Vec<(&str, u32, usize)> {
        cla.endpoints
            .iter()
            .map(|l| {
                (
                    l.locality.as_ref().unwrap().zone.as_str(),
                    l.priority,
                    l.lb_endpoints.len(),
                )
            })
            .collect()
    }

    #[test]
    fn a_client_zone_with_serving_endpoints_is_priority_0_and_the_rest_priority_1() {
        let zones = snapshot(vec![
            ep(1).zone("zone-a"),
            ep(2).zone("zone-b"),
            ep(3).zone("zone-b"),
            ep(4),
            ep(5).zone("zone-c").draining(),
        ]);
        let cla = load_assignment("x", Some(&zones), "zone-b");
        assert_eq!(
            priorities(&cla),
            [
                ("", 1, 1),
                ("zone-a", 1, 1),
                ("zone-b", 0, 2),
                ("zone-c", 1, 1)
            ],
            "endpoints without a zone are another zone's to a zoned client"
        );
        for zone in ["", "zone-x", "zone-c"] {
            let cla = load_assignment("x", Some(&zones), zone);
            assert!(
                cla.endpoints.iter().all(|l| l.priority == 0),
                "no zone, an unknown zone, or one with nothing serving:                  no preference, and no sparse priorities ({zone:?})"
            );
        }
        // Endpoints without a zone are not a zone a client can name.
        let zoneless = snapshot(vec![ep(1), ep(2).zone("zone-a")]);
        assert_eq!(
            priorities(&load_assignment("x", Some(&zoneless), "zone-a")),
            [("", 1, 1), ("zone-a", 0, 1)]
        );
    }

    #[test]
    fn an_assignment_is_encoded_once_per_zone_with_its_own_answer() {
        let resources = Resources::new(XdsLbPolicy::RoundRobin);
        let name = "greeter.default:grpc";
        let build = |snapshot: &Snapshot, zone: &str| {
            let any = resources.build(
                ResourceType::Endpoint,
                name,
                &key(),
                Some(snapshot),
                ClientKind::Grpc,
                zone,
            );
            ClusterLoadAssignment::decode(any.value.as_slice()).unwrap()
        };
        let cached = || Resources::cached(&resources.cache.lock().unwrap());
        let first = snapshot(vec![ep(1).zone("zone-a"), ep(2).zone("zone-b")]);
        let local_to = |cla: &ClusterLoadAssignment| -> Vec<String> {
            cla.endpoints
                .iter()
                .filter(|l| l.priority == 0)
                .map(|l| l.locality.as_ref().unwrap().zone.clone())
                .collect()
        };
        assert_eq!(local_to(&build(&first, "zone-a")), ["zone-a"]);
        assert_eq!(local_to(&build(&first, "zone-b")), ["zone-b"]);
        assert_eq!(local_to(&build(&first, "")), ["zone-a", "zone-b"]);
        assert_eq!(cached(), 3, "one encoding per zone and one for the rest");
        // Clients in zones without endpoints share the answer of no zone.
        for zone in ["zone-x", "zone-y", ""] {
            assert_eq!(local_to(&build(&first, zone)), ["zone-a", "zone-b"]);
        }
        for _ in 0..3 {
            build(&first, "zone-a");
        }
        assert_eq!(cached(), 3, "every client of a zone shares its encoding");
        // A new version starts over; zone-a now only drains, so its clients
        // get the shared answer.
        let second = Snapshot {
            version: first.version + 1,
            ..snapshot(vec![ep(1).zone("zone-a").draining(), ep(2).zone("zone-b")])
        };
        assert_eq!(local_to(&build(&second, "zone-a")), ["zone-a", "zone-b"]);
        assert_eq!(local_to(&build(&second, "")), ["zone-a", "zone-b"]);
        assert_eq!(cached(), 1, "the old version's encodings are gone");
        assert_eq!(local_to(&build(&second, "zone-b")), ["zone-b"]);
        assert_eq!(cached(), 2);
    }

    #[test]
    fn weighted_round_robin_is_a_load_balancing_policy_with_a_round_robin_fallback() {
        let cluster = cluster(GREETER_KEY, &key(), XdsLbPolicy::WeightedRoundRobin, None);
        assert_eq!(
            cluster.lb_policy,
            LbPolicy::RoundRobin as i32,
            "for clients that read only lb_policy"
        );
        let policies = cluster.load_balancing_policy.unwrap().policies;
        let configs: Vec<&Any> = policies
            .iter()
            .map(|p| {
                p.typed_extension_config
                    .as_ref()
                    .unwrap()
                    .typed_config
                    .as_ref()
                    .unwrap()
            })
            .collect();
        let [wrr, fallback] = configs.as_slice() else {
            panic!("two policies expected: {policies:?}");
        };
        assert_eq!(wrr.type_url, ClientSideWeightedRoundRobin::type_url());
        assert_eq!(fallback.type_url, RoundRobin::type_url());
        let wrr = ClientSideWeightedRoundRobin::decode(wrr.value.as_slice()).unwrap();
        assert_eq!(wrr.enable_oob_load_report, Some(BoolValue { value: false }));
        let seconds = |d: Option<Duration>| d.map(|d| (d.seconds, d.nanos));
        assert_eq!(seconds(wrr.blackout_period), Some((2, 0)));
        assert_eq!(seconds(wrr.weight_expiration_period), Some((30, 0)));
        assert_eq!(seconds(wrr.weight_update_period), Some((1, 0)));
        for other in [
            XdsLbPolicy::RoundRobin,
            XdsLbPolicy::LeastRequest,
            XdsLbPolicy::RingHash,
            XdsLbPolicy::Random,
        ] {
            let cluster = super::cluster(GREETER_KEY, &key(), other, None);
            assert_eq!(cluster.load_balancing_policy, None, "{other:?}");
        }
    }

    #[test]
    fn build_packs_each_type_under_its_url() {
        let resources = Resources::new(XdsLbPolicy::RoundRobin);
        let snapshot = snapshot(vec![ep(1)]);
        for ty in ResourceType::SEND_ORDER {
            let any = resources.build(
                ty,
                "greeter.default:grpc",
                &key(),
                Some(&snapshot),
                ClientKind::Grpc,
                "",
            );
            assert_eq!(any.type_url, ty.type_url());
        }
    }

    fn tls() -> UpstreamTls {
        UpstreamTls {
            sds_dir: "/etc/envoy/sds".into(),
        }
    }

    /// The UpstreamTlsContext of a Cluster's TLS transport socket.
    fn tls_context(cluster: &Cluster) -> UpstreamTlsContext {
        let socket = cluster
            .transport_socket
            .as_ref()
            .expect("a transport socket");
        assert_eq!(socket.name, "envoy.transport_sockets.tls");
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            panic!("typed config expected");
        };
        assert_eq!(any.type_url, UpstreamTlsContext::type_url());
        UpstreamTlsContext::decode(any.value.as_slice()).unwrap()
    }

    fn built_cluster(resources: &Resources, kind: ClientKind) -> Cluster {
        let any = resources.build(
            ResourceType::Cluster,
            "greeter.default:grpc",
            &key(),
            Some(&snapshot(vec![ep(1)])),
            kind,
            "",
        );
        Cluster::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn client_kind_comes_from_the_user_agent() {
        assert_eq!(ClientKind::of("envoy"), ClientKind::Envoy);
        assert_eq!(ClientKind::of("Envoy"), ClientKind::Envoy);
        for grpc in ["gRPC Python", "gRPC Go", "grpc-java", "", "envoy-like"] {
            assert_eq!(ClientKind::of(grpc), ClientKind::Grpc, "{grpc:?}");
        }
    }

    #[test]
    fn envoy_gets_mtls_with_sds_files_and_the_service_name() {
        let resources = Resources::new(XdsLbPolicy::RoundRobin).with_upstream_tls(Some(tls()));
        let cluster = built_cluster(&resources, ClientKind::Envoy);
        assert_eq!(
            cluster.eds_cluster_config.as_ref().unwrap().service_name,
            GREETER_KEY
        );
        let context = tls_context(&cluster);
        assert_eq!(context.sni, "greeter.default.svc");
        let common = context.common_tls_context.unwrap();
        assert_eq!(common.alpn_protocols, ["h2"]);
        assert_eq!(common.tls_certificate_provider_instance, None);
        let sds_path = |config: &SdsSecretConfig| {
            let source = config.sds_config.as_ref().unwrap();
            assert_eq!(source.resource_api_version, ApiVersion::V3 as i32);
            let Some(ConfigSourceSpecifier::PathConfigSource(path)) =
                &source.config_source_specifier
            else {
                panic!("a path config source expected: {source:?}");
            };
            let watched = path.watched_directory.as_ref().unwrap();
            (config.name.clone(), path.path.clone(), watched.path.clone())
        };
        let [cert] = common.tls_certificate_sds_secret_configs.as_slice() else {
            panic!("one certificate expected");
        };
        assert_eq!(
            sds_path(cert),
            (
                "lookaside-upstream-cert".into(),
                "/etc/envoy/sds/lookaside-upstream-cert.yaml".into(),
                "/etc/envoy/sds".into()
            )
        );
        let Some(ValidationContextType::CombinedValidationContext(combined)) =
            common.validation_context_type
        else {
            panic!("a combined validation context expected");
        };
        assert_eq!(
            sds_path(
                combined
                    .validation_context_sds_secret_config
                    .as_ref()
                    .unwrap()
            ),
            (
                "lookaside-upstream-ca".into(),
                "/etc/envoy/sds/lookaside-upstream-ca.yaml".into(),
                "/etc/envoy/sds".into()
            )
        );
        let validation = combined.default_validation_context.unwrap();
        assert_eq!(
            validation.match_typed_subject_alt_names,
            [SubjectAltNameMatcher {
                san_type: SanType::Dns as i32,
                matcher: Some(exact("greeter.default.svc")),
                ..SubjectAltNameMatcher::default()
            }]
        );
        assert_eq!(validation.ca_certificate_provider_instance, None);
    }

    #[test]
    #[allow(deprecated)] // the SAN list gRPC reads
    fn grpc_gets_mtls_from_its_certificate_provider_and_the_service_name() {
        let resources = Resources::new(XdsLbPolicy::RoundRobin).with_upstream_tls(Some(tls()));
        let context = tls_context(&built_cluster(&resources, ClientKind::Grpc));
        assert_eq!(context.sni, "greeter.default.svc");
        let common = context.common_tls_context.unwrap();
        let provider = CertificateProviderPluginInstance {
            instance_name: "lookaside-upstream".into(),
            certificate_name: String::new(),
        };
        assert_eq!(
            common.tls_certificate_provider_instance.as_ref(),
            Some(&provider)
        );
        assert!(
            common.tls_certificate_sds_secret_configs.is_empty(),
            "gRPC rejects SDS"
        );
        let Some(ValidationContextType::ValidationContext(validation)) =
            common.validation_context_type
        else {
            panic!("a validation context expected");
        };
        assert_eq!(validation.ca_certificate_provider_instance, Some(provider));
        assert_eq!(
            validation.match_subject_alt_names,
            [exact("greeter.default.svc")]
        );
        assert!(validation.match_typed_subject_alt_names.is_empty());
    }

    #[test]
    fn without_upstream_tls_every_kind_shares_one_plaintext_cluster() {
        let plain = Resources::new(XdsLbPolicy::RoundRobin);
        let envoy = built_cluster(&plain, ClientKind::Envoy);
        assert_eq!(envoy.transport_socket, None);
        assert_eq!(envoy, built_cluster(&plain, ClientKind::Grpc));
        assert_eq!(
            envoy,
            cluster(GREETER_KEY, &key(), XdsLbPolicy::RoundRobin, None),
            "the flag off changes nothing in the Cluster"
        );
        assert_eq!(
            Resources::cached(&plain.cache.lock().unwrap()),
            1,
            "encoded once for both kinds"
        );
    }

    #[test]
    fn with_upstream_tls_each_kind_is_encoded_once() {
        let resources = Resources::new(XdsLbPolicy::RoundRobin).with_upstream_tls(Some(tls()));
        let envoy = resources.build(
            ResourceType::Cluster,
            GREETER_KEY,
            &key(),
            None,
            ClientKind::Envoy,
            "",
        );
        let grpc = resources.build(
            ResourceType::Cluster,
            GREETER_KEY,
            &key(),
            None,
            ClientKind::Grpc,
            "",
        );
        assert_ne!(envoy, grpc);
        let clone = resources.clone();
        for _ in 0..3 {
            assert_eq!(
                clone.build(
                    ResourceType::Cluster,
                    GREETER_KEY,
                    &key(),
                    None,
                    ClientKind::Envoy,
                    ""
                ),
                envoy
            );
            assert_eq!(
                clone.build(
                    ResourceType::Cluster,
                    GREETER_KEY,
                    &key(),
                    None,
                    ClientKind::Grpc,
                    ""
                ),
                grpc
            );
        }
        assert_eq!(
            Resources::cached(&resources.cache.lock().unwrap()),
            2,
            "one encoding per kind, shared by every stream"
        );
        // Listeners do not depend on the kind: one encoding.
        let listener =
            |kind| resources.build(ResourceType::Listener, GREETER_KEY, &key(), None, kind, "");
        assert_eq!(listener(ClientKind::Envoy), listener(ClientKind::Grpc));
        assert_eq!(Resources::cached(&resources.cache.lock().unwrap()), 3);
    }
}
