//! Unit tests of one ADS stream's state: requests in, responses out.

use std::{collections::BTreeSet, sync::Arc};

use super::*;
use crate::{
    api::{
        subscribers::XdsStatus,
        xds::{
            resources::{
                CLUSTER_TYPE, ClientKind, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, Resources,
            },
            test_support::{
                GREETER, OTHER, World, acked, key, nacked, next, quiet, recorded, rejection,
                resources, subscribes,
            },
        },
    },
    config::XdsLbPolicy,
    model::{Endpoint, Snapshot},
};
use envoy_types::pb::envoy::config::{
    cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
    listener::v3::Listener,
};
use prost::Message;

fn request(type_url: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        response_nonce: nonce.into(),
        ..DiscoveryRequest::default()
    }
}

fn ack(response: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: response.version_info.clone(),
        ..request(&response.type_url, names, &response.nonce)
    }
}

fn nack(response: &DiscoveryResponse, names: &[&str], message: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(rejection(message)),
        ..request(&response.type_url, names, &response.nonce)
    }
}

fn names<M: Message + Default>(
    response: &DiscoveryResponse,
    name: impl Fn(&M) -> &str,
) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| name(&M::decode(any.value.as_slice()).unwrap()).to_owned())
        .collect()
}

fn listeners(response: &DiscoveryResponse) -> Vec<String> {
    names::<Listener>(response, |l| &l.name)
}

fn clusters(response: &DiscoveryResponse) -> Vec<String> {
    names::<Cluster>(response, |c| &c.name)
}

fn assignments(response: &DiscoveryResponse) -> Vec<(String, usize)> {
    response
        .resources
        .iter()
        .map(|any| {
            let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
            let count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            (cla.cluster_name, count)
        })
        .collect()
}

#[test]
fn unknown_listener_gets_an_empty_answer_then_the_listener_when_it_appears() {
    let mut session = Session::new();
    let mut world = World::default();
    assert!(subscribes(&session.handle(&request(
        LISTENER_TYPE,
        &[GREETER],
        ""
    ))));
    assert_eq!(session.named_services(), BTreeSet::from([key(GREETER)]));
    let first = next(&mut session, &world);
    assert!(
        first.response.resources.is_empty(),
        "does-not-exist, at once"
    );
    assert_eq!(first.response.version_info, "1");
    assert!(!first.push);
    quiet(&mut session, &world);

    session.handle(&ack(&first.response, &[GREETER]));
    world.set(GREETER, 5, &[1]);
    let second = next(&mut session, &world);
    assert_eq!(listeners(&second.response), [GREETER]);
    assert_eq!(second.response.version_info, "2");
    assert_ne!(second.response.nonce, first.response.nonce);
    assert!(second.push);
    quiet(&mut session, &world);

    world.set(GREETER, 6, &[1, 2]);
    quiet(&mut session, &world);
}

#[test]
fn ack_nack_and_stale_nonces() {
    let mut session = Session::new();
    let mut world = World::default();
    world.set(GREETER, 1, &[1]);
    session.handle(&request(CLUSTER_TYPE, &[GREETER], ""));
    let v1 = next(&mut session, &world).response;
    assert_eq!(
        session.handle(&ack(&v1, &[GREETER])),
        acked(ResourceType::Cluster, "1")
    );

    world.set(OTHER, 2, &[3]);
    session.handle(&request(CLUSTER_TYPE, &[GREETER, OTHER], &v1.nonce));
    let v2 = next(&mut session, &world).response;
    assert_eq!(clusters(&v2), [GREETER, OTHER]);

    // A NACK of v2 is recorded with v2's version and nonce; nothing is re-sent.
    let rejected = nacked(session.handle(&nack(&v2, &[GREETER, OTHER], "bad cluster")));
    assert_eq!((&*rejected.version, &*rejected.nonce), ("2", &*v2.nonce));
    assert_eq!(rejected.message, "bad cluster");
    quiet(&mut session, &world);
    let status = recorded(&session, ResourceType::Cluster, rejected, false);
    assert_eq!((status.nacks, &*status.version_sent), (1, "2"));

    // Stale nonces (old, unknown, or from another type) change nothing,
    // not even the names they carry.
    for stale in [&v1.nonce, "no-such-nonce"] {
        assert_eq!(
            session.handle(&request(CLUSTER_TYPE, &[], stale)),
            Handled::Stale {
                ty: ResourceType::Cluster
            }
        );
    }
    quiet(&mut session, &world);
    assert_eq!(session.subscribed(ResourceType::Cluster), [GREETER, OTHER]);

    // The next change still goes out, as version 3.
    world.remove(OTHER, 3);
    let v3 = next(&mut session, &world).response;
    assert_eq!(v3.version_info, "3");
    assert_eq!(clusters(&v3), [GREETER], "a removed cluster is left out");
}

