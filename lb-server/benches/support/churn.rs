//! The fan-out benchmark's churn modes (issue 14), on its own machinery
//! (lb-server as a process, lean subscribers, kernel receive timestamps):
//!
//! - `scale [SIZES...]`: one changed endpoint (one added per round) in a
//!   service of 10, 100, 1,000 and 5,000 endpoints (or SIZES), watched by
//!   `FANOUT_SUBSCRIBERS` (default 1,000) Discovery subscribers, with full
//!   snapshots and with incremental updates, each on a fresh server over the
//!   file source: bytes per subscriber per change, server CPU per push net of
//!   what the change costs with one subscriber (reading the file,
//!   publishing), p99 to all.
//! - `restart [PODS]`: a rolling restart of a PODS-pod service (default
//!   1,000; 25% surge: a quarter of the pods are replaced at once, see
//!   `schedule`), watched by `FANOUT_SUBSCRIBERS` subscribers that read live
//!   and hold the whole list; full vs incremental, with each coalescing
//!   window of `FANOUT_WINDOWS` (default `0,` and lb-server's default), over
//!   each source of `FANOUT_SOURCE` (default `file,kube`), side by side:
//!   - `file`: the YAML file is rewritten with every event due, at most every
//!     `FANOUT_TICK` (default 10ms); lb-server parses the whole file each
//!     time. A marker endpoint's weight numbers the writes.
//!   - `kube`: lb-server's Kubernetes source watches EndpointSlices on the
//!     API stand-in of `lookaside-tests` (on a runtime of its own in this
//!     process), kept as the EndpointSlice controller keeps them (`Slices`:
//!     at most 100 pods a slice, the old pods in PODS / 100; a new ready pod in the
//!     first slice with room, else a new one; a draining pod ready=false,
//!     serving=true, terminating=true; a gone pod removed), one apply of the
//!     changed slice per event, at its time. Each slice also holds one marker
//!     endpoint `10.254.X.Y`, renumbered to the apply's sequence number in the
//!     slice applied; a list holds every apply up to its largest marker.
//!
//!   Markers are not pods: they count in neither ready pods nor the slice's
//!   100. Server CPU per pod replaced, bytes, versions, p50/p99/max time from
//!   a change (the write's rename, or the apply call) to when the last
//!   subscriber's socket received a list holding it, and the fewest ready
//!   pods any subscriber held.
//!
//! `FANOUT_UPDATES=incremental` (or `full`) runs only those rows of the restart
//! (default both). `FANOUT_REPEAT=N` runs every case N times, in turn. A case fails if a
//! subscriber does not hold the last change `FANOUT_SETTLE` (default 120s)
//! after it was made.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Buf;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lookaside_proto::lookaside::v1::WatchRequest;
use lookaside_tests::kube_api::{KubeApi, ep, slice};
use prost::Message;
use tokio::sync::Semaphore;

