//! The load generator: N calls at concurrency C, and the summary a person
//! (or a script, with `--json`) reads: calls per backend, latency
//! percentiles, throughput and errors by status code.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use lookaside_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

type StdError = Box<dyn std::error::Error + Send + Sync>;

/// What a `GreeterClient` can be built on and driven from many tasks: a
/// tonic `Channel`, an lb-client `Channel`, or any gRPC service like them.
pub trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<StdError>,
        ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<StdError> + Send>
                          + Send
                          + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<StdError>,
            ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<StdError> + Send>
                              + Send
                              + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// One worker's results. Each worker has its own, so recording a call takes
/// an uncontended lock.
#[derive(Debug, Default, Clone)]
struct WorkerTally {
    backends: HashMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
}

/// Results of a load run so far, readable while it runs.
#[derive(Debug)]
pub struct Tally {
    // std Mutex per worker: held for one insert, never across `.await`.
    workers: Vec<Mutex<WorkerTally>>,
    issued: AtomicU64,
    started: Instant,
}

/// Calls per backend and errors by code at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Successful calls per backend name.
    pub backends: BTreeMap<String, u64>,
    /// Failed calls per gRPC status code name.
    pub errors: BTreeMap<String, u64>,
}

impl Counts {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let minus = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        Counts {
            backends: minus(&self.backends, &earlier.backends),
            errors: minus(&self.errors, &earlier.errors),
        }
    }

    /// Successful calls.
    pub fn ok(&self) -> u64 {
        self.backends.values().sum()
    }

    /// Failed calls.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

impl Tally {
    /// An empty tally for `concurrency` workers.
    pub fn new(concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            workers: (0..concurrency.max(1)).map(|_| Mutex::default()).collect(),
            issued: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// Calls per backend and errors so far.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for worker in &self.workers {
            let worker = worker.lock().unwrap();
            for (backend, n) in &worker.backends {
                *counts.backends.entry(backend.clone()).or_default() += n;
            }
            for (code, n) in &worker.errors {
                *counts.errors.entry(code.clone()).or_default() += n;
            }
        }
        counts
    }

    /// Calls finished so far.
    pub fn done(&self) -> u64 {
        let counts = self.counts();
        counts.ok() + counts.failed()
    }

    /// The summary of everything recorded.
    pub fn summary(&self) -> Summary {
        let counts = self.counts();
        let mut latencies: Vec<u32> = Vec::new();
        for worker in &self.workers {
            latencies.extend_from_slice(&worker.lock().unwrap().latencies_us);
        }
        Summary::of(counts, latencies, self.started.elapsed())
    }
}

/// Calls at a fixed `rate` (per second) for `duration`, each on a task of
/// its own however many are still in flight (an open loop: arrivals do not
/// wait for answers, as a service's users do not, so a slow backend cannot
/// hold the arrivals back). A call's latency counts from when it is sent:
/// tokio's timer ticks in milliseconds, so calls due within one tick leave
/// together, and counting from when each was due would add the tick to
/// every call. Throughput is the calls answered over the time until the
/// last answer: below `rate` when the calls pile up.
pub async fn open_loop<T>(client: GreeterClient<T>, rate: f64, duration: Duration) -> Summary
where
    T: Transport,
{
    let calls = (rate * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..calls {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let mut client = client.clone();
        tasks.spawn(async move {
            let sent = tokio::time::Instant::now();
            let reply = client
                .say_hello(HelloRequest {
                    name: "open-loop".into(),
                })
                .await;
            let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
            (micros, reply.map(|r| r.into_inner().backend))
        });
    }
    let mut latencies = Vec::with_capacity(calls as usize);
    let mut counts = Counts::default();
    while let Some(joined) = tasks.join_next().await {
        let Ok((micros, reply)) = joined else {
            *counts.errors.entry("Panicked".to_owned()).or_default() += 1;
            continue;
        };
        latencies.push(micros);
        match reply {
            Ok(backend) => *counts.backends.entry(backend).or_default() += 1,
            Err(status) => {
                *counts
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1
            }
        }
    }
    Summary::of(counts, latencies, start.elapsed())
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest call.
    pub max: f64,
}

/// The result of a load run, printed as a table or as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Calls made.
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by status code.
    pub errors: BTreeMap<String, u64>,
    /// Successful calls by backend name.
    pub backends: BTreeMap<String, u64>,
    /// Latency percentiles.
    pub latency_ms: Latency,
    /// Calls per second.
    pub rps: f64,
    /// Wall time of the run.
    pub elapsed_s: f64,
}

