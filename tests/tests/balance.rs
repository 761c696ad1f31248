//! End to end: lb-client balancing real greeter backends over lb-server's lists.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use greeter::load::{self, Tally};
use lb_client::{Channel, Policy};
use lookaside_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use lookaside_tests::local::{
    self, Backend, InProcessLb, LbProcess, Listed, SourceFile, TARGET, Traffic, backends,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn listed(backends: &[Backend]) -> Vec<Listed> {
    backends.iter().map(Listed::of).collect()
}

async fn channel(lb: &str, policy: Policy) -> Channel {
    Channel::builder(TARGET)
        .lb(lb)
        .policy(policy)
        .connect()
        .await
        .expect("channel")
}

/// Waits until `check` holds, for at most [`WAIT`].
async fn until(what: &str, check: impl FnMut() -> bool) {
    local::until(what, WAIT, check).await;
}

fn sees(channel: &Channel, backend: &Backend, draining: Option<bool>) -> bool {
    channel
        .endpoints()
        .iter()
        .any(|e| e.addr == backend.addr && draining.is_none_or(|d| e.draining == d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_pins_every_call_but_lookaside_spreads_them_within_one_percent() {
    let backends = backends(&["b1", "b2", "b3"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;

    // The classic experiment: one HTTP/2 connection, every call on one backend.
    let direct = tonic::transport::Endpoint::from_shared(format!("http://{}", backends[1].addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let tally = Tally::new(10);
    load::run(
        GreeterClient::new(direct),
        Some(3_000),
        10,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let pinned = tally.counts();
    assert_eq!(pinned.backends.len(), 1, "{pinned:?}");
    assert_eq!(pinned.ok(), 3_000);

    // Lookaside, round-robin (the default): every backend within 1% of its fair share.
    let calls = 30_000;
    let tally = Tally::new(10);
    let rr = channel(&lb.url(), Policy::RoundRobin).await;
    load::run(
        GreeterClient::new(rr),
        Some(calls),
        10,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let counts = tally.counts();
    assert_eq!(counts.failed(), 0, "{counts:?}");
    assert_eq!(counts.backends.len(), 3, "{counts:?}");
    let fair = calls as f64 / 3.0;
    for (backend, n) in &counts.backends {
        let deviation = (*n as f64 - fair).abs() / fair;
        assert!(
            deviation <= 0.01,
            "{backend} got {n}, fair {fair:.0}: {counts:?}"
        );
    }

    // The load-aware policies follow latency and load rather than exact
    // shares (on one busy machine a scheduling hiccup makes a backend look
    // slow for a while), but they too use every backend and fail nothing.
    for policy in [Policy::LeastRequest, Policy::PeakEwma] {
        let tally = Tally::new(10);
        let channel = channel(&lb.url(), policy).await;
        load::run(
            GreeterClient::new(channel),
            Some(6_000),
            10,
            tally.clone(),
            CancellationToken::new(),
        )
        .await;
        let counts = tally.counts();
        assert_eq!(counts.failed(), 0, "{policy}: {counts:?}");
        for b in &backends {
            let n = counts.backends.get(&b.name).copied().unwrap_or(0);
            assert!(n > 0, "{policy}: {} got no call: {counts:?}", b.name);
        }
    }
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_honoured() {
    let backends = backends(&["heavy", "light"]).await;
    let file = SourceFile::new(&[Listed::of(&backends[0]).weight(3), Listed::of(&backends[1])]);
    let lb = InProcessLb::start(&file).await;
    let channel = channel(&lb.url(), Policy::RoundRobin).await;
    let tally = Tally::new(4);
    load::run(
        GreeterClient::new(channel),
        Some(4_000),
        4,
        tally.clone(),
        CancellationToken::new(),
    )
    .await;
    let counts = tally.counts();
    assert_eq!(counts.backends["heavy"], 3_000, "{counts:?}");
    assert_eq!(counts.backends["light"], 1_000, "{counts:?}");
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

/// How fast a new backend gets its first call is a figure, not a pass/fail
/// claim: the client benchmark measures it (publish to first call). This
/// asserts the events: once published, the new backend joins the rotation
/// and takes its share of the calls that follow, with none failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_takes_its_share_of_calls_once_published() {
    let mut backends = backends(&["b1", "b2"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let channel = channel(&lb.url(), Policy::RoundRobin).await;
    let traffic = Traffic::start(&channel, 4);
    until("traffic", || traffic.tally.done() > 100).await;

    backends.push(Backend::start("b3").await);
    let key = lb_server::model::parse_target(TARGET).unwrap();
    let mut published = lb.store().subscribe(&key);
    let before = published.current().version;
    file.write(&listed(&backends));
    let snapshot = tokio::time::timeout(WAIT, published.next()).await.unwrap();
    assert!(snapshot.version > before && snapshot.endpoints.len() == 3);
    until("b3 to serve a call", || {
        traffic.tally.counts().backends.contains_key("b3")
    })
    .await;
    // From then on, round robin gives b3 a third of the calls.
    const NEXT: u64 = 900;
    let start = traffic.tally.counts();
    let done = traffic.tally.done();
    until("more calls", || traffic.tally.done() >= done + NEXT).await;
    let share = traffic.tally.counts().since(&start);
    let b3 = share.backends.get("b3").copied().unwrap_or(0);
    assert!(
        b3 * 3 >= share.ok() * 9 / 10,
        "b3 served {b3} of the {} calls after its first: {share:?}",
        share.ok()
    );
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_removing_and_a_rolling_restart_under_load_fail_no_call() {
    let mut backends = backends(&["b1", "b2", "b3"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let channel = channel(&lb.url(), Policy::RoundRobin).await;
    let traffic = Traffic::start(&channel, 10);
    until("traffic", || traffic.tally.done() > 200).await;

    // Drain b1: it stops getting new calls while the others carry the load.
    let mut list = listed(&backends);
    list[0] = list[0].clone().draining();
    file.write(&list);
    until("the client to see b1 draining", || {
        sees(&channel, &backends[0], Some(true))
    })
    .await;
    let at_drain = traffic.tally.counts();
    until("more traffic", || {
        traffic.tally.done() > at_drain.ok() + 2_000
    })
    .await;
    let after = traffic.tally.counts().since(&at_drain);
    // A call picked just before the drain landed may still finish on b1.
    assert!(
        after.backends.get("b1").copied().unwrap_or(0) <= 10,
        "{after:?}"
    );

    // Rolling restart: each backend drained, stopped and replaced by a new one.
    for round in 0..backends.len() {
        let old = backends.remove(0);
        let mut list: Vec<Listed> = listed(&backends);
        list.push(Listed::of(&old).draining());
        file.write(&list);
        until("the client to see the drain", || {
            sees(&channel, &old, Some(true))
        })
        .await;
        // Removed from the list, then stopped: calls in flight finish first.
        file.write(&listed(&backends));
        until("the client to drop it", || !sees(&channel, &old, None)).await;
        old.stop().await;
        let fresh = Backend::start(&format!("new-{round}")).await;
        backends.push(fresh);
        file.write(&listed(&backends));
        until("the new backend to serve", || {
            traffic
                .tally
                .counts()
                .backends
                .contains_key(&format!("new-{round}"))
        })
        .await;
    }
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    for round in 0..3 {
        assert!(counts.backends[&format!("new-{round}")] > 0);
    }
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_server_killed_and_restarted_under_load_fails_no_call() {
    let mut backends = backends(&["b1", "b2", "b3"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = LbProcess::start(&file, ([127, 0, 0, 1], 0).into());
    let addr = lb.addr;
    let channel = channel(&lb.url(), Policy::RoundRobin).await;
    let traffic = Traffic::start(&channel, 10);
    until("traffic", || traffic.tally.done() > 200).await;

    lb.kill();
    let at_kill = traffic.tally.done();
    until("traffic on the cached list", || {
        traffic.tally.done() > at_kill + 1_000
    })
    .await;
    // Changes made while the LB server is gone: b4 added, b1 removed (still up).
    backends.push(Backend::start("b4").await);
    file.write(&listed(&backends[1..]));
    let lb = LbProcess::start(&file, addr);
    until("the client to pick up the change", || {
        sees(&channel, &backends[3], None) && !sees(&channel, &backends[0], None)
    })
    .await;
    until("b4 to serve", || {
        traffic.tally.counts().backends.contains_key("b4")
    })
    .await;
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    assert!(channel.stats().lb_errors >= 1);
    lb.kill();
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_lb_servers_the_client_fails_over_when_one_dies() {
    let mut backends = backends(&["b1", "b2"]).await;
    let file = SourceFile::new(&listed(&backends));
    let first = LbProcess::start(&file, ([127, 0, 0, 1], 0).into());
    let second = LbProcess::start(&file, ([127, 0, 0, 1], 0).into());
    let channel = Channel::builder(TARGET)
        .lb(first.url())
        .lb(second.url())
        .connect()
        .await
        .unwrap();
    let traffic = Traffic::start(&channel, 4);
    until("traffic", || traffic.tally.done() > 100).await;
    first.kill();
    backends.push(Backend::start("b3").await);
    file.write(&listed(&backends));
    until("the change through the second LB server", || {
        sees(&channel, &backends[2], None)
    })
    .await;
    until("b3 to serve", || {
        traffic.tally.counts().backends.contains_key("b3")
    })
    .await;
    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    second.kill();
    for b in backends {
        b.stop().await;
    }
}

async fn say_hello(channel: &Channel) -> Result<String, tonic::Status> {
    let reply = GreeterClient::new(channel.clone())
        .say_hello(HelloRequest { name: "t".into() })
        .await?;
    Ok(reply.into_inner().backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_dead_fails_fast_with_the_reason_and_recovers() {
    let backends = backends(&["b1", "b2"]).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let channel = Channel::builder(TARGET)
        .lb(lb.url())
        .ejection(Duration::from_millis(50), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    assert!(say_hello(&channel).await.is_ok());
    for b in backends {
        b.stop().await;
    }
    // Once the client knows the backends are down, calls fail at once and say why.
    until("the client to see the backends down", || {
        channel.endpoints().iter().all(|e| !e.connected)
    })
    .await;
    let mut last = None;
    for _ in 0..20 {
        let started = Instant::now();
        let status = say_hello(&channel).await.unwrap_err();
        let took = started.elapsed();
        if status.message().contains("unavailable (2 unreachable") {
            // Failed, not waited out: a call waits only for an endpoint that is
            // connecting (a reconnect in flight can take a few ms here), and
            // never past the wait timeout (1 s by default).
            assert!(took < Duration::from_secs(1), "took {took:?}");
            last = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = last.expect("a fail-fast UNAVAILABLE that names the reason");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(TARGET), "{}", status.message());

    // One comes back where it was: calls succeed again.
    let back = Backend::start_on("b1-again", addrs[0]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(backend) = say_hello(&channel).await {
            assert_eq!(backend, "b1-again");
            break;
        }
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lb.stop().await;
    back.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_addresses_serve_while_no_lb_server_answers() {
    let backends = backends(&["fb1", "fb2"]).await;
    // An LB address nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut builder = Channel::builder(TARGET).lb(format!("http://{closed}"));
    for b in &backends {
        builder = builder.fallback(b.addr.to_string());
    }
    let channel = builder.connect().await.unwrap();
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        *seen.entry(say_hello(&channel).await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Without fallback, calls say that no LB server answered.
    let lonely = Channel::builder(TARGET)
        .lb(format!("http://{closed}"))
        .ready_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let status = say_hello(&lonely).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no answer from an LB server yet"),
        "{}",
        status.message()
    );
    for b in backends {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_service_uses_the_fallback_or_says_so() {
    let backends = backends(&["fb"]).await;
    let file = SourceFile::new(&listed(&backends));
    let lb = InProcessLb::start(&file).await;
    let unknown = Channel::builder("nope.default:grpc")
        .lb(lb.url())
        .connect()
        .await
        .unwrap();
    let status = say_hello(&unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("does not know service nope.default:grpc"),
        "{}",
        status.message()
    );

    let with_fallback = Channel::builder("nope.default:grpc")
        .lb(lb.url())
        .fallback(format!("dns:///localhost:{}", backends[0].addr.port()))
        .connect()
        .await
        .unwrap();
    assert_eq!(say_hello(&with_fallback).await.unwrap(), "fb");

    let malformed = Channel::builder("not a target")
        .lb(lb.url())
        .connect()
        .await
        .unwrap_err();
    assert!(
        malformed.to_string().contains("rejected target"),
        "{malformed}"
    );
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

/// A greeter whose calls named "slow" take 500 ms of blocking work, the
/// others answering at once: a healthy backend with one slow call. The work
/// blocks (as CPU-bound work does), so tonic's server cannot end the call at
/// its own copy of the deadline first: the client's deadline ends it.
#[derive(Clone)]
struct SlowOnRequest {
    name: String,
}

#[tonic::async_trait]
impl lookaside_proto::helloworld::greeter_server::Greeter for SlowOnRequest {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<lookaside_proto::helloworld::HelloReply>, tonic::Status> {
        if request.into_inner().name == "slow" {
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(500)));
        }
        Ok(tonic::Response::new(
            lookaside_proto::helloworld::HelloReply {
                message: String::new(),
                backend: self.name.clone(),
            },
        ))
    }
}

/// Serves [`SlowOnRequest`] on `127.0.0.1:0` until `stop`.
async fn slow_on_request(name: &str, stop: &CancellationToken) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = lookaside_proto::helloworld::greeter_server::GreeterServer::new(SlowOnRequest {
        name: name.into(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_call_past_its_deadline_does_not_eject_a_healthy_backend() {
    let stop = CancellationToken::new();
    let (a, b) = (
        slow_on_request("a", &stop).await,
        slow_on_request("b", &stop).await,
    );
    let file = SourceFile::new(&[Listed::of_addr(a, "a"), Listed::of_addr(b, "b")]);
    let lb = InProcessLb::start(&file).await;
    let channel = channel(&lb.url(), Policy::RoundRobin).await;
    until("both backends connected", || {
        channel.endpoints().iter().all(|e| e.connected)
    })
    .await;
    let call = |name: &str, deadline: Option<Duration>| {
        let mut request = tonic::Request::new(HelloRequest { name: name.into() });
        if let Some(deadline) = deadline {
            request.set_timeout(deadline);
        }
        let mut client = GreeterClient::new(channel.clone());
        async move { client.say_hello(request).await }
    };

    // Slow calls with a tight deadline, each followed by calls that answer
    // (on both backends: round-robin alternates): never ejected, and the
    // calls after them spread over both backends.
    for _ in 0..10 {
        let status = call("slow", Some(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(channel.stats().ejections, 0, "{:?}", channel.endpoints());
        let mut served = BTreeMap::<String, usize>::new();
        for _ in 0..10 {
            let reply = call("fast", None).await.expect("healthy backends answer");
            *served.entry(reply.into_inner().backend).or_default() += 1;
        }
        assert_eq!(served.len(), 2, "both backends take calls: {served:?}");
    }
    assert!(channel.endpoints().iter().all(|e| !e.ejected));
    lb.stop().await;
    stop.cancel();
}

/// The pod name of the endpoints below: longer than Kubernetes allows (253),
/// as a file source may list, so that 3,000 endpoints make a Watch response
/// of about 4.8 MB, over the 4 MiB tonic takes by default.
const LONG_POD_NAME_BYTES: usize = 1_600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_of_3000_endpoints_with_long_pod_names_reaches_the_client_whole() {
    const ENDPOINTS: usize = 3_000;
    const {
        assert!(
            ENDPOINTS * LONG_POD_NAME_BYTES > 4 << 20,
            "over tonic's default"
        )
    };
    let backends = backends(&["b1", "b2", "b3"]).await;
    // Three backends that answer, and 2,997 addresses that refuse
    // connections at once (nothing listens on 127.1.0.0/16 loopback
    // addresses): what matters is that the list arrives whole.
    let port = backends[0].addr.port();
    let pod = |i: usize| format!("{i:04}-{}", "p".repeat(LONG_POD_NAME_BYTES - 5));
    let mut listed: Vec<Listed> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| Listed::of_addr(b.addr, &pod(i)))
        .collect();
    for i in backends.len()..ENDPOINTS {
        let addr =
            std::net::SocketAddr::from(([127, 1, (i / 250) as u8, (i % 250 + 1) as u8], port));
        listed.push(Listed::of_addr(addr, &pod(i)));
    }
    let file = SourceFile::new(&listed);
    let lb = InProcessLb::start(&file).await;
    let key = lb_server::model::parse_target(TARGET).unwrap();
    let mut published = lb.store().subscribe(&key);
    tokio::time::timeout(WAIT, async {
        while published.current().endpoints.len() < ENDPOINTS {
            published.next().await;
        }
    })
    .await
    .expect("lb-server publishes the file's 3,000 endpoints");

    let channel = channel(&lb.url(), Policy::RoundRobin).await;
    until("the whole list", || channel.endpoints().len() == ENDPOINTS).await;
    assert!(
        channel
            .endpoints()
            .iter()
            .all(|e| e.pod.len() == LONG_POD_NAME_BYTES),
        "names arrive whole"
    );
    for _ in 0..30 {
        let backend = say_hello(&channel).await.expect("calls succeed");
        assert!(backends.iter().any(|b| b.name == backend), "{backend}");
    }
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}