use super::{
    Client, LeanCall, Protocol, Reads, Row, Service, TARGET, Transport, WATCH_PATH,
    WatchResponseLite, hold_for, ms, percentile, perf_control, process_cpu, run, start_kube_server,
    start_server, write_atomic,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The 1-minute load average, to show what else ran on the machine.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    let subscribers: usize = env_or("FANOUT_SUBSCRIBERS", 1_000);
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    assert!(
        limit as usize > subscribers + 100,
        "open-file limit {limit} is too low"
    );
    // One thread, as the fan-out benchmark's subscribers: the least CPU taken
    // from the server on this machine.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Benchmark 1: bytes and CPU per change against the service's size.
pub(crate) fn scale(args: &[String]) {
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![10, 100, 1_000, 5_000];
    }
    let subscribers: usize = env_or("FANOUT_SUBSCRIBERS", 1_000);
    let rounds: usize = env_or("FANOUT_ROUNDS", 5);
    let repeat: usize = env_or("FANOUT_REPEAT", 1);
    let live = std::env::var("FANOUT_READS").as_deref() == Ok("live");
    let runtime = runtime();
    let mut rows: Vec<(Row, String)> = Vec::new();
    for _ in 0..repeat {
        for &endpoints in &sizes {
            for incremental in [false, true] {
                let before = load();
                let reads = if live {
                    Reads::Live
                } else {
                    Reads::Held(hold_for(subscribers))
                };
                let service = Service {
                    endpoints,
                    incremental,
                    source_cost: true,
                };
                let row = run(
                    &runtime,
                    Protocol::Discovery,
                    Client::Lean,
                    (Transport::Plain, None),
                    (subscribers, rounds, reads),
                    service,
                );
                rows.push((row, format!("{before} / {}", load())));
            }
        }
    }
    let reads = if live {
        "live reads"
    } else {
        "reads held during the fan-out"
    };
    println!(
        "\nscale: one endpoint added to a service of N endpoints, {subscribers} lean Discovery subscribers on 1 thread ({reads}), {rounds} changes each, a fresh server per row\n"
    );
    println!(
        "| endpoints | updates | bytes / subscriber / change | server CPU µs / push (net of source) | server CPU ms / change | of which source (1 subscriber) ms | p50 ms | p99 ms | max ms | arrived after hold | load 1m before / after |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let net = |row: &Row| {
        let source = row.source_cpu_per_change.unwrap_or_default();
        row.server_cpu_per_change
            .saturating_sub(source)
            .as_secs_f64()
            * 1e6
            / row.subscribers as f64
    };
    for (row, load) in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            row.service.endpoints,
            if row.service.incremental {
                "incremental"
            } else {
                "full"
            },
            row.bytes_per_push,
            net(row),
            ms(row.server_cpu_per_change),
            ms(row.source_cpu_per_change.unwrap_or_default()),
            ms(row.p50),
            ms(row.p99),
            ms(row.max),
            row.after_hold
                .map_or_else(|| "–".to_owned(), |n| n.to_string()),
            load,
        );
    }
    // Goals, per repeat: incremental bytes ≤ 1 KiB at every size; net CPU per
    // push at the largest size within 1.5× of the smallest.
    let (small, large) = (sizes[0], *sizes.last().unwrap());
    for turn in rows.chunks(sizes.len() * 2) {
        let find = |endpoints: usize, incremental: bool| {
            turn.iter()
                .map(|(row, _)| row)
                .find(|r| r.service.endpoints == endpoints && r.service.incremental == incremental)
                .unwrap()
        };
        let most_bytes = turn
            .iter()
            .filter(|(r, _)| r.service.incremental)
            .map(|(r, _)| r.bytes_per_push)
            .fold(0.0, f64::max);
        let cpu_ratio = net(find(large, true)) / net(find(small, true));
        println!(
            "\nincremental: most bytes / change {most_bytes:.0} (goal ≤ 1024: {}); net CPU / push at {large} / at {small} = {:.2} / {:.2} = {cpu_ratio:.2}× (goal ≤ 1.5×: {}); full / incremental bytes at {large}: {:.0}×",
            if most_bytes <= 1024.0 {
                "met"
            } else {
                "missed"
            },
            net(find(large, true)),
            net(find(small, true)),
            if cpu_ratio <= 1.5 { "met" } else { "missed" },
            find(large, false).bytes_per_push / find(large, true).bytes_per_push,
        );
    }
}

/// The rolling restart's address of the old (`generation` 0) or new pod `i`.
fn pod_address(generation: u8, i: usize) -> String {
    format!("10.{generation}.{}.{}", i / 250, i % 250)
}

/// An endpoint outside the restart whose weight numbers the file writes, so
/// that a subscriber knows which writes its list holds.
const MARKER: &str = "10.255.255.254";

/// EndpointSlices have no weights: over the kube source every slice holds
/// one marker endpoint `10.254.X.Y` outside the restart, re-numbered to the
/// apply's sequence number (X * 256 + Y) in the slice being applied.
const KUBE_MARKER_PREFIX: &str = "10.254.";

fn kube_marker(seq: u64) -> String {
    format!("{KUBE_MARKER_PREFIX}{}.{}", seq / 256, seq % 256)
}

/// Whether `address` is a marker (either source's), not a pod.
fn is_marker(address: &[u8]) -> bool {
    address == MARKER.as_bytes() || address.starts_with(KUBE_MARKER_PREFIX.as_bytes())
}

/// The change an endpoint marks: the file marker's weight, or the number a
/// kube marker's address spells; `None` for a pod.
fn marker_of(e: &EndpointFields<'_>) -> Option<u64> {
    if e.address == MARKER.as_bytes() {
        return Some(e.weight);
    }
    let rest = e.address.strip_prefix(KUBE_MARKER_PREFIX.as_bytes())?;
    let (high, low) = std::str::from_utf8(rest).ok()?.split_once('.')?;
    Some(high.parse::<u64>().ok()? * 256 + low.parse::<u64>().ok()?)
}

