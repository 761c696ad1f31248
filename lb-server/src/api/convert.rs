//! Conversions from domain types (`model`) to `lookaside.v1` messages; the
//! generated messages themselves live in `lookaside_proto`.

use std::time::SystemTime;

use lookaside_proto::lookaside::v1 as pb;

use crate::model::{Endpoint, ServiceKey, Snapshot};

/// A domain endpoint as a protobuf message.
pub fn endpoint(endpoint: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        address: endpoint.address.to_string(),
        port: u32::from(endpoint.port),
        weight: endpoint.weight,
        zone: endpoint.zone.clone(),
        node: endpoint.node.clone(),
        pod: endpoint.pod.clone(),
        draining: endpoint.draining,
        ..Default::default()
    }
}

/// A snapshot as a Watch response.
pub fn watch_response(key: &ServiceKey, snapshot: &Snapshot) -> pb::WatchResponse {
    pb::WatchResponse {
        version: snapshot.version,
        exists: snapshot.exists,
        endpoints: snapshot.endpoints.iter().map(endpoint).collect(),
        target: key.to_string(),
        ..Default::default()
    }
}

/// A wall-clock time as a protobuf timestamp.
pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}