#[test]
fn legacy_and_explicit_wildcards() {
    let mut world = World::default();
    world.set(GREETER, 1, &[1]).set("b.ns:80", 2, &[2]);

    let mut envoy = Session::new();
    envoy.handle(&request(CLUSTER_TYPE, &[], ""));
    assert!(envoy.has_wildcard());
    assert!(envoy.named_services().is_empty());
    let v1 = next(&mut envoy, &world).response;
    assert_eq!(clusters(&v1), ["b.ns:80", GREETER]);
    envoy.handle(&ack(&v1, &[]));
    assert!(
        envoy.has_wildcard(),
        "an empty ACK keeps the legacy wildcard"
    );
    assert_eq!(envoy.subscribed(ResourceType::Cluster), ["*"]);

    world.set("c.ns:80", 3, &[3]);
    let v2 = next(&mut envoy, &world).response;
    assert_eq!(clusters(&v2), ["b.ns:80", "c.ns:80", GREETER]);
    world.remove("b.ns:80", 4);
    let v3 = next(&mut envoy, &world).response;
    assert_eq!(clusters(&v3), ["c.ns:80", GREETER]);
    world.set(GREETER, 5, &[1, 2]);
    quiet(&mut envoy, &world);

    // Naming something ends a legacy wildcard; an empty list then means nothing.
    envoy.handle(&ack(&v3, &["c.ns:80"]));
    assert!(!envoy.has_wildcard());
    assert_eq!(clusters(&next(&mut envoy, &world).response), ["c.ns:80"]);
    let mut explicit = Session::new();
    explicit.handle(&request(LISTENER_TYPE, &["*", "late.ns:80"], ""));
    assert_eq!(
        explicit.subscribed(ResourceType::Listener),
        ["*", "late.ns:80"]
    );
    assert_eq!(
        listeners(&next(&mut explicit, &world).response),
        ["c.ns:80", GREETER]
    );

    // RDS and EDS never wildcard.
    let mut named_only = Session::new();
    named_only.handle(&request(ENDPOINT_TYPE, &[], ""));
    assert!(!named_only.has_wildcard());
    assert!(next(&mut named_only, &world).response.resources.is_empty());
}

#[test]
fn eds_sends_what_changed_and_an_empty_assignment_on_removal() {
    let mut session = Session::new();
    let mut world = World::default();
    world.set(GREETER, 1, &[1, 2]).set("b.ns:80", 2, &[3]);
    session.handle(&request(
        ENDPOINT_TYPE,
        &[GREETER, "b.ns:80", "never.ns:80"],
        "",
    ));
    let first = next(&mut session, &world);
    assert_eq!(
        assignments(&first.response),
        [("b.ns:80".into(), 1), (GREETER.into(), 2)],
        "an unknown service is left out"
    );
    assert_eq!(first.store_version, 2);

    world.set(GREETER, 3, &[1, 2, 4]);
    let update = next(&mut session, &world);
    assert_eq!(
        assignments(&update.response),
        [(GREETER.into(), 3)],
        "only what changed"
    );
    assert!(update.push);
    assert_eq!(update.store_version, 3);
    assert!(update.oldest_event.is_some());

    world.remove("b.ns:80", 4);
    let removed = next(&mut session, &world);
    assert_eq!(assignments(&removed.response), [("b.ns:80".into(), 0)]);
    quiet(&mut session, &world);

    world.set("b.ns:80", 5, &[5]).set("never.ns:80", 6, &[6]);
    let back = next(&mut session, &world);
    assert_eq!(
        assignments(&back.response),
        [("b.ns:80".into(), 1), ("never.ns:80".into(), 1)]
    );

    // Unsubscribing forgets; subscribing again sends the current state.
    session.handle(&ack(&back.response, &[GREETER]));
    assert!(next(&mut session, &world).response.resources.is_empty());
    let latest = session.types[ResourceType::Endpoint.index()].nonce.clone();
    session.handle(&DiscoveryRequest {
        ..request(ENDPOINT_TYPE, &[GREETER, "b.ns:80"], &latest)
    });
    assert_eq!(
        assignments(&next(&mut session, &world).response),
        [("b.ns:80".into(), 1)]
    );
}

