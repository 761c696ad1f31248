//! EndpointSlice fixtures: builders for the slices the source reads, the one
//! set shared by this module's unit tests and by the Kubernetes API stand-in
//! of the end-to-end tests (`lookaside-tests`, through the `test-fixtures`
//! feature; that crate depends on lb-server, so the fixtures live here).
//!
//! ```
//! use lb_server::source::kube::fixtures::{ep, slice};
//! let slice = slice("default", "greeter-a", "greeter")
//!     .port("grpc", 50051)
//!     .endpoint(ep("10.0.0.1").zone("a").pod("greeter-1"))
//!     .endpoint(ep("10.0.0.2").draining())
//!     .build();
//! assert_eq!(slice.endpoints.len(), 2);
//! ```

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::SERVICE_NAME_LABEL;

/// Starts an EndpointSlice fixture: IPv4, labelled
/// `kubernetes.io/service-name=SERVICE` and managed by the EndpointSlice
/// controller, as Kubernetes writes them; no ports and no endpoints yet.
pub fn slice(namespace: &str, name: &str, service: &str) -> SliceBuilder {
    SliceBuilder(EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: Vec::new(),
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.into(), service.into()),
                (
                    "endpointslice.kubernetes.io/managed-by".into(),
                    "endpointslice-controller.k8s.io".into(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        ports: None,
    })
}

/// Builds an EndpointSlice fixture; see [`slice()`].
#[derive(Debug, Clone)]
pub struct SliceBuilder(EndpointSlice);

impl SliceBuilder {
    /// Sets `addressType` (`IPv4`, `IPv6`, `FQDN`).
    pub fn address_type(mut self, address_type: &str) -> Self {
        self.0.address_type = address_type.into();
        self
    }

    /// Makes it an IPv6 slice.
    pub fn ipv6(self) -> Self {
        self.address_type("IPv6")
    }

    /// Adds a named TCP port.
    pub fn port(self, name: &str, port: u16) -> Self {
        self.port_spec(Some(name), Some(i32::from(port)), Some("TCP"))
    }

    /// Adds an unnamed TCP port (an empty name, as Kubernetes writes it).
    pub fn unnamed_port(self, port: u16) -> Self {
        self.port_spec(Some(""), Some(i32::from(port)), Some("TCP"))
    }

    /// Adds a port as given: any field may be absent.
    pub fn port_spec(
        mut self,
        name: Option<&str>,
        port: Option<i32>,
        protocol: Option<&str>,
    ) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: name.map(Into::into),
                port,
                protocol: protocol.map(Into::into),
                app_protocol: None,
            });
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: EndpointBuilder) -> Self {
        self.0.endpoints.push(endpoint.0);
        self
    }

    /// Adds endpoints.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = EndpointBuilder>) -> Self {
        self.0.endpoints.extend(endpoints.into_iter().map(|e| e.0));
        self
    }

    /// Sets a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    /// Moves the slice to another service (sets `kubernetes.io/service-name`).
    pub fn service(self, service: &str) -> Self {
        self.label(SERVICE_NAME_LABEL, service)
    }

    /// Removes the `kubernetes.io/service-name` label.
    pub fn without_service_label(mut self) -> Self {
        if let Some(labels) = &mut self.0.metadata.labels {
            labels.remove(SERVICE_NAME_LABEL);
        }
        self
    }

    /// The slice.
    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

impl From<SliceBuilder> for EndpointSlice {
    fn from(builder: SliceBuilder) -> Self {
        builder.0
    }
}

/// Starts an endpoint fixture with one address and no conditions (which
/// Kubernetes reads as ready, serving, not terminating).
pub fn ep(address: &str) -> EndpointBuilder {
    EndpointBuilder(Endpoint {
        addresses: vec![address.into()],
        ..Endpoint::default()
    })
}

/// `count` endpoint fixtures `10.BLOCK.x.y`, ready, one per address.
pub fn eps(block: u8, count: u16) -> Vec<EndpointBuilder> {
    (0..count)
        .map(|i| ep(&format!("10.{block}.{}.{}", i / 256, i % 256)))
        .collect()
}

/// Builds an endpoint of an EndpointSlice; see [`ep`].
#[derive(Debug, Clone)]
pub struct EndpointBuilder(Endpoint);

impl EndpointBuilder {
    fn conditions(&mut self) -> &mut EndpointConditions {
        self.0
            .conditions
            .get_or_insert_with(EndpointConditions::default)
    }

    /// Sets `conditions.ready`.
    pub fn ready(mut self, ready: bool) -> Self {
        self.conditions().ready = Some(ready);
        self
    }

    /// Sets `conditions.serving`.
    pub fn serving(mut self, serving: bool) -> Self {
        self.conditions().serving = Some(serving);
        self
    }

    /// Marks it terminating (and not ready, as Kubernetes does); `serving`
    /// stays as set, so absent it follows `ready`.
    pub fn terminating(mut self) -> Self {
        let conditions = self.conditions();
        conditions.terminating = Some(true);
        conditions.ready = Some(false);
        self
    }

    /// Terminating but still serving: a pod in its graceful shutdown.
    pub fn draining(self) -> Self {
        self.terminating().serving(true)
    }

    /// Sets `zone`.
    pub fn zone(mut self, zone: &str) -> Self {
        self.0.zone = Some(zone.into());
        self
    }

    /// Sets `nodeName`.
    pub fn node(mut self, node: &str) -> Self {
        self.0.node_name = Some(node.into());
        self
    }

    /// Sets `hints.forZones`, as the EndpointSlice controller writes them
    /// for topology-aware routing.
    pub fn for_zones(mut self, zones: &[&str]) -> Self {
        let hints = self.0.hints.get_or_insert_with(EndpointHints::default);
        hints.for_zones = Some(
            zones
                .iter()
                .map(|&name| ForZone { name: name.into() })
                .collect(),
        );
        self
    }

    /// Sets `hints.forNodes` (`trafficDistribution: PreferSameNode`).
    pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
        let hints = self.0.hints.get_or_insert_with(EndpointHints::default);
        hints.for_nodes = Some(
            nodes
                .iter()
                .map(|&name| ForNode { name: name.into() })
                .collect(),
        );
        self
    }

    /// Sets `targetRef` to an object of this kind and name.
    pub fn target(mut self, kind: &str, name: &str) -> Self {
        self.0.target_ref = Some(ObjectReference {
            kind: Some(kind.into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        });
        self
    }

    /// Sets `targetRef` to a Pod of this name.
    pub fn pod(self, name: &str) -> Self {
        self.target("Pod", name)
    }

    /// The endpoint.
    pub fn build(self) -> Endpoint {
        self.0
    }
}