/// Where lb-server reads the restart from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A YAML file, rewritten whole with every event due (at most every tick).
    File,
    /// EndpointSlices on the Kubernetes API stand-in, one apply per event.
    Kube,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Kube => "kube",
        }
    }
}

/// The most endpoints the EndpointSlice controller puts in one slice (its
/// `--max-endpoints-per-slice` default); the marker comes on top.
const SLICE_CAPACITY: usize = 100;

/// A pod in an EndpointSlice: its generation (0 old, 1 new), index, and
/// whether it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlicePod {
    generation: u8,
    index: usize,
    draining: bool,
}

/// The restart's EndpointSlices, as the EndpointSlice controller keeps them:
/// the old pods fill slices of [`SLICE_CAPACITY`]; a new ready pod goes into
/// the first slice with room, else a new one; a draining pod stays in its
/// slice (ready=false, serving=true, terminating=true); a gone pod leaves it.
/// Emptied slices stay (with their marker), as the controller keeps them for
/// reuse while the service has pods.
struct Slices {
    slices: Vec<Vec<SlicePod>>,
}

impl Slices {
    fn new(pods: usize) -> Self {
        let old: Vec<SlicePod> = (0..pods)
            .map(|index| SlicePod {
                generation: 0,
                index,
                draining: false,
            })
            .collect();
        Self {
            slices: old.chunks(SLICE_CAPACITY).map(<[_]>::to_vec).collect(),
        }
    }

    /// Applies one event; returns the index of the slice it changed.
    fn apply(&mut self, event: &Event) -> usize {
        let old_pod = |p: &SlicePod| p.generation == 0 && p.index == event.pod;
        let find_old = |slices: &[Vec<SlicePod>]| {
            slices
                .iter()
                .enumerate()
                .find_map(|(s, pods)| pods.iter().position(old_pod).map(|i| (s, i)))
                .expect("the old pod is in a slice")
        };
        match event.what {
            What::NewReady => {
                let pod = SlicePod {
                    generation: 1,
                    index: event.pod,
                    draining: false,
                };
                match self
                    .slices
                    .iter()
                    .position(|pods| pods.len() < SLICE_CAPACITY)
                {
                    Some(s) => {
                        self.slices[s].push(pod);
                        s
                    }
                    None => {
                        self.slices.push(vec![pod]);
                        self.slices.len() - 1
                    }
                }
            }
            What::OldDraining => {
                let (s, i) = find_old(&self.slices);
                self.slices[s][i].draining = true;
                s
            }
            What::OldGone => {
                let (s, i) = find_old(&self.slices);
                self.slices[s].remove(i);
                s
            }
        }
    }

    /// Slice `s` as an object, its marker numbered `seq`.
    fn object(&self, s: usize, seq: u64) -> EndpointSlice {
        let (namespace, service) = (TARGET_NAMESPACE, TARGET_SERVICE);
        slice(namespace, &format!("{service}-{s:03}"), service)
            .port(TARGET_PORT, 8080)
            .endpoints(self.slices[s].iter().map(|pod| {
                let endpoint = ep(&pod_address(pod.generation, pod.index))
                    .zone(&format!("zone-{}", pod.index % 3))
                    .pod(&format!("{service}-{}-{}", pod.generation, pod.index));
                if pod.draining {
                    endpoint.draining()
                } else {
                    endpoint
                }
            }))
            .endpoint(ep(&kube_marker(seq)))
            .build()
    }

    /// Whether every old pod is gone and every new one is in a slice.
    fn done(&self, pods: usize) -> bool {
        let held: Vec<&SlicePod> = self.slices.iter().flatten().collect();
        held.len() == pods && held.iter().all(|p| p.generation == 1 && !p.draining)
    }
}

/// [`TARGET`]'s namespace, service and port name.
const TARGET_NAMESPACE: &str = "default";
const TARGET_SERVICE: &str = "bench";
const TARGET_PORT: &str = "grpc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Old {
    Ready,
    Draining,
    Gone,
}

/// What happens to pod `pod` at `at` after the restart starts.
#[derive(Debug, Clone, Copy)]
struct Event {
    at: Duration,
    pod: usize,
    what: What,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    NewReady,
    OldDraining,
    OldGone,
}