#[test]
fn types_are_independent_and_sent_clusters_first() {
    let mut session = Session::new();
    let mut world = World::default();
    world.set(GREETER, 1, &[1]);
    session.handle(&request(LISTENER_TYPE, &[GREETER], ""));
    session.handle(&request(ROUTE_TYPE, &[GREETER], ""));
    session.handle(&request(ENDPOINT_TYPE, &[GREETER], ""));
    session.handle(&request(CLUSTER_TYPE, &[GREETER], ""));
    let order: Vec<&str> = std::iter::from_fn(|| session.next_response(&world.view, &resources()))
        .map(|out| out.ty.short())
        .collect();
    assert_eq!(order, ["cds", "eds", "lds", "rds"]);
    let versions: BTreeSet<String> = ResourceType::SEND_ORDER
        .iter()
        .map(|ty| session.types[ty.index()].version.to_string())
        .collect();
    assert_eq!(
        versions,
        BTreeSet::from(["1".to_owned()]),
        "versions count per type"
    );

    // A NACK of EDS leaves the others alone.
    let eds_nonce = session.types[ResourceType::Endpoint.index()].nonce.clone();
    let mut bad = request(ENDPOINT_TYPE, &[GREETER], &eds_nonce);
    bad.error_detail = Some(rejection("no"));
    session.handle(&bad);
    world.set(GREETER, 2, &[1, 2]);
    let out = next(&mut session, &world);
    assert_eq!(out.ty, ResourceType::Endpoint);
    assert_eq!(out.response.version_info, "2");
    quiet(&mut session, &world);
}

#[test]
fn bad_input_is_ignored_without_harm() {
    let mut session = Session::new();
    let world = World::default();
    assert_eq!(
        session.handle(&request(
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            &["x"],
            ""
        )),
        Handled::UnknownType
    );
    assert_eq!(session.handle(&request("", &[], "7")), Handled::UnknownType);
    // Invalid targets are accepted as names but never resolve.
    session.handle(&request(
        LISTENER_TYPE,
        &["not a target", "UPPER.case:1"],
        "99",
    ));
    assert!(session.named_services().is_empty());
    assert!(next(&mut session, &world).response.resources.is_empty());
    quiet(&mut session, &world);
}

#[test]
fn record_fills_node_and_names() {
    let mut session = Session::new();
    let mut first = request(LISTENER_TYPE, &[GREETER], "");
    first.node = Some(Node {
        id: "node-1".into(),
        cluster: "c".into(),
        user_agent_name: "gRPC Python".into(),
        ..Node::default()
    });
    session.handle(&first);
    let mut status = XdsStatus::default();
    session.record(
        ResourceType::Listener,
        Some(&Reply::Subscribe),
        true,
        &mut status,
    );
    assert_eq!(status.node_id, "node-1");
    assert_eq!(status.user_agent, "gRPC Python");
    assert_eq!(status.types[0].names, [GREETER]);
    assert_eq!(status.types[0].type_url, LISTENER_TYPE);
    assert_eq!(status.types[0].version_sent, "");
}

#[test]
fn the_first_node_decides_the_cluster_shape() {
    let tls = Resources::new(XdsLbPolicy::RoundRobin).with_upstream_tls(Some(
        crate::api::xds::resources::UpstreamTls {
            sds_dir: "/sds".into(),
        },
    ));
    let mut world = World::default();
    world.set(GREETER, 1, &[1]);
    let cluster_for = |user_agent: Option<&str>| {
        let mut session = Session::new();
        let mut first = request(CLUSTER_TYPE, &[GREETER], "");
        first.node = user_agent.map(|agent| Node {
            id: "n".into(),
            user_agent_name: agent.into(),
            ..Node::default()
        });
        session.handle(&first);
        // A later node does not change what the stream is.
        let mut later = request(LISTENER_TYPE, &[GREETER], "");
        later.node = Some(Node {
            user_agent_name: "envoy".into(),
            ..Node::default()
        });
        session.handle(&later);
        let kind = session.client_kind();
        let out = session.next_response(&world.view, &tls).unwrap();
        let cluster = Cluster::decode(out.response.resources[0].value.as_slice()).unwrap();
        (kind, cluster.transport_socket.unwrap())
    };
    let (envoy, envoy_socket) = cluster_for(Some("envoy"));
    let (grpc, grpc_socket) = cluster_for(Some("gRPC Python"));
    assert_eq!((envoy, grpc), (ClientKind::Envoy, ClientKind::Grpc));
    assert_ne!(envoy_socket, grpc_socket);
    assert_eq!(
        cluster_for(None).0,
        ClientKind::Envoy,
        "the later node counts when the first had none"
    );
}

