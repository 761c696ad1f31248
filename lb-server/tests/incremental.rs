//! Incremental Discovery against full snapshots: a stream that asked for
//! `incremental` updates, applying every diff it gets, holds exactly the list
//! a stream of full snapshots holds, through random changes, service removal
//! and re-creation, and readers that fall behind.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use common::{TestServer, WAIT};
use lb_server::{
    api::convert,
    model::{Endpoint, ServiceKey, parse_target},
    store::{Store, Subscription},
};
use lookaside_proto::lookaside::v1::{self as pb, WatchRequest, discovery_client::DiscoveryClient};
use tokio::{sync::watch, task::JoinHandle};
use tonic::transport::Channel;

const TARGET: &str = "prop.default:grpc";
/// A service the file source knows, so the server has something of its own.
const FILE: &str = "services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50051\n";

/// An endpoint list by identity (address and port), as a reader holds it.
type List = BTreeMap<(String, u32), pb::Endpoint>;

/// What a reader holds after a message.
#[derive(Debug, Clone, Default, PartialEq)]
struct Held {
    version: u64,
    exists: bool,
    endpoints: List,
}

/// How many messages of each kind a reader got.
#[derive(Debug, Default)]
struct Counts {
    full: u64,
    diffs: u64,
}

fn list(endpoints: impl IntoIterator<Item = pb::Endpoint>) -> List {
    endpoints
        .into_iter()
        .map(|e| ((e.address.clone(), e.port), e))
        .collect()
}