/// The restart as a Deployment with maxSurge 25% and maxUnavailable 0 does
/// it: a quarter of the pods at a time get a new pod, which becomes ready
/// after 0.5 to 1.5 s; then the old one drains (20 ms later, as the
/// controller and kubelet react) and goes a second after that; a freed surge
/// slot starts the next pod when the new one is ready.
fn schedule(pods: usize, seed: u64) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let surge = pods.div_ceil(4);
    let mut events = Vec::with_capacity(pods * 3);
    for slot in 0..surge {
        let mut at = Duration::ZERO;
        for pod in (slot..pods).step_by(surge) {
            at += Duration::from_millis(rng.u64(500..1_500));
            let drain = at + Duration::from_millis(20);
            events.push(Event {
                at,
                pod,
                what: What::NewReady,
            });
            events.push(Event {
                at: drain,
                pod,
                what: What::OldDraining,
            });
            events.push(Event {
                at: drain + Duration::from_secs(1),
                pod,
                what: What::OldGone,
            });
        }
    }
    events.sort_by_key(|e| e.at);
    events
}

/// The service's file: old pods (draining or not), ready new pods, and the
/// marker weighted `write` (from 1).
fn restart_file(old: &[Old], new: &[bool], write: usize) -> String {
    let mut yaml = format!("services:\n  {TARGET}:\n");
    for (i, state) in old.iter().enumerate() {
        if *state == Old::Gone {
            continue;
        }
        yaml += &format!(
            "    - address: {}:8080\n      zone: zone-{}\n",
            pod_address(0, i),
            i % 3
        );
        if *state == Old::Draining {
            yaml += "      draining: true\n";
        }
    }
    for (i, _) in new.iter().enumerate().filter(|(_, ready)| **ready) {
        yaml += &format!(
            "    - address: {}:8080\n      zone: zone-{}\n",
            pod_address(1, i),
            i % 3
        );
    }
    yaml += &format!("    - address: {MARKER}:1\n      weight: {write}\n");
    yaml
}

/// What the subscribers share during a restart.
struct Restart {
    base: Instant,
    base_wall: SystemTime,
    pods: usize,
    /// Per change (file write or slice apply, by marker number): when the
    /// last subscriber's socket received a list holding it, in nanoseconds
    /// since `base`.
    all_arrived: Vec<AtomicU64>,
    /// Per change: when the first subscriber's socket received it (for
    /// `FANOUT_TRACE`: the fan-out's spread is the last minus the first).
    first_arrived: Vec<AtomicU64>,
    /// Per subscriber: the marker of the newest change its list holds, and
    /// how many messages it received after its first snapshot.
    held: Vec<AtomicU64>,
    messages: Vec<AtomicU64>,
    /// Bytes, and full snapshots after the first, over all subscribers.
    bytes: AtomicU64,
    resyncs: AtomicU64,
    /// The fewest ready (not draining) pods any subscriber held.
    fewest_ready: AtomicUsize,
}

/// The fields of a `lookaside.v1.Endpoint` (or `EndpointKey`) this
/// benchmark needs, read without allocating.
#[derive(Debug, Default, PartialEq, Eq)]
struct EndpointFields<'a> {
    address: &'a [u8],
    port: u64,
    weight: u64,
    draining: bool,
}

/// An address's text (IPv4 in this benchmark: at most 15 bytes) as one
/// number, for a key that is cheap to hash and compare.
fn packed(address: &[u8]) -> u128 {
    assert!(address.len() < 16, "an IPv4 address's text");
    let mut bytes = [0u8; 16];
    bytes[..address.len()].copy_from_slice(address);
    bytes[15] = address.len() as u8;
    u128::from_le_bytes(bytes)
}

/// A multiply-rotate hasher for the subscribers' lists (keys are numbers
/// from this benchmark, not input an attacker picks).
#[derive(Default, Clone, Copy)]
struct Mixer(u64);

impl std::hash::Hasher for Mixer {
    fn finish(&self) -> u64 {
        // The table picks buckets by the low bits: fold the high ones in.
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u128(&mut self, word: u128) {
        self.write_u64(word as u64);
        self.write_u64((word >> 64) as u64);
    }
}

type Mix = std::hash::BuildHasherDefault<Mixer>;

fn varint(buf: &mut &[u8]) -> u64 {
    prost::encoding::decode_varint(buf).expect("a varint")
}

fn endpoint_fields(mut buf: &[u8]) -> EndpointFields<'_> {
    let mut fields = EndpointFields::default();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        match (key >> 3, key & 7) {
            (1, 2) => {
                let len = varint(&mut buf) as usize;
                fields.address = &buf[..len];
                buf = &buf[len..];
            }
            (2, 0) => fields.port = varint(&mut buf),
            (3, 0) => fields.weight = varint(&mut buf),
            (7, 0) => fields.draining = varint(&mut buf) != 0,
            (_, 0) => {
                varint(&mut buf);
            }
            (_, 2) => {
                let len = varint(&mut buf) as usize;
                buf.advance(len);
            }
            other => panic!("unexpected wire type {other:?}"),
        }
    }
    fields
}

