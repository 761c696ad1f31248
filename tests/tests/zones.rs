//! End to end: zone-aware routing. lb-server (file source, zones in the YAML)
//! computes each client zone's shares from every subscriber's zone and every
//! endpoint's zone; lb-client keeps calls local while its zone has the
//! capacity and moves them elsewhere, with no failed call, when it has none.
//!
//! Backends are named by zone (`a1` is in zone `a`), so a tally of replies
//! per backend is a tally per zone.

use std::time::{Duration, Instant};

use greeter::load::Counts;
use lb_client::Channel;
use lookaside_proto::helloworld::{
    HelloReply, HelloRequest,
    greeter_client::GreeterClient,
    greeter_server::{Greeter, GreeterServer},
};
use lookaside_tests::local::{
    self, Backend, InProcessLb, Listed, SourceFile, TARGET, Traffic, backends, run_calls,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

const WAIT: Duration = Duration::from_secs(10);

/// Each backend is listed in the zone its name starts with.
fn zone_of(name: &str) -> &str {
    &name[..1]
}

fn listed(backends: &[Backend]) -> Vec<Listed> {
    backends
        .iter()
        .map(|b| Listed::of(b).zone(zone_of(&b.name)))
        .collect()
}

async fn channel(lb: &InProcessLb, zone: &str) -> Channel {
    Channel::builder(TARGET)
        .lb(lb.url())
        .zone(zone)
        .connect()
        .await
        .expect("channel")
}

/// Waits until `check` holds, for at most [`WAIT`].
async fn until(what: &str, check: impl FnMut() -> bool) {
    local::until(what, WAIT, check).await;
}

/// Waits until the channel uses these shares (parts per million, each
/// within 1% of what is given), the LB server having seen every client.
async fn until_shares(channel: &Channel, want: &[(&str, u32)]) {
    let close = |got: &[(String, u32)]| {
        got.len() == want.len()
            && want.iter().all(|(zone, share)| {
                got.iter()
                    .any(|(z, s)| z == zone && s.abs_diff(*share) <= 10_000)
            })
    };
    let deadline = Instant::now() + WAIT;
    while !close(&channel.zone_shares()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for zone shares {want:?}; the channel has {:?}",
            channel.zone_shares()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The fraction of successful calls answered in `zone`.
fn local_share(counts: &Counts, zone: &str) -> f64 {
    let local: u64 = counts
        .backends
        .iter()
        .filter(|(name, _)| zone_of(name) == zone)
        .map(|(_, n)| n)
        .sum();
    local as f64 / counts.ok().max(1) as f64
}

async fn stop_all(lb: InProcessLb, backends: Vec<Backend>) {
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_equal_zones_and_clients_in_both_at_least_95_percent_of_calls_stay_local() {
    let backends = backends(&["a1", "a2", "b1", "b2"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let (in_a, in_b) = (channel(&lb, "a").await, channel(&lb, "b").await);
    until_shares(&in_a, &[("a", 1_000_000)]).await;
    until_shares(&in_b, &[("b", 1_000_000)]).await;

    for (channel, zone) in [(&in_a, "a"), (&in_b, "b")] {
        let counts = run_calls(channel, 2_000).await;
        assert_eq!(counts.failed(), 0, "{counts:?}");
        let local = local_share(&counts, zone);
        assert!(local >= 0.95, "zone {zone}: {local:.3} local: {counts:?}");
        // Both local endpoints share the calls.
        assert_eq!(counts.backends.len(), 2, "{counts:?}");
        let per_zone = channel.calls_per_zone();
        assert_eq!(per_zone.get(zone).copied(), Some(2_000), "{per_zone:?}");
    }
    stop_all(lb, backends).await;
}

/// Zone a has a quarter of the capacity and half of the clients: its clients
/// keep a quarter / a half = 50% of their calls local and send the rest to
/// b, which has capacity to spare and keeps all of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_short_of_capacity_keeps_its_capacity_share_local_and_spills_the_rest() {
    let backends = backends(&["a1", "b1", "b2", "b3"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let (in_a, in_b) = (channel(&lb, "a").await, channel(&lb, "b").await);
    until_shares(&in_a, &[("a", 500_000), ("b", 500_000)]).await;
    until_shares(&in_b, &[("b", 1_000_000)]).await;

    let counts = run_calls(&in_a, 4_000).await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    let local = local_share(&counts, "a");
    assert!((local - 0.5).abs() <= 0.05, "{local:.3} local: {counts:?}");
    // The spill spreads over b's endpoints.
    for b in ["b1", "b2", "b3"] {
        assert!(
            counts.backends.get(b).copied().unwrap_or(0) > 300,
            "{counts:?}"
        );
    }
    let counts = run_calls(&in_b, 2_000).await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    assert!(local_share(&counts, "b") >= 0.95, "{counts:?}");
    stop_all(lb, backends).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_local_zone_drains_its_clients_move_to_the_other_zone_with_no_failed_call() {
    let backends = backends(&["a1", "b1"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let (in_a, in_b) = (channel(&lb, "a").await, channel(&lb, "b").await);
    until_shares(&in_a, &[("a", 1_000_000)]).await;
    until_shares(&in_b, &[("b", 1_000_000)]).await;

    let traffic = Traffic::start(&in_a, 4);
    until("traffic", || traffic.tally.done() > 200).await;
    let before = traffic.tally.counts();
    assert!(local_share(&before, "a") >= 0.95, "{before:?}");

    // a1 drains: serving but terminating, as a rollout does.
    file.write(&[
        Listed::of(&backends[0]).zone("a").draining(),
        Listed::of(&backends[1]).zone("b"),
    ]);
    until("a1 draining", || {
        in_a.endpoints()
            .iter()
            .any(|e| e.addr == backends[0].addr && e.draining)
    })
    .await;
    // Calls picked just before the new list took effect finish first.
    let settle = traffic.tally.done() + 50;
    until("the drain to settle", || traffic.tally.done() > settle).await;
    let sent_to_a1 = |channel: &Channel| {
        let a1 = channel
            .endpoints()
            .into_iter()
            .find(|e| e.addr == backends[0].addr);
        a1.map_or(0, |e| e.calls)
    };
    let a1_before = sent_to_a1(&in_a);
    let drained = traffic.tally.counts();
    until("calls after the drain", || {
        traffic.tally.done() > drained.ok() + 500
    })
    .await;
    let counts = traffic.finish().await;
    let after = counts.since(&drained);
    assert_eq!(counts.failed(), 0, "no call fails: {counts:?}");
    assert_eq!(
        sent_to_a1(&in_a),
        a1_before,
        "no call goes to a1 once it drains"
    );
    assert_eq!(
        after.backends.keys().collect::<Vec<_>>(),
        ["b1"],
        "{after:?}"
    );
    // The server agrees: with zone a's only endpoint draining, b is the one
    // zone with capacity, and shares name no zone (route over every usable
    // endpoint, which is b1).
    until_shares(&in_a, &[]).await;
    stop_all(lb, backends).await;
}

/// A greeter that answers every call `UNAVAILABLE`, as a backend does that
/// has lost what it needs to serve.
struct Refusing;

#[tonic::async_trait]
impl Greeter for Refusing {
    async fn say_hello(
        &self,
        _request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Err(Status::unavailable("refusing"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_local_endpoint_is_ejected_calls_move_to_the_other_zone_with_no_failure() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refusing = listener.local_addr().unwrap();
    let stop_refusing = CancellationToken::new();
    let incoming = futures::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(tcp, _)| tcp), listener))
    });
    let refusing_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreeterServer::new(Refusing))
            .serve_with_incoming_shutdown(incoming, stop_refusing.clone().cancelled_owned()),
    );
    let backends = backends(&["b1"]).await;
    let file = SourceFile::new(&[
        Listed::of_addr(refusing, "a1").zone("a"),
        Listed::of(&backends[0]).zone("b"),
    ]);
    let lb = InProcessLb::start(&file).await;
    let in_a = Channel::builder(TARGET)
        .lb(lb.url())
        .zone("a")
        // Ejected for the rest of the test.
        .ejection(Duration::from_secs(60), Duration::from_secs(60))
        .connect()
        .await
        .expect("channel");
    let in_b = channel(&lb, "b").await;
    until_shares(&in_a, &[("a", 1_000_000)]).await;
    until_shares(&in_b, &[("b", 1_000_000)]).await;

    // Both connected first: the last usable endpoint is never ejected, and
    // the shares arrive with the list, before the connections are up.
    until("both endpoints connected", || {
        let endpoints = in_a.endpoints();
        endpoints.len() == 2 && endpoints.iter().all(|e| e.connected)
    })
    .await;
    // The local endpoint fails a call (that call is lost: it was sent) and
    // is ejected at once.
    let mut client = GreeterClient::new(in_a.clone());
    let request = || HelloRequest { name: "z".into() };
    let failed = client.say_hello(request()).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    // The outcome is recorded when the response ends, which may be just
    // after the caller has its error.
    until("a1 ejected", || in_a.stats().ejections == 1).await;

    // Every later call goes to zone b, although the shares still say a.
    let counts = run_calls(&in_a, 1_000).await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    assert_eq!(
        counts.backends.get("b1").copied(),
        Some(1_000),
        "{counts:?}"
    );
    assert_eq!(in_a.zone_shares(), [("a".to_owned(), 1_000_000)]);
    assert_eq!(in_a.stats().no_endpoint, 0);

    stop_refusing.cancel();
    refusing_task.await.unwrap().unwrap();
    stop_all(lb, backends).await;
}
