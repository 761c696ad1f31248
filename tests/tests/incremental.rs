//! End to end: lb-client on incremental updates (it always asks for them)
//! follows every change exactly, through a rolling restart of every backend
//! under load and a restart of lb-server, whose versions start again lower.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_client::{Channel, Policy};
use lookaside_tests::local::{
    self, Backend, InProcessLb, LbProcess, Listed, SourceFile, TARGET, Traffic,
};

const WAIT: Duration = Duration::from_secs(10);

/// What a list says of each endpoint a client routes by: weight and draining.
type Routing = BTreeMap<SocketAddr, (u32, bool)>;

/// An entry of the file source, kept beside it so the test knows what it listed.
#[derive(Debug, Clone)]
struct Entry {
    addr: SocketAddr,
    name: String,
    weight: u32,
    draining: bool,
}

impl Entry {
    fn of(backend: &Backend) -> Self {
        Self {
            addr: backend.addr,
            name: backend.name.clone(),
            weight: 1,
            draining: false,
        }
    }
}

/// Writes `entries` to the file and returns what a client should then hold.
fn write(file: &SourceFile, entries: &[Entry]) -> Routing {
    let listed: Vec<Listed> = entries
        .iter()
        .map(|e| {
            let listed = Listed::of_addr(e.addr, &e.name).weight(e.weight);
            if e.draining {
                listed.draining()
            } else {
                listed
            }
        })
        .collect();
    file.write(&listed);
    entries
        .iter()
        .map(|e| (e.addr, (e.weight, e.draining)))
        .collect()
}

fn routing(channel: &Channel) -> Routing {
    channel
        .endpoints()
        .iter()
        .map(|e| (e.addr, (e.weight, e.draining)))
        .collect()
}

/// Waits until the client's list is `want`, polling every 5 ms, for at most [`WAIT`].
async fn holds(channel: &Channel, want: &Routing, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let held = routing(channel);
        if held == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the client holds {held:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every backend replaced one by one, as a Deployment's rolling update does
/// (25% surge: the new pod ready before the old one drains, then goes), each
/// step one changed endpoint, so one diff: the client holds exactly the
/// listed endpoints after every step, and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_backend_fails_no_call_over_incremental_updates() {
    let mut backends = Vec::new();
    for name in ["b1", "b2", "b3", "b4"] {
        backends.push(Backend::start(name).await);
    }
    let mut entries: Vec<Entry> = backends.iter().map(Entry::of).collect();
    entries[1].weight = 2;
    let file = SourceFile::new(&[]);
    let want = write(&file, &entries);
    let lb = InProcessLb::start(&file).await;
    let channel = Channel::builder(TARGET)
        .lb(lb.url())
        .policy(Policy::RoundRobin)
        .connect()
        .await
        .unwrap();
    holds(&channel, &want, "the first list").await;
    let traffic = Traffic::start(&channel, 8);
    local::until("traffic", WAIT, || traffic.tally.counts().ok() > 200).await;

    for round in 0..4 {
        // Surge: the new pod is ready.
        let fresh = Backend::start(&format!("new-{round}")).await;
        entries.push(Entry::of(&fresh));
        backends.push(fresh);
        let want = write(&file, &entries);
        holds(&channel, &want, "the new backend added").await;
        // The old one drains, then goes; it stops once out of every list.
        entries[0].draining = true;
        let want = write(&file, &entries);
        holds(&channel, &want, "the old backend draining").await;
        entries.remove(0);
        let want = write(&file, &entries);
        holds(&channel, &want, "the old backend removed").await;
        backends.remove(0).stop().await;
        let name = format!("new-{round}");
        local::until("the new backend to serve", WAIT, || {
            traffic.tally.counts().backends.contains_key(&name)
        })
        .await;
    }
    // A weight change alone, on the list of new backends.
    entries[2].weight = 3;
    let want = write(&file, &entries);
    holds(&channel, &want, "a weight change").await;

    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    for round in 0..4 {
        assert!(counts.backends[&format!("new-{round}")] > 0, "{counts:?}");
    }
    // One stream throughout: every change came over it, none by resubscribing.
    assert_eq!(channel.stats().lb_errors, 0);
    lb.stop().await;
    for b in backends {
        b.stop().await;
    }
}

/// lb-server restarts and its versions start again, below the version the
/// client held: the client's new stream starts with a full snapshot, so it
/// holds the new server's list (changed while the server was down), and the
/// diffs that follow apply to that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_lb_server_restart_the_client_holds_the_new_servers_list() {
    let mut backends = Vec::new();
    for name in ["b1", "b2", "b3"] {
        backends.push(Backend::start(name).await);
    }
    let mut entries: Vec<Entry> = backends.iter().map(Entry::of).collect();
    let file = SourceFile::new(&[]);
    let want = write(&file, &entries);
    let lb = LbProcess::start(&file, ([127, 0, 0, 1], 0).into());
    let addr = lb.addr;
    let channel = Channel::builder(TARGET)
        .lb(lb.url())
        .connect()
        .await
        .unwrap();
    holds(&channel, &want, "the first list").await;
    // Versions well past what a fresh server starts from, each a diff.
    for i in 0..30 {
        entries[0].weight = 2 + i % 2;
        let want = write(&file, &entries);
        holds(&channel, &want, "a weight change").await;
    }
    let traffic = Traffic::start(&channel, 4);
    local::until("traffic", WAIT, || traffic.tally.counts().ok() > 100).await;

    // Changes while lb-server is down: b1 gone, b2 draining, b4 new. The
    // new server numbers its versions from 1 again.
    lb.kill();
    backends.push(Backend::start("b4").await);
    entries.remove(0);
    entries[0].draining = true;
    entries.push(Entry::of(&backends[3]));
    let want = write(&file, &entries);
    let lb = LbProcess::start(&file, addr);
    holds(&channel, &want, "the restarted server's list").await;
    // And diffs on the new stream.
    entries[0].draining = false;
    entries[1].weight = 5;
    let want = write(&file, &entries);
    holds(&channel, &want, "a change after the restart").await;

    let counts = traffic.finish().await;
    assert_eq!(counts.failed(), 0, "{counts:?}");
    lb.kill();
    for b in backends {
        b.stop().await;
    }
}