/// One restart subscriber: holds the whole list (from full snapshots, or by
/// applying diffs), checks its ready pods after every message, and notes
/// which changes its list holds.
async fn restart_subscriber(
    addr: std::net::SocketAddr,
    id: usize,
    incremental: bool,
    ready: impl FnOnce(),
    shared: Arc<Restart>,
) {
    let request = WatchRequest {
        target: TARGET.into(),
        incremental,
        ..Default::default()
    };
    let mut call = LeanCall::start(addr, None, WATCH_PATH, &request, false)
        .await
        .unwrap();
    // (address, port) -> (weight, draining), and marker address -> the
    // change it marks; only on incremental streams. Keyed by the address's
    // text packed into a number and hashed by `Mix`: a thousand subscribers
    // share this machine's two CPUs with lb-server, so what they spend per
    // message is taken from the server.
    let mut list: HashMap<(u128, u64), (u64, bool), Mix> = HashMap::default();
    let mut markers: HashMap<u128, u64, Mix> = HashMap::default();
    let mut list_ready = 0usize;
    let mut held_write = 0u64;
    let mut received = 0u64;
    let mut ready = Some(ready);
    while let Ok(Some(message)) = call.next().await {
        let update = WatchResponseLite::decode(message).unwrap();
        let (ready_pods, marker) = if incremental {
            if !update.incremental {
                list.clear();
                markers.clear();
                list_ready = 0;
            }
            // Ready pods and the marker kept up to date as the diff applies.
            let unset = |old: Option<(u64, bool)>, ready: &mut usize| {
                if let Some((_, false)) = old {
                    *ready -= 1;
                }
            };
            for key in &update.removed {
                let key = endpoint_fields(key);
                if is_marker(key.address) {
                    markers.remove(&packed(key.address));
                    continue;
                }
                let old = list.remove(&(packed(key.address), key.port));
                unset(old, &mut list_ready);
            }
            for endpoint in &update.endpoints {
                let e = endpoint_fields(endpoint);
                if let Some(marker) = marker_of(&e) {
                    markers.insert(packed(e.address), marker);
                    continue;
                }
                let old = list.insert((packed(e.address), e.port), (e.weight, e.draining));
                unset(old, &mut list_ready);
                if !e.draining {
                    list_ready += 1;
                }
            }
            // The list holds every change up to its newest marker: lb-server
            // applies the changes in order.
            (list_ready, markers.values().copied().max().unwrap_or(0))
        } else {
            let mut ready_pods = 0;
            let mut marker = 0;
            for endpoint in &update.endpoints {
                let e = endpoint_fields(endpoint);
                if let Some(number) = marker_of(&e) {
                    marker = marker.max(number);
                } else if !e.draining {
                    ready_pods += 1;
                }
            }
            (ready_pods, marker)
        };
        let Some(first) = ready.take() else {
            // After the first snapshot: count and time it.
            shared.messages[id].fetch_add(1, Ordering::Relaxed);
            if incremental && !update.incremental {
                shared.resyncs.fetch_add(1, Ordering::Relaxed);
            }
            shared
                .bytes
                .fetch_add(call.received() - received, Ordering::Relaxed);
            received = call.received();
            shared.fewest_ready.fetch_min(ready_pods, Ordering::Relaxed);
            if marker > held_write {
                let arrived = call
                    .arrived()
                    .and_then(|at| at.duration_since(shared.base_wall).ok())
                    .unwrap_or_else(|| shared.base.elapsed())
                    .as_nanos() as u64;
                for write in held_write + 1..=marker {
                    shared.all_arrived[write as usize].fetch_max(arrived, Ordering::Relaxed);
                    shared.first_arrived[write as usize].fetch_min(arrived, Ordering::Relaxed);
                }
                held_write = marker;
                shared.held[id].store(marker, Ordering::Release);
            }
            continue;
        };
        assert!(
            ready_pods >= shared.pods && marker > 0,
            "the first snapshot"
        );
        held_write = marker;
        shared.held[id].store(marker, Ordering::Release);
        received = call.received();
        first();
    }
}

