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
        zone: endpoint.zone.to_string(),
        node: endpoint.node.to_string(),
        pod: endpoint.pod.to_string(),
        draining: endpoint.draining,
        for_zones: names(&endpoint.hints().for_zones),
        for_nodes: names(&endpoint.hints().for_nodes),
    }
}

fn names(names: &[std::sync::Arc<str>]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
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

/// The key naming an endpoint in `WatchResponse.removed`.
pub fn endpoint_key(endpoint: &Endpoint) -> pb::EndpointKey {
    pb::EndpointKey {
        address: endpoint.address.to_string(),
        port: u32::from(endpoint.port),
    }
}

/// A diff as an incremental Watch response: `changed` (added or changed,
/// whole) and `removed` turn the list of version `base` into `snapshot`'s.
pub fn diff_response<'a>(
    key: &ServiceKey,
    base: u64,
    snapshot: &Snapshot,
    changed: impl IntoIterator<Item = &'a Endpoint>,
    removed: impl IntoIterator<Item = &'a Endpoint>,
) -> pb::WatchResponse {
    pb::WatchResponse {
        version: snapshot.version,
        exists: snapshot.exists,
        endpoints: changed.into_iter().map(endpoint).collect(),
        target: key.to_string(),
        incremental: true,
        base_version: base,
        removed: removed.into_iter().map(endpoint_key).collect(),
        ..Default::default()
    }
}

/// About how many bytes [`endpoint`] takes inside a Watch response (the
/// field's tag and length included), counted without building it: what a
/// diff saves per endpoint it leaves out; exactly what the message takes.
pub fn endpoint_len_in_response(endpoint: &Endpoint) -> usize {
    use prost::encoding::encoded_len_varint as varint;
    // Every field number of Endpoint is below 16: a one-byte tag.
    let bytes = |len: usize| {
        if len == 0 {
            0
        } else {
            1 + varint(len as u64) + len
        }
    };
    let number = |value: u64| if value == 0 { 0 } else { 1 + varint(value) };
    // A repeated string encodes every entry, empty ones too.
    let list = |names: &[std::sync::Arc<str>]| -> usize {
        names
            .iter()
            .map(|name| 1 + varint(name.len() as u64) + name.len())
            .sum()
    };
    let hints = endpoint.hints();
    let len = bytes(ip_text_len(endpoint.address))
        + number(u64::from(endpoint.port))
        + number(u64::from(endpoint.weight))
        + bytes(endpoint.zone.len())
        + bytes(endpoint.node.len())
        + bytes(endpoint.pod.len())
        + if endpoint.draining { 2 } else { 0 }
        + list(&hints.for_zones)
        + list(&hints.for_nodes);
    1 + varint(len as u64) + len
}

/// The length of an address's text form, without allocating it.
fn ip_text_len(address: std::net::IpAddr) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail.
    let _ = std::fmt::Write::write_fmt(&mut count, format_args!("{address}"));
    count.0
}