#[test]
fn huge_node_fields_and_nack_messages_are_kept_cut() {
    use crate::api::client_text::MAX_KEPT_BYTES;
    let mut session = Session::new();
    let world = World::default();
    let mut first = request(LISTENER_TYPE, &[GREETER], "");
    first.node = Some(Node {
        id: "n".repeat(500_000),
        user_agent_name: "u".repeat(500_000),
        ..Node::default()
    });
    session.handle(&first);
    let node = session.node().unwrap();
    assert!(node.id.len() <= MAX_KEPT_BYTES && node.id.starts_with("nnnn"));
    assert!(node.user_agent.len() <= MAX_KEPT_BYTES);
    let sent = next(&mut session, &world);
    let nack = nacked(session.handle(&nack(&sent.response, &[GREETER], &"x".repeat(1 << 20))));
    assert!(
        nack.message.len() <= MAX_KEPT_BYTES,
        "{}",
        nack.message.len()
    );
    assert!(nack.message.ends_with('…'));
}

#[test]
fn the_node_zone_is_priority_0_while_it_has_serving_endpoints() {
    use envoy_types::pb::envoy::config::core::v3::Locality;
    let mut world = World::default();
    let set = |world: &mut World, version: u64, zones: &[&str]| {
        let snapshot = Snapshot {
            version,
            exists: true,
            endpoints: zones
                .iter()
                .zip(1u8..)
                .map(|(zone, i)| {
                    Endpoint::new(format!("10.0.0.{i}").parse().unwrap(), 80).zone(*zone)
                })
                .collect(),
            ..Snapshot::unknown()
        };
        world
            .view
            .snapshots
            .insert(key(GREETER), Arc::new(snapshot));
        world.view.existing.insert(key(GREETER));
        world.note(false);
    };
    let priorities = |out: &Outgoing| -> Vec<(String, u32)> {
        let cla =
            ClusterLoadAssignment::decode(out.response.resources[0].value.as_slice()).unwrap();
        cla.endpoints
            .iter()
            .map(|l| (l.locality.clone().unwrap().zone, l.priority))
            .collect()
    };
    set(&mut world, 3, &["zone-a", "zone-b"]);
    let subscribe = |zone: Option<&str>| {
        let mut session = Session::new();
        let mut first = request(ENDPOINT_TYPE, &[GREETER], "");
        first.node = Some(Node {
            id: "n".into(),
            locality: zone.map(|zone| Locality {
                zone: zone.into(),
                ..Locality::default()
            }),
            ..Node::default()
        });
        session.handle(&first);
        session
    };
    let all_0 = [("zone-a".to_owned(), 0), ("zone-b".to_owned(), 0)];

    let mut in_a = subscribe(Some("zone-a"));
    assert_eq!(in_a.node().unwrap().zone, "zone-a");
    let first = next(&mut in_a, &world);
    assert_eq!(
        priorities(&first),
        [("zone-a".to_owned(), 0), ("zone-b".to_owned(), 1)]
    );
    let mut in_b = subscribe(Some("zone-b"));
    assert_eq!(
        priorities(&next(&mut in_b, &world)),
        [("zone-a".to_owned(), 1), ("zone-b".to_owned(), 0)]
    );
    for zone in [None, Some(""), Some("zone-x")] {
        let mut session = subscribe(zone);
        assert_eq!(priorities(&next(&mut session, &world)), all_0, "{zone:?}");
    }

    // zone-a's endpoints go: its clients get the others at priority 0 at
    // once (no sparse priorities), and zone-a again when it is back.
    in_a.handle(&ack(&first.response, &[GREETER]));
    set(&mut world, 4, &["zone-b", "zone-b"]);
    assert_eq!(
        priorities(&next(&mut in_a, &world)),
        [("zone-b".to_owned(), 0)]
    );
    set(&mut world, 5, &["zone-b", "zone-a"]);
    assert_eq!(
        priorities(&next(&mut in_a, &world)),
        [("zone-a".to_owned(), 0), ("zone-b".to_owned(), 1)]
    );
    quiet(&mut in_a, &world);
}