/// One restart case's outcome.
struct RestartRow {
    source: Source,
    incremental: bool,
    window: Duration,
    pods: usize,
    subscribers: usize,
    changes: usize,
    duration: Duration,
    server_cpu: Duration,
    bench_cpu: Duration,
    /// Of `bench_cpu`, the Kubernetes API stand-in's threads.
    stand_in_cpu: Option<Duration>,
    bytes: u64,
    messages: u64,
    most_messages: u64,
    resyncs: u64,
    fewest_ready: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    load: String,
}

/// The restart's source, holding the state before the restart, and what
/// makes its changes.
enum Changer {
    /// The file, rewritten with every event due at most every `tick`.
    File {
        file: std::path::PathBuf,
        tick: Duration,
    },
    /// The stand-in, one apply of the changed slice per event.
    Kube { api: Arc<KubeApi>, slices: Slices },
}

impl Changer {
    /// Makes the events' changes as they fall due after `started`. Returns
    /// when each change was made (since `base`), by its marker's number, and
    /// the first number of the restart (lower ones mark the state before).
    fn run(
        self,
        events: &[Event],
        pods: usize,
        started: Instant,
        base: Instant,
    ) -> (Vec<Duration>, usize) {
        let wait_until = |due: Instant| {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        };
        match self {
            Changer::File { file, tick } => {
                let mut old = vec![Old::Ready; pods];
                let mut new = vec![false; pods];
                // Marker 1 is the file before the restart (0 is unused).
                let mut written = vec![Duration::ZERO, Duration::ZERO];
                let mut next = 0;
                let mut last_write = started;
                while next < events.len() {
                    wait_until((started + events[next].at).max(last_write + tick));
                    let now = started.elapsed();
                    while next < events.len() && events[next].at <= now {
                        let Event { pod, what, .. } = events[next];
                        match what {
                            What::NewReady => new[pod] = true,
                            What::OldDraining => old[pod] = Old::Draining,
                            What::OldGone => old[pod] = Old::Gone,
                        }
                        next += 1;
                    }
                    let text = restart_file(&old, &new, written.len());
                    written.push(base.elapsed());
                    write_atomic(&file, &text);
                    last_write = Instant::now();
                }
                assert!(old.iter().all(|o| *o == Old::Gone) && new.iter().all(|n| *n));
                (written, 2)
            }
            Changer::Kube { api, mut slices } => {
                // Markers 1..=N are the N slices before the restart.
                let first = slices.slices.len() + 1;
                let mut written = vec![Duration::ZERO; first];
                for event in events {
                    wait_until(started + event.at);
                    let changed = slices.apply(event);
                    let object = slices.object(changed, written.len() as u64);
                    written.push(base.elapsed());
                    api.apply(object);
                }
                assert!(slices.done(pods), "every old pod replaced");
                (written, first)
            }
        }
    }
}

/// The CPU time of this process's threads named `kube-api` (the stand-in's
/// runtime) so far.
fn stand_in_thread_cpu() -> Duration {
    super::server::thread_times(std::process::id())
        .iter()
        .filter(|(name, ..)| name.starts_with("kube-api"))
        .map(|(_, run, _)| *run)
        .sum()
}

