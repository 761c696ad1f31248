//! Unit tests of one delta ADS stream's state: requests in, responses out,
//! and a client that applies them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::*;
use crate::{
    api::{
        subscribers::XdsStatus,
        xds::{
            resources::{CLUSTER_TYPE, ClientKind, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE},
            test_support::{
                self, GREETER, OTHER, World, acked, key, nacked, quiet, recorded, rejection,
                resources, subscribes,
            },
        },
    },
    model::Endpoint,
};
use envoy_types::pb::envoy::config::{core::v3::Node, endpoint::v3::ClusterLoadAssignment};
use prost::Message;

const EPOCH_A: u64 = 0xa;

fn request(type_url: &str, subscribe: &[&str], unsubscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|n| (*n).to_owned()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).to_owned()).collect(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        response_nonce: response.nonce.clone(),
        ..request(&response.type_url, &[], &[])
    }
}

fn nack(response: &DeltaDiscoveryResponse, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(rejection(message)),
        ..ack(response)
    }
}

fn look(session: &mut DeltaSession, world: &World) -> Option<DeltaDiscoveryResponse> {
    test_support::look(session, world).map(|out| out.response)
}

fn next(session: &mut DeltaSession, world: &World) -> DeltaDiscoveryResponse {
    test_support::next(session, world).response
}

/// Names and versions of the resources a response carries.
fn sent(response: &DeltaDiscoveryResponse) -> Vec<(&str, &str)> {
    response
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect()
}

fn sent_names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

/// What a delta client holds: per type URL, name → (version, encoded resource).
#[derive(Debug, Default, PartialEq)]
struct Client {
    held: BTreeMap<String, BTreeMap<String, (String, Vec<u8>)>>,
}

impl Client {
    fn apply(&mut self, response: &DeltaDiscoveryResponse) {
        let held = self.held.entry(response.type_url.clone()).or_default();
        for name in &response.removed_resources {
            held.remove(name);
        }
        for resource in &response.resources {
            let any = resource.resource.as_ref().expect("a resource body");
            assert_eq!(any.type_url, response.type_url);
            held.insert(
                resource.name.clone(),
                (resource.version.clone(), any.value.clone()),
            );
        }
    }