/// Watches [`TARGET`] and reads every message in a task of its own, applying
/// it to what it holds; what it holds after each message is on the returned
/// channel. A diff from a version other than the one held fails the reader.
async fn spawn_reader(
    channel: Channel,
    incremental: bool,
) -> (watch::Receiver<Held>, JoinHandle<Counts>) {
    let mut stream = DiscoveryClient::new(channel)
        .max_decoding_message_size(pb::MAX_WATCH_RESPONSE_BYTES)
        .watch(WatchRequest {
            target: TARGET.into(),
            incremental,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = watch::channel(Held::default());
    let task = tokio::spawn(async move {
        let mut counts = Counts::default();
        let mut held = Held::default();
        while let Ok(Some(message)) = stream.message().await {
            if message.incremental {
                assert!(incremental, "a diff on a stream that did not ask for it");
                assert_eq!(
                    message.base_version, held.version,
                    "a diff from a version the reader does not hold"
                );
                assert!(message.version >= held.version);
                for key in &message.removed {
                    assert!(
                        held.endpoints
                            .remove(&(key.address.clone(), key.port))
                            .is_some(),
                        "removed {key:?}, which the reader does not hold"
                    );
                }
                held.endpoints.extend(list(message.endpoints));
                counts.diffs += 1;
            } else {
                assert!(message.version > held.version || counts.full == 0);
                held.endpoints = list(message.endpoints);
                counts.full += 1;
            }
            held.version = message.version;
            held.exists = message.exists;
            tx.send_replace(held.clone());
        }
        counts
    });
    (rx, task)
}

/// The newest snapshot of the service, as a reader should hold it.
fn expected(newest: &mut Subscription) -> Held {
    let snapshot = newest.current();
    Held {
        version: snapshot.version,
        exists: snapshot.exists,
        endpoints: list(snapshot.endpoints.iter().map(convert::endpoint)),
    }
}

/// Waits until `reader` holds `want`'s version, and returns what it holds.
async fn caught_up(reader: &mut watch::Receiver<Held>, want: &Held, seed: u64) -> Held {
    let caught = tokio::time::timeout(WAIT, reader.wait_for(|held| held.version >= want.version))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|held| held.clone());
    caught.unwrap_or_else(|| {
        panic!(
            "seed {seed}: a reader did not reach version {} within {WAIT:?} (it holds {})",
            want.version,
            reader.borrow().version
        )
    })
}

/// A random change to `endpoints`: one added, removed, drained, reweighted or
/// renamed, now and then many at once; `None` to remove the whole service.
fn change(rng: &mut fastrand::Rng, endpoints: &mut BTreeMap<(u8, u16), Endpoint>) -> Option<()> {
    let any = |rng: &mut fastrand::Rng, endpoints: &BTreeMap<(u8, u16), Endpoint>| {
        let keys: Vec<_> = endpoints.keys().copied().collect();
        (!keys.is_empty()).then(|| keys[rng.usize(..keys.len())])
    };
    match rng.u8(..100) {
        0..30 => {
            let id = (rng.u8(..), [8080, 9090][rng.usize(..2)]);
            // Both families, so that identity is not just IPv4 text.
            let address = if id.0 % 5 == 0 {
                format!("fd00::{:x}", id.0)
            } else {
                format!("10.1.{}.{}", id.0 / 100, id.0 % 100)
            };
            let endpoint = Endpoint::new(address.parse().unwrap(), id.1)
                .zone(format!("zone-{}", id.0 % 3))
                .pod(format!("pod-{}-{}", id.0, rng.u16(..)));
            endpoints.insert(id, endpoint);
        }
        30..50 => {
            if let Some(id) = any(rng, endpoints) {
                endpoints.remove(&id);
            }
        }
        50..65 => {
            if let Some(id) = any(rng, endpoints) {
                let endpoint = endpoints.get_mut(&id).unwrap();
                endpoint.draining = !endpoint.draining;
            }
        }
        65..80 => {
            if let Some(id) = any(rng, endpoints) {
                endpoints.get_mut(&id).unwrap().weight = rng.u32(1..=5);
            }
        }
        80..95 => {
            if let Some(id) = any(rng, endpoints) {
                let endpoint = endpoints.get_mut(&id).unwrap();
                endpoint.pod = format!("pod-{}-{}", id.0, rng.u16(..)).into();
                endpoint.node = format!("node-{}", rng.u8(..4)).into();
            }
        }
        95..98 => {
            // Half of them replaced at once: a diff larger than the list.
            let half: Vec<_> = endpoints.keys().copied().filter(|_| rng.bool()).collect();
            for id in half {
                endpoints.remove(&id);
            }
            for _ in 0..rng.usize(..40) {
                let id = rng.u8(..);
                let address = format!("10.2.{}.{}", id / 100, id % 100);
                endpoints.insert((id, 7070), Endpoint::new(address.parse().unwrap(), 7070));
            }
        }
        _ => return None,
    }
    Some(())
}

fn publish(store: &Store, key: &ServiceKey, endpoints: &BTreeMap<(u8, u16), Endpoint>) {
    store.publish(key, endpoints.values().cloned().collect(), Instant::now());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_watch_holds_the_full_list_through_10_000_random_changes() {
    let seed = std::env::var("INCREMENTAL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    // Shown with the test's output when it fails; INCREMENTAL_SEED replays it.
    eprintln!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    // Every change its own version (no coalescing), so that the readers go
    // through thousands of diffs.
    let server = TestServer::start_with(FILE, |config| {
        config.coalesce_window = std::time::Duration::ZERO;
    })
    .await;
    let store = Arc::clone(&server.store);
    let key = parse_target(TARGET).unwrap();
    let mut newest = store.subscribe(&key);

    let mut endpoints = BTreeMap::new();
    for _ in 0..20 {
        change(&mut rng, &mut endpoints);
    }
    publish(&store, &key, &endpoints);
    let (mut incremental, incremental_task) = spawn_reader(server.channel().await, true).await;
    let (mut full, full_task) = spawn_reader(server.channel().await, false).await;

    let mut exists = true;
    let mut checks = 0;
    for step in 0..10_000 {
        match change(&mut rng, &mut endpoints) {
            Some(()) => {
                publish(&store, &key, &endpoints);
                exists = true;
            }
            None if exists => {
                store.remove(&key, Instant::now());
                exists = false;
            }
            // Removed already: the next change re-creates it.
            None => {}
        }
        // Now and then, at every change for a stretch of each thousand (so
        // the readers see single changes as well as bursts they skip through),
        // and at the end: both readers hold the newest list.
        if step % 1_000 < 200 || rng.u8(..20) == 0 || step == 9_999 {
            let want = expected(&mut newest);
            let got = caught_up(&mut incremental, &want, seed).await;
            assert_eq!(
                got, want,
                "seed {seed}, step {step}: the incremental reader"
            );
            assert_eq!(
                caught_up(&mut full, &want, seed).await,
                want,
                "seed {seed}, step {step}: the full reader"
            );
            checks += 1;
        }
    }
    server.shutdown().await.unwrap();
    let incremental = incremental_task.await.expect("the incremental reader");
    let full = full_task.await.expect("the full reader");
    eprintln!("{checks} checks; incremental: {incremental:?}; full: {full:?}");
    assert!(checks > 100, "seed {seed}: {checks} checks");
    assert_eq!(full.diffs, 0);
    // Diffs, and full snapshots for removals, re-creations and large changes.
    assert!(
        incremental.diffs > 2_000 && incremental.full > 10,
        "seed {seed}: {incremental:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_gets_the_diff_to_the_newest() {
    const CHANGES: u16 = 5_000;
    let server = TestServer::start(FILE).await;
    let store = Arc::clone(&server.store);
    let key = parse_target(TARGET).unwrap();
    let mut newest = store.subscribe(&key);
    // Long pod names: each diff is large enough that the stream's HTTP/2
    // window and the server's send buffer fill long before the last change.
    let endpoint = |i: u16, round: u16| {
        let address = format!("10.3.{}.{}", i / 200, i % 200);
        Endpoint::new(address.parse().unwrap(), 80).pod(format!("{}-{round}", "p".repeat(200)))
    };
    let mut endpoints: Vec<_> = (0..100).map(|i| endpoint(i, 0)).collect();
    store.publish(&key, endpoints.clone(), Instant::now());

    let mut stream = DiscoveryClient::new(server.channel().await)
        .watch(WatchRequest {
            target: TARGET.into(),
            incremental: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = common::next_update(&mut stream).await;
    assert!(!first.incremental);
    let mut held = list(first.endpoints);
    let mut version = first.version;

    // The reader stops reading while the service changes CHANGES times.
    for round in 1..=CHANGES {
        let i = round % 100;
        endpoints[usize::from(i)] = endpoint(i, round);
        store.publish(&key, endpoints.clone(), Instant::now());
    }
    let want = expected(&mut newest);
    let mut messages = 0;
    while version < want.version {
        let message = common::next_update(&mut stream).await;
        messages += 1;
        if message.incremental {
            assert_eq!(
                message.base_version, version,
                "a diff from a version not held"
            );
            for key in &message.removed {
                held.remove(&(key.address.clone(), key.port));
            }
            held.extend(list(message.endpoints));
        } else {
            held = list(message.endpoints);
        }
        version = message.version;
    }
    assert_eq!(version, want.version);
    assert_eq!(held, want.endpoints);
    assert!(
        messages < CHANGES,
        "the reader was sent all {messages} versions: it never fell behind"
    );
    server.shutdown().await.unwrap();
}