#[allow(clippy::too_many_arguments)] // one case of the benchmark's matrix
fn restart_case(
    runtime: &tokio::runtime::Runtime,
    source: Source,
    pods: usize,
    subscribers: usize,
    incremental: bool,
    window: Duration,
    seed: u64,
    tick: Duration,
) -> RestartRow {
    let load_before = load();
    // How long after the last change every subscriber must hold it.
    let settle = lb_server::config::parse_duration(
        &std::env::var("FANOUT_SETTLE").unwrap_or_else(|_| "120s".into()),
    )
    .unwrap();
    let events = schedule(pods, seed);
    let dir = tempfile::tempdir().unwrap();
    let window_flag = format!("{}ms", window.as_millis());
    let server_flags = ["--coalesce-window", window_flag.as_str()];
    // The stand-in serves from a runtime of its own, as an API server runs
    // apart from the subscribers.
    let mut stand_in = None;
    let (server, changer) = match source {
        Source::File => {
            let file = dir.path().join("lb.yaml");
            write_atomic(
                &file,
                &restart_file(&vec![Old::Ready; pods], &vec![false; pods], 1),
            );
            let server = start_server(&file, None, &server_flags);
            (server, Changer::File { file, tick })
        }
        Source::Kube => {
            let api_runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("kube-api")
                .enable_all()
                .build()
                .unwrap();
            let api = Arc::new(api_runtime.block_on(KubeApi::start()));
            let slices = Slices::new(pods);
            for s in 0..slices.slices.len() {
                api.apply(slices.object(s, s as u64 + 1));
            }
            let server = start_kube_server(&api.kubeconfig(dir.path()), &server_flags);
            stand_in = Some((api_runtime, api.clone()));
            (server, Changer::Kube { api, slices })
        }
    };
    // At most one change per event, plus those before the restart.
    let changes = events.len() + pods.div_ceil(SLICE_CAPACITY) + 2;
    let shared = Arc::new(Restart {
        base: Instant::now(),
        base_wall: SystemTime::now(),
        pods,
        all_arrived: (0..changes).map(|_| AtomicU64::new(0)).collect(),
        first_arrived: (0..changes).map(|_| AtomicU64::new(u64::MAX)).collect(),
        held: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
        messages: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
        bytes: AtomicU64::new(0),
        resyncs: AtomicU64::new(0),
        fewest_ready: AtomicUsize::new(usize::MAX),
    });
    runtime.block_on(async {
        let connecting = Arc::new(Semaphore::new(256));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for id in 0..subscribers {
            let permit = connecting.clone().acquire_owned().await.unwrap();
            let ready_tx = ready_tx.clone();
            let shared = shared.clone();
            let addr = server.grpc;
            tokio::spawn(async move {
                let ready = move || {
                    drop(permit);
                    ready_tx.send(()).unwrap();
                };
                restart_subscriber(addr, id, incremental, ready, shared).await;
            });
        }
        for _ in 0..subscribers {
            ready_rx.recv().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    });

    let cpu_before = server.cpu();
    let own_before = process_cpu(std::process::id());
    let stand_in_before = stand_in_thread_cpu();
    perf_control("enable");
    let started = Instant::now();
    let changer = {
        let base = shared.base;
        std::thread::spawn(move || changer.run(&events, pods, started, base))
    };
    // The subscribers run while this thread waits in `block_on`.
    let (written, first) = runtime.block_on(async {
        while !changer.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (written, first) = changer.join().unwrap();
        let last = written.len() as u64 - 1;
        let settled = tokio::time::timeout(settle, async {
            while shared.held.iter().any(|h| h.load(Ordering::Acquire) < last) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if settled.is_err() {
            let held: Vec<u64> = shared
                .held
                .iter()
                .map(|h| h.load(Ordering::Acquire))
                .collect();
            panic!(
                "{} {} {} ms: {} of {subscribers} subscribers do not hold the last change ({last}) {:.0} s after it (the furthest behind holds {}; load {}); FANOUT_SETTLE raises the bound",
                source.name(),
                if incremental { "incremental" } else { "full" },
                window.as_millis(),
                held.iter().filter(|&&h| h < last).count(),
                settle.as_secs_f64(),
                held.iter().min().unwrap_or(&0),
                load(),
            );
        }
        (written, first)
    });
    let duration = started.elapsed();
    perf_control("disable");
    let server_cpu = server.cpu() - cpu_before;
    let bench_cpu = process_cpu(std::process::id()) - own_before;
    let stand_in_cpu = stand_in
        .as_ref()
        .map(|_| stand_in_thread_cpu() - stand_in_before);
    // Change c (marked c) reached its last subscriber at all_arrived[c].
    let mut latencies: Vec<Duration> = written
        .iter()
        .enumerate()
        .skip(first)
        .map(|(c, at)| {
            let arrived = shared.all_arrived[c].load(Ordering::Relaxed);
            Duration::from_nanos(arrived).saturating_sub(*at)
        })
        .collect();
    if let Ok(path) = std::env::var("FANOUT_TRACE") {
        // Each change's time into the restart, its latency to the first
        // subscriber and to the last, in order.
        let trace: String = written
            .iter()
            .enumerate()
            .skip(first)
            .zip(&latencies)
            .map(|((c, at), latency)| {
                let first = Duration::from_nanos(shared.first_arrived[c].load(Ordering::Relaxed));
                format!(
                    "{:.1} {:.1} {:.1}\n",
                    ms(*at),
                    ms(first.saturating_sub(*at)),
                    ms(*latency)
                )
            })
            .collect();
        std::fs::write(
            format!("{path}.{}.{}.{}", source.name(), window.as_millis(), seed),
            trace,
        )
        .unwrap();
    }
    latencies.sort();
    drop(server);
    drop(stand_in);
    RestartRow {
        source,
        incremental,
        window,
        pods,
        subscribers,
        changes: written.len() - first,
        duration,
        server_cpu,
        bench_cpu,
        stand_in_cpu,
        bytes: shared.bytes.load(Ordering::Relaxed),
        messages: shared
            .messages
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .sum(),
        most_messages: shared
            .messages
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0),
        resyncs: shared.resyncs.load(Ordering::Relaxed),
        fewest_ready: shared.fewest_ready.load(Ordering::Relaxed),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        max: *latencies.last().unwrap(),
        load: format!("{load_before} / {}", load()),
    }
}

/// Benchmark 2: a rolling restart.
pub(crate) fn restart(args: &[String]) {
    let pods = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000usize);
    let subscribers: usize = env_or("FANOUT_SUBSCRIBERS", 1_000);
    let repeat: usize = env_or("FANOUT_REPEAT", 1);
    let windows: Vec<Duration> = std::env::var("FANOUT_WINDOWS")
        .unwrap_or_else(|_| format!("0,{}", lb_server::config::DEFAULT_COALESCE_WINDOW))
        .split(',')
        .map(|w| lb_server::config::parse_duration(w).unwrap())
        .collect();
    let sources: Vec<Source> = std::env::var("FANOUT_SOURCE")
        .unwrap_or_else(|_| "file,kube".into())
        .split(',')
        .map(|s| match s.trim() {
            "file" => Source::File,
            "kube" => Source::Kube,
            other => panic!("FANOUT_SOURCE names file and kube, not {other}"),
        })
        .collect();
    let tick = lb_server::config::parse_duration(
        &std::env::var("FANOUT_TICK").unwrap_or_else(|_| "10ms".into()),
    )
    .unwrap();
    let updates: Vec<bool> = std::env::var("FANOUT_UPDATES")
        .unwrap_or_else(|_| "full,incremental".into())
        .split(',')
        .map(|u| match u.trim() {
            "full" => false,
            "incremental" => true,
            other => panic!("FANOUT_UPDATES names full and incremental, not {other}"),
        })
        .collect();
    let runtime = runtime();
    let mut rows = Vec::new();
    for turn in 0..repeat {
        for &source in &sources {
            for &coalesce in &windows {
                for &incremental in &updates {
                    let row = restart_case(
                        &runtime,
                        source,
                        pods,
                        subscribers,
                        incremental,
                        coalesce,
                        turn as u64,
                        tick,
                    );
                    // Progress, as each case takes a while.
                    eprintln!("{}", row.line());
                    rows.push(row);
                }
            }
        }
    }
    println!(
        "\nrolling restart: {pods} pods (25% surge), {subscribers} lean Discovery subscribers on 1 thread reading live and holding the whole list, a fresh server per row; file: the file rewritten at most every {} ms; kube: one EndpointSlice apply per event on the API stand-in\n",
        tick.as_millis()
    );
    println!(
        "| source | updates | coalesce window | restart s | changes | versions (most one subscriber got) | messages / subscriber | full resyncs | bytes / subscriber | server CPU s | server CPU ms / pod replaced | bench process CPU s (API stand-in) | p50 ms | p99 ms | max ms | fewest ready pods held | load 1m before / after |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &rows {
        println!("{}", row.line());
    }
}

impl RestartRow {
    /// The row of the restart table.
    fn line(&self) -> String {
        let row = self;
        format!(
            "| {} | {} | {} ms | {:.1} | {} | {} | {:.0} | {} | {:.0} | {:.2} | {:.2} | {:.2}{} | {:.1} | {:.1} | {:.1} | {} ({:.0}%) | {} |",
            row.source.name(),
            if row.incremental {
                "incremental"
            } else {
                "full"
            },
            row.window.as_millis(),
            row.duration.as_secs_f64(),
            row.changes,
            row.most_messages,
            row.messages as f64 / row.subscribers as f64,
            row.resyncs,
            row.bytes as f64 / row.subscribers as f64,
            row.server_cpu.as_secs_f64(),
            ms(row.server_cpu) / row.pods as f64,
            row.bench_cpu.as_secs_f64(),
            row.stand_in_cpu
                .map_or_else(String::new, |cpu| format!(" ({:.2})", cpu.as_secs_f64())),
            ms(row.p50),
            ms(row.p99),
            ms(row.max),
            row.fewest_ready,
            100.0 * row.fewest_ready as f64 / row.pods as f64,
            row.load,
        )
    }
}
