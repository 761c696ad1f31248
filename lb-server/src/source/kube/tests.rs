//! Unit tests of the Kubernetes source: events in, store updates out.

use std::collections::{BTreeMap, BTreeSet};

use super::{fixtures::*, *};

fn key(namespace: &str, name: &str, port: PortRef) -> ServiceKey {
    ServiceKey::new(namespace, name, port).unwrap()
}

fn keys(targets: &[&str]) -> BTreeSet<ServiceKey> {
    targets.iter().map(|t| t.parse().unwrap()).collect()
}

fn named(port: &str) -> PortRef {
    PortRef::Name(port.into())
}

fn endpoint(address: &str, port: u16) -> Endpoint {
    Endpoint::new(address.parse().unwrap(), port)
}

/// A watcher state after an initial list of `slices`, and its updates.
fn listed(slices: impl IntoIterator<Item = EndpointSlice>) -> (Slices, Vec<Update>) {
    let mut state = Slices::default();
    assert!(state.handle(Event::Init).is_empty());
    for slice in slices {
        assert!(
            state.handle(Event::InitApply(slice)).is_empty(),
            "buffered until InitDone"
        );
    }
    let updates = state.handle(Event::InitDone);
    (state, updates)
}

fn published(updates: &[Update]) -> BTreeMap<ServiceKey, Vec<Endpoint>> {
    updates
        .iter()
        .filter_map(|u| match u {
            Update::Publish(key, endpoints) => Some((key.clone(), endpoints.to_vec())),
            Update::Remove(_) => None,
        })
        .collect()
}

fn removed(updates: &[Update]) -> BTreeSet<ServiceKey> {
    updates
        .iter()
        .filter_map(|u| match u {
            Update::Remove(key) => Some(key.clone()),
            Update::Publish(..) => None,
        })
        .collect()
}

#[test]
fn a_service_split_over_three_large_slices_is_published_whole_at_init_done() {
    let slices = (0..3u8).map(|i| {
        slice("default", &format!("greeter-{i}"), "greeter")
            .port("grpc", 50051)
            .endpoints(eps(i, 120))
            .build()
    });
    let (state, updates) = listed(slices);
    let out = published(&updates);
    assert_eq!(
        out.len(),
        2,
        "one key by name, one by number: {:?}",
        out.keys()
    );
    let by_name = &out[&key("default", "greeter", named("grpc"))];
    assert_eq!(by_name.len(), 360);
    assert!(
        by_name
            .iter()
            .all(|e| e.port == 50051 && e.weight == 1 && !e.draining)
    );
    assert_eq!(
        &out[&key("default", "greeter", PortRef::Number(50051))],
        by_name
    );
    assert_eq!(state.lists(), 1);
}