impl Summary {
    /// The summary of calls that ended as `counts` say, taking
    /// `latencies_us` (one per call, in microseconds), over `elapsed`.
    pub fn of(counts: Counts, mut latencies_us: Vec<u32>, elapsed: Duration) -> Self {
        latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if latencies_us.is_empty() {
                return 0.0;
            }
            let n = latencies_us.len();
            let i = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
            f64::from(latencies_us[i]) / 1000.0
        };
        let calls = counts.ok() + counts.failed();
        Summary {
            calls,
            ok: counts.ok(),
            latency_ms: Latency {
                p50: pct(0.50),
                p90: pct(0.90),
                p99: pct(0.99),
                max: pct(1.0),
            },
            errors: counts.errors,
            backends: counts.backends,
            rps: calls as f64 / elapsed.as_secs_f64().max(1e-9),
            elapsed_s: elapsed.as_secs_f64(),
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = distribution_table(&self.backends);
        out += &format!(
            "\n{} calls in {:.2} s: {:.0} calls/s, {} ok, {} failed\n",
            self.calls,
            self.elapsed_s,
            self.rps,
            self.ok,
            self.calls - self.ok
        );
        out += &format!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}\n",
            self.latency_ms.p50, self.latency_ms.p90, self.latency_ms.p99, self.latency_ms.max
        );
        if self.errors.is_empty() {
            out += "errors: none\n";
        } else {
            out += "errors:\n";
            for (code, n) in &self.errors {
                out += &format!("  {code:<20} {n}\n");
            }
        }
        out
    }
}

/// Calls per backend with each one's share, as a table.
pub fn distribution_table(backends: &BTreeMap<String, u64>) -> String {
    let total: u64 = backends.values().sum();
    let mut out = format!("{:<24} {:>10} {:>8}\n", "backend", "calls", "share");
    for (backend, n) in backends {
        let share = 100.0 * *n as f64 / total.max(1) as f64;
        let bar = "#".repeat((share / 2.5).round() as usize);
        out += &format!("{backend:<24} {n:>10} {share:>7.2}% {bar}\n");
    }
    out
}

/// Makes `calls` calls (or, with `None`, calls until `stop`) with
/// `concurrency` workers sharing `client`, recording into `tally`.
pub async fn run<T>(
    client: GreeterClient<T>,
    calls: Option<u64>,
    concurrency: usize,
    tally: Arc<Tally>,
    stop: CancellationToken,
) where
    T: Transport,
{
    let mut workers = Vec::new();
    for index in 0..concurrency.max(1) {
        let mut client = client.clone();
        let tally = tally.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            loop {
                if stop.is_cancelled() {
                    break;
                }
                if let Some(calls) = calls
                    && tally.issued.fetch_add(1, Relaxed) >= calls
                {
                    break;
                }
                let started = Instant::now();
                let result = client
                    .say_hello(HelloRequest {
                        name: "greeter-client".into(),
                    })
                    .await;
                let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                let mut mine = tally.workers[index].lock().unwrap();
                mine.latencies_us.push(micros);
                match result {
                    Ok(reply) => {
                        let backend = reply.into_inner().backend;
                        match mine.backends.get_mut(&backend) {
                            Some(n) => *n += 1,
                            None => {
                                mine.backends.insert(backend, 1);
                            }
                        }
                    }
                    Err(status) => {
                        tracing::debug!(%status, "call failed");
                        *mine
                            .errors
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                    }
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
}

/// Polls `tally` until `until` completes, updating a progress bar.
pub async fn progress(tally: Arc<Tally>, total: u64, until: CancellationToken) {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} calls  {per_sec}  eta {eta}")
            .expect("static template"),
    );
    loop {
        bar.set_position(tally.done());
        tokio::select! {
            _ = until.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    bar.finish_and_clear();
}