    fn unsubscribed(&mut self, type_url: &str, names: &[&str]) {
        if let Some(held) = self.held.get_mut(type_url) {
            for name in names {
                held.remove(*name);
            }
        }
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.held
            .get(type_url)
            .map(|held| {
                held.iter()
                    .map(|(name, (version, _))| (name.clone(), version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn a_name_that_does_not_exist_is_removed_then_sent_when_it_appears() {
    let mut session = DeltaSession::with_epoch(EPOCH_A);
    let mut world = World::default();
    assert!(subscribes(&session.handle(&request(
        LISTENER_TYPE,
        &[GREETER],
        &[]
    ))));
    assert_eq!(session.named_services(), BTreeSet::from([key(GREETER)]));
    assert!(
        !session.has_wildcard(),
        "a named first request is not a wildcard"
    );
    let first = next(&mut session, &world);
    assert!(first.resources.is_empty());
    assert_eq!(
        first.removed_resources,
        [GREETER],
        "does not exist, at once"
    );
    assert_eq!(first.system_version_info, "1");
    quiet(&mut session, &world);

    session.handle(&ack(&first));
    world.set(GREETER, 5, &[1]);
    let second = next(&mut session, &world);
    assert_eq!(sent(&second), [(GREETER, "a:p")]);
    assert!(second.removed_resources.is_empty());
    assert_ne!(second.nonce, first.nonce);
    quiet(&mut session, &world);

    // Endpoints do not change a Listener: nothing re-sent.
    world.set(GREETER, 6, &[1, 2]);
    quiet(&mut session, &world);
}

#[test]
fn only_changed_assignments_are_sent_each_with_its_version() {
    let mut session = DeltaSession::with_epoch(EPOCH_A);
    let mut world = World::default();
    world.set(GREETER, 3, &[1]);
    world.set(OTHER, 4, &[2]);
    session.handle(&request(ENDPOINT_TYPE, &[GREETER, OTHER], &[]));
    let first = next(&mut session, &world);
    assert_eq!(sent(&first), [(GREETER, "a:3"), (OTHER, "a:4")]);

    world.set(OTHER, 7, &[2, 3]);
    let second = next(&mut session, &world);
    assert_eq!(sent(&second), [(OTHER, "a:7")], "only what changed");
    let cla = ClusterLoadAssignment::decode(
        second.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    quiet(&mut session, &world);

    // A service that goes is removed, not sent empty; it comes back whole.
    world.remove(GREETER, 8);
    let third = next(&mut session, &world);
    assert!(third.resources.is_empty());
    assert_eq!(third.removed_resources, [GREETER]);
    quiet(&mut session, &world);
    world.set(GREETER, 9, &[1]);
    assert_eq!(sent(&next(&mut session, &world)), [(GREETER, "a:9")]);
    quiet(&mut session, &world);
}

#[test]
fn ack_nack_and_stale_nonces() {
    let mut session = DeltaSession::with_epoch(EPOCH_A);
    let mut world = World::default();
    world.set(GREETER, 1, &[1]);
    session.handle(&request(CLUSTER_TYPE, &[GREETER], &[]));
    let v1 = next(&mut session, &world);
    assert_eq!(session.handle(&ack(&v1)), acked(ResourceType::Cluster, "1"));

    world.set(OTHER, 2, &[3]);
    session.handle(&request(CLUSTER_TYPE, &[OTHER], &[]));
    let v2 = next(&mut session, &world);
    assert_eq!(sent_names(&v2), [OTHER], "the new name only");

    // A NACK of v2: recorded with v2's version and nonce, nothing re-sent.
    let rejected = nacked(session.handle(&nack(&v2, "bad cluster")));
    assert_eq!((&*rejected.version, &*rejected.nonce), ("2", &*v2.nonce));
    quiet(&mut session, &world);
    let status = recorded(&session, ResourceType::Cluster, rejected, true);
    assert_eq!((status.nacks, &*status.version_sent), (1, "2"));
    assert_eq!(status.names, [GREETER, OTHER]);

    // A stale nonce alone is ignored, but its subscription changes apply.
    assert_eq!(
        session.handle(&ack(&v1)),
        Handled::Stale {
            ty: ResourceType::Cluster
        }
    );
    let mut stale = nack(&v1, "old");
    stale.resource_names_unsubscribe = vec![OTHER.into()];
    assert_eq!(
        session.handle(&stale),
        Handled::Request {
            ty: ResourceType::Cluster,
            reply: Reply::Subscribe,
            names_changed: true
        },
        "a stale NACK is not counted"
    );
    assert_eq!(session.subscribed(ResourceType::Cluster), [GREETER]);
    quiet(&mut session, &world);
    // Unsubscribed: the client dropped it itself; a re-subscription re-sends it.
    session.handle(&request(CLUSTER_TYPE, &[OTHER], &[]));
    assert_eq!(sent_names(&next(&mut session, &world)), [OTHER]);
    quiet(&mut session, &world);
}

#[test]
fn wildcards_legacy_explicit_and_their_end() {
    let mut world = World::default();
    world.set(GREETER, 1, &[1]);
    world.set(OTHER, 2, &[2]);

    // Legacy: an empty first subscribe list, until a name is subscribed.
    let mut legacy = DeltaSession::with_epoch(EPOCH_A);
    legacy.handle(&request(CLUSTER_TYPE, &[], &[]));
    assert!(legacy.has_wildcard());
    let first = next(&mut legacy, &world);
    assert_eq!(sent_names(&first), [GREETER, OTHER]);
    world.set("new.default:1", 3, &[3]);
    assert_eq!(sent_names(&next(&mut legacy, &world)), ["new.default:1"]);
    legacy.handle(&request(CLUSTER_TYPE, &[GREETER], &[]));
    assert!(!legacy.has_wildcard());
    let narrowed = next(&mut legacy, &world);
    assert!(narrowed.resources.is_empty(), "{narrowed:?}");
    assert_eq!(narrowed.removed_resources, ["new.default:1", OTHER]);
    quiet(&mut legacy, &world);

    // Explicit `*` with names: stays until `*` is unsubscribed.
    let mut explicit = DeltaSession::with_epoch(EPOCH_A);
    explicit.handle(&request(LISTENER_TYPE, &["*", GREETER], &[]));
    assert_eq!(explicit.subscribed(ResourceType::Listener), ["*", GREETER]);
    assert_eq!(
        sent_names(&next(&mut explicit, &world)),
        [GREETER, "new.default:1", OTHER]
    );
    // Unsubscribing a name a wildcard covers keeps it held and sent.
    explicit.handle(&request(LISTENER_TYPE, &[], &[GREETER]));
    quiet(&mut explicit, &world);
    world.remove(OTHER, 4);
    let removed = next(&mut explicit, &world);
    assert_eq!(removed.removed_resources, [OTHER]);
    explicit.handle(&request(LISTENER_TYPE, &[], &["*"]));
    assert!(!explicit.has_wildcard());
    let ended = next(&mut explicit, &world);
    assert_eq!(ended.removed_resources, [GREETER, "new.default:1"]);
    quiet(&mut explicit, &world);

    // RDS and EDS are never wildcards.
    let mut routes = DeltaSession::with_epoch(EPOCH_A);
    routes.handle(&request(ROUTE_TYPE, &["*"], &[]));
    assert!(!routes.has_wildcard());
    assert!(routes.subscribed(ResourceType::Route).is_empty());
    let answer = next(&mut routes, &world);
    assert!(answer.resources.is_empty() && answer.removed_resources.is_empty());
    routes.handle(&request(ENDPOINT_TYPE, &[], &[]));
    assert!(!routes.has_wildcard());
}

#[test]
fn a_reconnecting_client_is_sent_only_what_it_lacks() {
    let mut world = World::default();
    world.set(GREETER, 3, &[1]);
    world.set(OTHER, 4, &[2]);
    let mut client = Client::default();
    let mut before = DeltaSession::with_epoch(EPOCH_A);
    before.handle(&request(ENDPOINT_TYPE, &[GREETER, OTHER], &[]));
    client.apply(&next(&mut before, &world));
    before.handle(&request(CLUSTER_TYPE, &[], &[]));
    client.apply(&next(&mut before, &world));

    // The stream breaks; meanwhile OTHER changes and GREETER goes.
    world.set(OTHER, 5, &[2, 3]);
    world.remove(GREETER, 6);
    let reconnect = |session: &mut DeltaSession, client: &Client, type_url, names: &[&str]| {
        session.handle(&DeltaDiscoveryRequest {
            initial_resource_versions: client.versions(type_url),
            ..request(type_url, names, &[])
        })
    };
    let mut after = DeltaSession::with_epoch(EPOCH_A);
    reconnect(&mut after, &client, ENDPOINT_TYPE, &[GREETER, OTHER]);
    let eds = next(&mut after, &world);
    assert_eq!(sent(&eds), [(OTHER, "a:5")]);
    assert_eq!(eds.removed_resources, [GREETER]);
    client.apply(&eds);
    reconnect(&mut after, &client, CLUSTER_TYPE, &[]);
    let cds = next(&mut after, &world);
    assert!(cds.resources.is_empty(), "OTHER's cluster is held: {cds:?}");
    assert_eq!(cds.removed_resources, [GREETER]);
    client.apply(&cds);
    quiet(&mut after, &world);

    // After an lb-server restart (another epoch) nothing matches: all re-sent.
    let mut restarted = DeltaSession::with_epoch(0xb);
    reconnect(&mut restarted, &client, ENDPOINT_TYPE, &[OTHER]);
    assert_eq!(sent(&next(&mut restarted, &world)), [(OTHER, "b:5")]);
    reconnect(&mut restarted, &client, CLUSTER_TYPE, &[]);
    assert_eq!(sent(&next(&mut restarted, &world)), [(OTHER, "b:p")]);
    quiet(&mut restarted, &world);

    // Versions that are not ours at all, or forged, are re-sent as well.
    for version in ["", "a", "a:", "a:x", "0a:5", "1000000000000000a:5", "b:5"] {
        assert_eq!(parse_version(EPOCH_A, version), Held::Foreign, "{version}");
    }
    assert_eq!(parse_version(EPOCH_A, "a:5"), Held::Version(5));
    assert_eq!(parse_version(EPOCH_A, "a:p"), Held::Present);
    assert_ne!(
        DeltaSession::new().protocol.epoch,
        0,
        "the process's epoch is drawn"
    );
}

#[test]
fn unknown_types_and_bad_names_are_harmless() {
    let mut session = DeltaSession::new();
    let world = World::default();
    assert_eq!(
        session.handle(&request(
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            &["x"],
            &[]
        )),
        Handled::UnknownType
    );
    assert_eq!(session.handle(&request("", &[], &[])), Handled::UnknownType);
    quiet(&mut session, &world);
    session.handle(&request(
        LISTENER_TYPE,
        &["not a target", "UPPER.case:1"],
        &[],
    ));
    assert!(session.named_services().is_empty());
    let answer = next(&mut session, &world);
    assert!(answer.resources.is_empty());
    assert_eq!(answer.removed_resources, ["UPPER.case:1", "not a target"]);
    quiet(&mut session, &world);
    // Unsubscribing what was never subscribed changes nothing.
    assert!(matches!(
        session.handle(&request(LISTENER_TYPE, &[], &["never"])),
        Handled::Request {
            names_changed: false,
            ..
        }
    ));
    quiet(&mut session, &world);
}

#[test]
fn many_names_at_once_are_kept_sorted_and_unique() {
    let mut session = DeltaSession::with_epoch(EPOCH_A);
    let mut world = World::default();
    world.set("s5.default:1", 1, &[1]);
    let names: Vec<String> = (0..10_000)
        .rev()
        .map(|i| format!("s{i}.default:1"))
        .collect();
    let mut big = request(ENDPOINT_TYPE, &[], &[]);
    big.resource_names_subscribe = names.clone();
    big.resource_names_subscribe.push("s5.default:1".into());
    assert_eq!(DeltaSession::names_in(&big), 10_001);
    session.handle(&big);
    assert_eq!(session.named_services().len(), 10_000);
    let answer = next(&mut session, &world);
    assert_eq!(sent_names(&answer), ["s5.default:1"]);
    assert_eq!(answer.removed_resources.len(), 9_999);
    session.handle(&request(ENDPOINT_TYPE, &["s10000.default:1"], &[]));
    assert_eq!(session.named_services().len(), 10_001);
    let mut all_out = request(ENDPOINT_TYPE, &[], &[]);
    all_out.resource_names_unsubscribe = names;
    session.handle(&all_out);
    assert_eq!(
        session.subscribed(ResourceType::Endpoint),
        ["s10000.default:1"]
    );
}

#[test]
fn the_node_zone_and_kind_shape_the_resources() {
    use envoy_types::pb::envoy::config::core::v3::Locality;
    let mut world = World::default();
    world.set_endpoints(
        GREETER,
        3,
        vec![
            Endpoint::new("10.0.0.1".parse().unwrap(), 80).zone("zone-a"),
            Endpoint::new("10.0.0.2".parse().unwrap(), 80).zone("zone-b"),
        ],
    );
    let mut session = DeltaSession::with_epoch(EPOCH_A);
    let mut first = request(ENDPOINT_TYPE, &[GREETER], &[]);
    first.node = Some(Node {
        id: "envoy-1".into(),
        user_agent_name: "envoy".into(),
        locality: Some(Locality {
            zone: "zone-b".into(),
            ..Locality::default()
        }),
        ..Node::default()
    });
    session.handle(&first);
    assert_eq!(session.client_kind(), ClientKind::Envoy);
    let out = next(&mut session, &world);
    let cla =
        ClusterLoadAssignment::decode(out.resources[0].resource.as_ref().unwrap().value.as_slice())
            .unwrap();
    let priorities: Vec<_> = cla
        .endpoints
        .iter()
        .map(|l| (l.locality.clone().unwrap().zone, l.priority))
        .collect();
    assert_eq!(
        priorities,
        [("zone-a".to_owned(), 1), ("zone-b".to_owned(), 0)]
    );
    let mut status = XdsStatus::default();
    session.record(ResourceType::Endpoint, None, true, &mut status);
    assert_eq!(status.node_id, "envoy-1");
    assert_eq!(status.types[0].names, [GREETER]);
}

/// A random change to one service's endpoints: added, removed, drained,
/// reweighted, now and then half replaced; `false` to delete the service.
fn change(rng: &mut fastrand::Rng, endpoints: &mut BTreeMap<u8, Endpoint>) -> bool {
    let pick = |rng: &mut fastrand::Rng, endpoints: &BTreeMap<u8, Endpoint>| {
        let ids: Vec<u8> = endpoints.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[rng.usize(..ids.len())])
    };
    match rng.u8(..100) {
        0..35 => {
            let id = rng.u8(..);
            let endpoint = Endpoint::new(format!("10.1.0.{id}").parse().unwrap(), 8080)
                .zone(format!("zone-{}", id % 3));
            endpoints.insert(id, endpoint);
        }
        35..55 => {
            if let Some(id) = pick(rng, endpoints) {
                endpoints.remove(&id);
            }
        }
        55..72 => {
            if let Some(id) = pick(rng, endpoints) {
                let endpoint = endpoints.get_mut(&id).unwrap();
                endpoint.draining = !endpoint.draining;
            }
        }
        72..90 => {
            if let Some(id) = pick(rng, endpoints) {
                endpoints.get_mut(&id).unwrap().weight = rng.u32(1..=5);
            }
        }
        90..96 => {
            endpoints.retain(|_, _| rng.bool());
            for _ in 0..rng.usize(..20) {
                let id = rng.u8(..);
                let address = format!("10.2.0.{id}").parse().unwrap();
                endpoints.insert(id, Endpoint::new(address, 7070));
            }
        }
        _ => return false,
    }
    true
}

/// What a client subscribed to `names` (and to every Listener and Cluster)
/// should hold: built afresh from the view, as a state-of-the-world stream
/// would send it.
fn full_state(
    world: &World,
    names: &BTreeSet<&str>,
    kind: ClientKind,
    zone: &str,
) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let resources = resources();
    let mut full: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for ty in ResourceType::SEND_ORDER {
        let held = full.entry(ty.type_url().to_owned()).or_default();
        let wanted: Vec<String> = if ty.allows_wildcard() {
            world
                .view
                .existing
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            names.iter().map(|name| (*name).to_owned()).collect()
        };
        for name in wanted {
            let key = key(&name);
            let Some(snapshot) = world.view.snapshots.get(&key).filter(|s| s.exists) else {
                continue;
            };
            let any = resources.build(ty, &name, &key, Some(snapshot), kind, zone);
            held.insert(name, any.value);
        }
    }
    full
}

/// 10,000 random store changes over three services (endpoints added, removed,
/// drained, reweighted; services deleted and re-created), with the client
/// now and then unsubscribing and re-subscribing a name, acking or nacking:
/// after every step the resources a delta client holds, applying what it
/// is sent, are exactly the full state. `DELTA_SEED` replays a failure.
#[test]
fn a_delta_client_holds_the_full_state_through_10_000_random_changes() {
    let seed = std::env::var("DELTA_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    // Shown with the test's output when it fails; DELTA_SEED replays it.
    eprintln!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let targets = [GREETER, OTHER, "third.other:9000"];
    let mut world = World::default();
    let mut endpoints: Vec<BTreeMap<u8, Endpoint>> = vec![BTreeMap::new(); targets.len()];
    let mut version = 0;
    let mut session = DeltaSession::new();
    let mut client = Client::default();
    let mut subscribed: BTreeSet<&str> = targets.iter().copied().collect();
    let mut first_eds = request(ENDPOINT_TYPE, &targets, &[]);
    first_eds.node = Some(Node {
        id: "prop".into(),
        user_agent_name: "envoy".into(),
        locality: Some(envoy_types::pb::envoy::config::core::v3::Locality {
            zone: "zone-1".into(),
            ..Default::default()
        }),
        ..Node::default()
    });
    session.handle(&first_eds);
    session.handle(&request(CLUSTER_TYPE, &[], &[]));
    session.handle(&request(LISTENER_TYPE, &["*"], &[]));
    session.handle(&request(ROUTE_TYPE, &targets, &[]));
    let (mut responses, mut resent) = (0, 0);
    for step in 0..10_000 {
        let i = rng.usize(..targets.len());
        version += 1;
        if change(&mut rng, &mut endpoints[i]) {
            world.set_endpoints(
                targets[i],
                version,
                endpoints[i].values().cloned().collect(),
            );
        } else if world.view.existing.contains(&key(targets[i])) {
            world.remove(targets[i], version);
            endpoints[i].clear();
        }
        match rng.u8(..100) {
            0..3 => {
                let name = targets[rng.usize(..targets.len())];
                let ty = [ENDPOINT_TYPE, ROUTE_TYPE][rng.usize(..2)];
                if subscribed.remove(name) {
                    session.handle(&request(ENDPOINT_TYPE, &[], &[name]));
                    session.handle(&request(ROUTE_TYPE, &[], &[name]));
                    client.unsubscribed(ENDPOINT_TYPE, &[name]);
                    client.unsubscribed(ROUTE_TYPE, &[name]);
                } else {
                    subscribed.insert(name);
                    // One type at a time now and then: both end up subscribed.
                    session.handle(&request(ty, &[name], &[]));
                    session.handle(&request(ENDPOINT_TYPE, &[name], &[]));
                    session.handle(&request(ROUTE_TYPE, &[name], &[]));
                }
            }
            3..6 => {
                // Nothing the client sends about a response changes what it holds.
                session.handle(&request(CLUSTER_TYPE, &[], &[]));
            }
            _ => {}
        }
        // Sometimes the stream reads a burst of changes before it sends.
        if rng.u8(..4) == 0 && step != 9_999 {
            continue;
        }
        while let Some(response) = look(&mut session, &world) {
            responses += 1;
            resent += response.resources.len();
            client.apply(&response);
            let reply = if rng.u8(..50) == 0 {
                nack(&response, "rejected")
            } else {
                ack(&response)
            };
            session.handle(&reply);
        }
        let held: BTreeMap<String, BTreeMap<String, Vec<u8>>> = ResourceType::SEND_ORDER
            .into_iter()
            .map(|ty| {
                let url = ty.type_url();
                let held = client.held.get(url).cloned().unwrap_or_default();
                let held = held.into_iter().map(|(name, (_, body))| (name, body));
                (url.to_owned(), held.collect())
            })
            .collect();
        assert_eq!(
            held,
            full_state(&world, &subscribed, ClientKind::Envoy, "zone-1"),
            "seed {seed}, step {step}"
        );
        // Each assignment's version is the snapshot it was built from.
        for (name, (version, _)) in client.held.get(ENDPOINT_TYPE).into_iter().flatten() {
            let snapshot = &world.view.snapshots[&key(name)];
            assert_eq!(
                parse_version(session.protocol.epoch, version),
                Held::Version(snapshot.version),
                "seed {seed}, step {step}: {name}"
            );
        }
    }
    eprintln!("{responses} responses, {resent} resources sent");
    assert!(responses > 5_000, "seed {seed}: {responses} responses");
}