#[test]
fn dual_stack_slices_merge_both_families_and_fqdn_slices_are_skipped() {
    let (_, updates) = listed([
        slice("default", "greeter-v4", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build(),
        slice("default", "greeter-v6", "greeter")
            .ipv6()
            .port("grpc", 50051)
            .endpoint(ep("fd00::1"))
            .build(),
        slice("default", "greeter-fqdn", "greeter")
            .address_type("FQDN")
            .port("grpc", 50051)
            .endpoint(ep("greeter.example.com"))
            .build(),
    ]);
    let out = published(&updates);
    assert_eq!(
        out[&key("default", "greeter", named("grpc"))],
        vec![endpoint("10.0.0.1", 50051), endpoint("fd00::1", 50051)]
    );
}

#[test]
fn an_endpoint_in_two_slices_while_it_moves_keeps_its_serving_copy() {
    let grpc = key("default", "greeter", named("grpc"));
    // The draining copy sorts first by slice name; the serving copy still wins.
    let (mut state, updates) = listed([
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1").draining().zone("old"))
            .build(),
        slice("default", "greeter-b", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1").zone("new"))
            .build(),
    ]);
    assert_eq!(
        published(&updates)[&grpc],
        vec![endpoint("10.0.0.1", 50051).zone("new")]
    );

    // Both serving: the first by slice name wins.
    let updates = state.handle(Event::Apply(
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1").zone("old"))
            .build(),
    ));
    assert_eq!(
        published(&updates)[&grpc],
        vec![endpoint("10.0.0.1", 50051).zone("old")]
    );

    // The move completes: the old slice drops it, the new copy remains.
    let updates = state.handle(Event::Apply(
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .build(),
    ));
    assert_eq!(
        published(&updates)[&grpc],
        vec![endpoint("10.0.0.1", 50051).zone("new")]
    );

    // Both draining: still one copy, draining.
    let mut state = listed([]).0;
    for (name, zone) in [("greeter-b", "b"), ("greeter-a", "a")] {
        state.handle(Event::Apply(
            slice("default", name, "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1").draining().zone(zone))
                .build(),
        ));
    }
    let snapshot = &state.published[&("default".to_owned(), "greeter".to_owned())][&grpc];
    assert_eq!(
        **snapshot,
        [endpoint("10.0.0.1", 50051).zone("a").draining()]
    );
}

#[test]
fn deleting_one_slice_recomputes_only_its_service() {
    let (mut state, _) = listed([
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build(),
        slice("default", "greeter-b", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.2"))
            .build(),
        slice("default", "other-a", "other")
            .port("http", 80)
            .endpoint(ep("10.0.1.1"))
            .build(),
    ]);
    let updates = state.handle(Event::Delete(
        slice("default", "greeter-b", "greeter").build(),
    ));
    assert_eq!(
        updates,
        vec![
            Update::Publish(
                key("default", "greeter", named("grpc")),
                vec![endpoint("10.0.0.1", 50051)].into()
            ),
            Update::Publish(
                key("default", "greeter", PortRef::Number(50051)),
                vec![endpoint("10.0.0.1", 50051)].into()
            ),
        ],
        "only greeter changes"
    );

    let updates = state.handle(Event::Delete(
        slice("default", "greeter-a", "greeter").build(),
    ));
    assert_eq!(
        removed(&updates),
        BTreeSet::from([
            key("default", "greeter", PortRef::Number(50051)),
            key("default", "greeter", named("grpc")),
        ])
    );
    assert!(published(&updates).is_empty());
    // Deleting a slice never seen changes nothing.
    assert!(
        state
            .handle(Event::Delete(slice("default", "ghost", "greeter").build()))
            .is_empty()
    );
}

#[test]
fn a_named_port_with_different_numbers_per_slice_keeps_each_slices_number() {
    let (_, updates) = listed([
        slice("default", "greeter-a", "greeter")
            .port("grpc", 8080)
            .endpoint(ep("10.0.0.1"))
            .build(),
        slice("default", "greeter-b", "greeter")
            .port("grpc", 9090)
            .endpoint(ep("10.0.0.2"))
            .build(),
    ]);
    let out = published(&updates);
    assert_eq!(out.len(), 3);
    assert_eq!(
        out[&key("default", "greeter", named("grpc"))],
        vec![endpoint("10.0.0.1", 8080), endpoint("10.0.0.2", 9090)]
    );
    assert_eq!(
        out[&key("default", "greeter", PortRef::Number(8080))],
        vec![endpoint("10.0.0.1", 8080)]
    );
    assert_eq!(
        out[&key("default", "greeter", PortRef::Number(9090))],
        vec![endpoint("10.0.0.2", 9090)]
    );
}

/// `ready`, `serving`, `terminating`.
type Conditions = (Option<bool>, Option<bool>, Option<bool>);

#[test]
fn conditions_decide_ready_draining_or_left_out() {
    // (ready, serving, terminating) -> None = left out, Some(draining)
    let cases: &[(Conditions, Option<bool>)] = &[
        ((None, None, None), Some(false)),
        ((Some(true), None, None), Some(false)),
        ((Some(false), None, None), None),
        ((Some(true), Some(true), Some(false)), Some(false)),
        ((Some(true), Some(false), Some(false)), Some(false)),
        ((Some(false), Some(true), Some(false)), None),
        ((Some(false), Some(true), Some(true)), Some(true)),
        ((Some(false), Some(false), Some(true)), None),
        ((Some(false), None, Some(true)), None),
        ((None, None, Some(true)), Some(true)),
        ((Some(true), None, Some(true)), Some(true)),
        ((None, Some(false), Some(true)), None),
        ((None, Some(true), None), Some(false)),
    ];
    for &((ready, serving, terminating), want) in cases {
        let conditions = EndpointConditions {
            ready,
            serving,
            terminating,
        };
        assert_eq!(
            draining(Some(&conditions)),
            want,
            "ready={ready:?} serving={serving:?} terminating={terminating:?}"
        );
    }
    assert_eq!(
        draining(None),
        Some(false),
        "no conditions at all means ready"
    );

    // Through a slice: the draining flag reaches the store, not-ready is left out.
    let (_, updates) = listed([slice("default", "greeter-a", "greeter")
        .port("grpc", 50051)
        .endpoint(ep("10.0.0.1"))
        .endpoint(ep("10.0.0.2").draining())
        .endpoint(ep("10.0.0.3").ready(false))
        .endpoint(ep("10.0.0.4").terminating().serving(false))
        .build()]);
    assert_eq!(
        published(&updates)[&key("default", "greeter", named("grpc"))],
        vec![
            endpoint("10.0.0.1", 50051),
            endpoint("10.0.0.2", 50051).draining()
        ]
    );
}

#[test]
fn endpoint_fields_come_from_the_slice_and_bad_entries_are_skipped() {
    let (_, updates) = listed([slice("default", "greeter-a", "greeter")
        .port("grpc", 50051)
        .port_spec(Some("dns"), Some(53), Some("UDP"))
        .port_spec(Some("nonum"), None, None)
        .port_spec(None, Some(8080), None)
        .port_spec(Some(""), Some(8081), Some("TCP"))
        .endpoint(ep("10.0.0.1").zone("a").node("node-1").pod("greeter-1"))
        .endpoint(ep("10.0.0.2").target("Node", "not-a-pod"))
        .endpoint(ep("not-an-ip"))
        .build()]);
    let out = published(&updates);
    assert_eq!(
        out.keys().cloned().collect::<BTreeSet<_>>(),
        keys(&[
            "greeter.default:grpc",
            "greeter.default:8080",
            "greeter.default:8081",
            "greeter.default:50051"
        ]),
        "UDP, number-less and name-less ports handled"
    );
    assert_eq!(
        out[&key("default", "greeter", PortRef::Number(8080))],
        vec![
            endpoint("10.0.0.1", 8080)
                .zone("a")
                .node("node-1")
                .pod("greeter-1"),
            endpoint("10.0.0.2", 8080),
        ]
    );
}

#[test]
fn a_relist_publishes_only_what_changed_and_removes_what_vanished() {
    let greeter = |address: &str| {
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep(address))
            .build()
    };
    let other = slice("default", "other-a", "other")
        .port("http", 80)
        .endpoint(ep("10.0.1.1"))
        .build();
    let gone = slice("default", "gone-a", "gone")
        .port("http", 80)
        .endpoint(ep("10.0.2.1"))
        .build();
    let (mut state, updates) = listed([greeter("10.0.0.1"), other.clone(), gone]);
    assert_eq!(published(&updates).len(), 6);

    assert!(state.handle(Event::Init).is_empty());
    assert!(
        state
            .handle(Event::InitApply(greeter("10.0.0.9")))
            .is_empty()
    );
    assert!(state.handle(Event::InitApply(other)).is_empty());
    let updates = state.handle(Event::InitDone);
    assert_eq!(
        published(&updates).keys().cloned().collect::<BTreeSet<_>>(),
        keys(&["greeter.default:grpc", "greeter.default:50051"]),
        "other is unchanged"
    );
    assert_eq!(
        removed(&updates),
        BTreeSet::from([
            key("default", "gone", named("http")),
            key("default", "gone", PortRef::Number(80))
        ])
    );
    assert_eq!(state.lists(), 2);
    assert_eq!(state.services(), 2);
}

#[test]
fn keys_a_service_no_longer_produces_are_removed() {
    let (mut state, _) = listed([slice("default", "greeter-a", "greeter")
        .port("grpc", 50051)
        .endpoint(ep("10.0.0.1"))
        .build()]);
    let updates = state.handle(Event::Apply(
        slice("default", "greeter-a", "greeter")
            .port("grpc-v2", 50052)
            .endpoint(ep("10.0.0.1"))
            .build(),
    ));
    assert_eq!(
        removed(&updates),
        BTreeSet::from([
            key("default", "greeter", named("grpc")),
            key("default", "greeter", PortRef::Number(50051)),
        ])
    );
    assert_eq!(published(&updates).len(), 2);
}

#[test]
fn a_service_scaled_to_zero_keeps_its_keys_with_no_endpoints() {
    let (mut state, _) = listed([slice("default", "greeter-a", "greeter")
        .port("grpc", 50051)
        .endpoint(ep("10.0.0.1"))
        .build()]);
    // The EndpointSlice controller leaves a slice with no ports and no endpoints.
    let updates = state.handle(Event::Apply(
        slice("default", "greeter-a", "greeter").build(),
    ));
    assert!(removed(&updates).is_empty());
    let published = published(&updates);
    assert_eq!(published.len(), 2);
    assert!(published.values().all(Vec::is_empty));
    // Deleting the last slice removes the service.
    let gone = state.handle(Event::Delete(
        slice("default", "greeter-a", "greeter").build(),
    ));
    assert_eq!(removed(&gone).len(), 2);
}

#[test]
fn a_slice_that_changes_service_or_loses_its_label_moves_with_it() {
    let (mut state, _) = listed([slice("default", "s-1", "greeter")
        .port("grpc", 50051)
        .endpoint(ep("10.0.0.1"))
        .build()]);
    let updates = state.handle(Event::Apply(
        slice("default", "s-1", "greeter")
            .service("renamed")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build(),
    ));
    assert_eq!(removed(&updates).len(), 2);
    assert!(published(&updates).contains_key(&key("default", "renamed", named("grpc"))));

    let updates = state.handle(Event::Apply(
        slice("default", "s-1", "renamed")
            .without_service_label()
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build(),
    ));
    assert_eq!(removed(&updates).len(), 2);
    assert_eq!(state.services(), 0);
}

#[test]
fn services_in_different_namespaces_stay_apart() {
    let (_, updates) = listed([
        slice("a", "greeter-x", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build(),
        slice("b", "greeter-x", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.2"))
            .build(),
    ]);
    let out = published(&updates);
    assert_eq!(
        out[&key("a", "greeter", named("grpc"))],
        vec![endpoint("10.0.0.1", 50051)]
    );
    assert_eq!(
        out[&key("b", "greeter", named("grpc"))],
        vec![endpoint("10.0.0.2", 50051)]
    );
}

#[test]
fn only_a_410_counts_as_gone() {
    let status = |code| kube::core::Status::failure("", "").with_code(code).boxed();
    assert!(gone(&watcher::Error::WatchError(status(410))));
    assert!(gone(&watcher::Error::WatchStartFailed(kube::Error::Api(
        status(410)
    ))));
    assert!(gone(&watcher::Error::InitialListFailed(kube::Error::Api(
        status(410)
    ))));
    assert!(!gone(&watcher::Error::WatchError(status(500))));
    assert!(!gone(&watcher::Error::WatchFailed(kube::Error::Api(
        status(403)
    ))));
    assert!(!gone(&watcher::Error::NoResourceVersion));
}

/// What is kept per slice is only what keys are computed from, and a port's
/// name and number keys share one list: at cluster scale these copies were
/// most of lb-server's memory (`tests/benches/cluster.rs`).
#[test]
fn a_port_name_and_number_share_one_list_and_slices_are_kept_cut_down() {
    let (state, updates) = listed([slice("default", "greeter-a", "greeter")
        .port("grpc", 50051)
        .endpoints(eps(1, 3))
        .label("app.kubernetes.io/name", "greeter")
        .build()]);
    let service = ("default".to_owned(), "greeter".to_owned());
    let published = &state.published[&service];
    let by_name = &published[&key("default", "greeter", named("grpc"))];
    let by_number = &published[&key("default", "greeter", PortRef::Number(50051))];
    assert_eq!(by_name.len(), 3);
    assert!(Arc::ptr_eq(by_name, by_number), "one list for both keys");
    // What goes to the store is that list, not a copy.
    assert_eq!(updates.len(), 2);
    for update in &updates {
        let Update::Publish(_, endpoints) = update else {
            panic!("{update:?}");
        };
        assert!(Arc::ptr_eq(endpoints, by_number));
    }

    let kept = &state.by_service[&service]["greeter-a"];
    assert_eq!(kept.ports, [(Some("grpc".to_owned()), 50051)]);
    assert_eq!(kept.endpoints.len(), 3);
    assert!(kept.endpoints.iter().all(|e| e.port == 0));
}

#[test]
fn hints_come_from_the_slice_and_are_shared_by_endpoints_hinted_alike() {
    let (_, updates) = listed([slice("default", "greeter-a", "greeter")
        .port("grpc", 50051)
        .endpoint(ep("10.0.0.1").zone("a").for_zones(&["a"]))
        .endpoint(ep("10.0.0.2").zone("a").for_zones(&["a"]))
        .endpoint(
            ep("10.0.0.3")
                .zone("b")
                .for_zones(&["a", "b"])
                .for_nodes(&["node-3"]),
        )
        .endpoint(ep("10.0.0.4").zone("b").for_zones(&[]))
        .endpoint(ep("10.0.0.5").zone("b"))
        .build()]);
    let out = published(&updates);
    let list = &out[&key("default", "greeter", named("grpc"))];
    assert_eq!(
        list,
        &vec![
            endpoint("10.0.0.1", 50051).zone("a").for_zones(["a"]),
            endpoint("10.0.0.2", 50051).zone("a").for_zones(["a"]),
            endpoint("10.0.0.3", 50051)
                .zone("b")
                .for_zones(["a", "b"])
                .for_nodes(["node-3"]),
            endpoint("10.0.0.4", 50051).zone("b"),
            endpoint("10.0.0.5", 50051).zone("b"),
        ]
    );
    // Empty hints are no hints, and alike hints are one allocation.
    assert!(list[3].hints.is_none() && list[4].hints.is_none());
    let (first, second) = (list[0].hints.as_ref(), list[1].hints.as_ref());
    assert!(Arc::ptr_eq(first.unwrap(), second.unwrap()));
    assert!(Arc::ptr_eq(
        &list[0].hints().for_zones[0],
        &list[2].hints().for_zones[0]
    ));
}

#[test]
fn a_batch_of_events_publishes_each_changed_service_once_with_the_end_state() {
    let (mut state, _) = listed([
        slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build(),
        slice("default", "other-a", "other")
            .port("http", 80)
            .endpoint(ep("10.0.1.1"))
            .build(),
    ]);
    // A rolling restart's burst to greeter: a pod added, the old one
    // draining, then gone; a second slice appears; other is untouched.
    for event in [
        Event::Apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1"))
                .endpoint(ep("10.0.0.2"))
                .build(),
        ),
        Event::Apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1").draining())
                .endpoint(ep("10.0.0.2"))
                .build(),
        ),
        Event::Apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.2"))
                .build(),
        ),
        Event::Apply(
            slice("default", "greeter-b", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.3"))
                .build(),
        ),
    ] {
        state.stage(event);
    }
    let end = vec![endpoint("10.0.0.2", 50051), endpoint("10.0.0.3", 50051)];
    assert_eq!(
        state.flush(),
        vec![
            Update::Publish(key("default", "greeter", named("grpc")), end.clone().into()),
            Update::Publish(
                key("default", "greeter", PortRef::Number(50051)),
                end.into()
            ),
        ],
        "one publish per key of the one changed service"
    );
    assert!(state.flush().is_empty(), "nothing left staged");

    // A batch that changes a service and changes it back publishes nothing.
    let back = slice("default", "other-a", "other")
        .port("http", 80)
        .endpoint(ep("10.0.1.1"))
        .build();
    state.stage(Event::Delete(back.clone()));
    state.stage(Event::Apply(back));
    assert!(state.flush().is_empty());
}
