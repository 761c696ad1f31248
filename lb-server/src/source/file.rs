//! The file source: services and endpoints from a local YAML file, reloaded when it changes.
//!
//! ```yaml
//! services:
//!   greeter.default:grpc:
//!     - address: 127.0.0.1:50051
//!       zone: zone-a        # optional
//!       weight: 2           # optional, default 1
//!     - address: 127.0.0.1:50052
//!       draining: true      # optional, default false
//! ```
//!
//! A broken file at start-up is an error the caller reports; a broken file
//! later is logged and counted, and the last good state keeps being served.
//!
//! The file's directory is watched (inotify), so a change is seen as soon as
//! it is complete: a write closed, or a file renamed into place, which is how
//! editors save and how Kubernetes swaps a ConfigMap volume's `..data`
//! symlink. The file is also polled (`--file-poll-interval`) for what the
//! watch cannot see (network filesystems, a directory that cannot be watched,
//! a file replaced by a new symlink). Either way the file is reloaded only if
//! its bytes changed.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, ModifyKind},
};
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    model::{Endpoint, Services, TargetError, parse_target},
    store::Store,
};

/// What can be wrong with the file. Each says the path and what to fix, with
/// the underlying reason in its message (not repeated as an error source).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// Not YAML of the expected shape.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        reason: serde_yaml::Error,
    },
    /// A service key that is not a valid target.
    #[error("{path}: service {key:?}: {reason}")]
    Target {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// Why it is not a target.
        reason: TargetError,
    },
    /// An endpoint address that is not `IP:PORT`.
    #[error(
        "{path}: service {key:?}, endpoint {index}: address {address:?} is not IP:PORT (IPv6 as [::1]:PORT)"
    )]
    Address {
        /// The file.
        path: PathBuf,
        /// The service key.
        key: String,
        /// Position of the endpoint in the list, from 0.
        index: usize,
        /// The address as written.
        address: String,
    },
    /// A weight of zero.
    #[error("{path}: service {key:?}, endpoint {index}: weight must be at least 1")]
    Weight {
        /// The file.
        path: PathBuf,
        /// The service key.
        key: String,
        /// Position of the endpoint in the list, from 0.
        index: usize,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Option<BTreeMap<String, Option<Vec<FileEndpoint>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    pod: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    draining: bool,
}

fn one() -> u32 {
    1
}

/// Parses file contents into whole endpoint sets, one per service.
pub fn parse(path: &Path, text: &str) -> Result<Services, FileError> {
    let doc: Option<FileDoc> = serde_yaml::from_str(text).map_err(|reason| FileError::Parse {
        path: path.into(),
        reason,
    })?;
    let services = doc.and_then(|d| d.services).unwrap_or_default();
    let mut out = HashMap::with_capacity(services.len());
    for (key_text, endpoints) in services {
        let key = parse_target(&key_text).map_err(|reason| FileError::Target {
            path: path.into(),
            key: key_text.clone(),
            reason,
        })?;
        let mut list = Vec::new();
        for (index, e) in endpoints.unwrap_or_default().into_iter().enumerate() {
            let addr: SocketAddr = e.address.parse().map_err(|_| FileError::Address {
                path: path.into(),
                key: key_text.clone(),
                index,
                address: e.address.clone(),
            })?;
            if e.weight == 0 {
                return Err(FileError::Weight {
                    path: path.into(),
                    key: key_text,
                    index,
                });
            }
            let mut endpoint = Endpoint::new(addr.ip(), addr.port())
                .weight(e.weight)
                .zone(e.zone)
                .node(e.node)
                .pod(e.pod);
            endpoint.draining = e.draining;
            list.push(endpoint);
        }
        out.insert(key, list);
    }
    Ok(out)
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<(Vec<u8>, Services), FileError> {
    let bytes = std::fs::read(path).map_err(|reason| FileError::Read {
        path: path.into(),
        reason,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let services = parse(path, &text)?;
    Ok((bytes, services))
}

/// Serves a YAML file's services, watching and polling it for changes.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    last: Vec<u8>,
    /// Notified by the directory watch.
    changed: Arc<Notify>,
    /// The directory watch, if the directory could be watched. Never read:
    /// it lives as long as the source, and dropping it ends the watch.
    _watcher: Option<RecommendedWatcher>,
}

impl FileSource {
    /// Loads the file, publishes its services and starts watching its
    /// directory. A broken file is an error here, so that a process starting
    /// on one exits with the reason.
    pub fn start(
        path: PathBuf,
        interval: Duration,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FileError> {
        let (bytes, services) = load(&path)?;
        let count = store.replace_all(services, Instant::now());
        tracing::info!(path = %path.display(), services = count, "loaded file source");
        // The watch's thread starts here, not in `run` on a runtime worker
        // that may be pinned to a CPU (see `runtime`), whose CPU it would inherit.
        let changed = Arc::new(Notify::new());
        let watcher = match watch_directory(&path, changed.clone()) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    ?interval,
                    "cannot watch the file's directory; polling only"
                );
                None
            }
        };
        Ok(Self {
            path,
            interval,
            store,
            metrics,
            last: bytes,
            changed,
            _watcher: watcher,
        })
    }

    /// Polls the file, and reloads it when the directory watch reports a
    /// change, until `shutdown`, publishing each good change.
    pub async fn run(mut self, synced: watch::Sender<bool>, shutdown: CancellationToken) {
        let changed = self.changed.clone();
        // start() has just read the file: the first poll is one interval away.
        let first = tokio::time::Instant::now() + self.interval;
        let mut ticker = tokio::time::interval_at(first, self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        synced.send_replace(true);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed.notified() => self.poll(),
                _ = ticker.tick() => self.poll(),
            }
        }
    }

    /// Reloads the file if its contents changed.
    fn poll(&mut self) {
        let event_at = Instant::now();
        let result = match std::fs::read(&self.path) {
            Ok(bytes) if bytes == self.last => return,
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                self.last = bytes;
                parse(&self.path, &text)
            }
            Err(reason) => Err(FileError::Read {
                path: self.path.clone(),
                reason,
            }),
        };
        match result {
            Ok(services) => {
                let changed = self.store.replace_all(services, event_at);
                self.metrics.file_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(path = %self.path.display(), changed, "reloaded file source");
            }
            Err(error) => {
                // Forget the bytes of a file we could not read, so that the
                // same file is retried once it can be read again.
                if matches!(error, FileError::Read { .. }) {
                    self.last.clear();
                }
                self.metrics
                    .file_reloads
                    .with_label_values(&["error"])
                    .inc();
                self.metrics
                    .source_errors
                    .with_label_values(&["file"])
                    .inc();
                tracing::warn!(%error, "file source reload failed; keeping the last good state");
            }
        }
    }
}

/// Watches the directory holding `path` and notifies `changed` when an entry
/// in it is completely written or renamed. Opens, reads and writes still in
/// progress are not signals: reloading mid-write would read half a file.
fn watch_directory(path: &Path, changed: Arc<Notify>) -> notify::Result<RecommendedWatcher> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let complete = match event {
            Ok(event) => matches!(
                event.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(_))
            ),
            // An overflowed or failed watch may have lost a change: look.
            Err(_) => true,
        };
        if complete {
            changed.notify_one();
        }
    })?;
    watcher.watch(directory, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn parse_str(text: &str) -> Result<Services, FileError> {
        parse(Path::new("test.yaml"), text)
    }

    #[test]
    fn parses_the_documented_form() {
        let services = parse_str(
            "services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50051\n      zone: zone-a\n      weight: 2\n    - address: '[::1]:50052'\n      draining: true\n  empty.default:80:\n",
        )
        .unwrap();
        let greeter = &services[&parse_target("greeter.default:grpc").unwrap()];
        assert_eq!(greeter[0].zone, "zone-a");
        assert_eq!(greeter[0].weight, 2);
        assert!(greeter[1].draining && greeter[1].address.is_ipv6());
        assert!(services[&parse_target("empty.default:80").unwrap()].is_empty());
        assert!(parse_str("").unwrap().is_empty());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            ("services: [", "cannot parse"),
            (
                "services:\n  nope:\n    - address: 1.2.3.4:5\n",
                "service \"nope\"",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4\n",
                "not IP:PORT",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:5\n      weight: 0\n",
                "weight",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:5\n      wieght: 2\n",
                "unknown field",
            ),
            ("servics: {}\n", "unknown field"),
        ];
        for (text, want) in cases {
            let err = parse_str(text).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(want), "{text:?}: {message}");
            // lb-server prints a start-up error with its chain of sources:
            // the reason is in the message once, not repeated.
            assert_eq!(format!("{:#}", anyhow::Error::from(err)), message);
        }
        let missing = load(Path::new("/nonexistent/lb.yaml")).unwrap_err();
        let message = format!("{:#}", anyhow::Error::from(missing));
        assert_eq!(message.matches("No such file").count(), 1, "{message}");
    }

    /// One endpoint at `address` for `a.ns:grpc`.
    fn one_endpoint(address: &str) -> String {
        format!("services:\n  a.ns:grpc:\n    - address: {address}:80\n")
    }

    /// The running source sees each kind of complete change at once, with a
    /// poll interval far longer than the test may take: a file renamed into
    /// place, a file rewritten in place, and a ConfigMap volume's `..data`
    /// symlink swapped to a new directory.
    #[tokio::test]
    async fn changes_are_seen_through_the_directory_watch_without_waiting_for_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        // A ConfigMap volume: lb.yaml -> ..data/lb.yaml, ..data -> ..v1.
        std::fs::create_dir(dir.path().join("..v1")).unwrap();
        std::fs::write(dir.path().join("..v1/lb.yaml"), one_endpoint("10.0.0.1")).unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        let path = dir.path().join("lb.yaml");
        std::os::unix::fs::symlink("..data/lb.yaml", &path).unwrap();

        let store = Store::new();
        let source = FileSource::start(
            path.clone(),
            Duration::from_secs(3600),
            store.clone(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let key = parse_target("a.ns:grpc").unwrap();
        let mut subscription = store.subscribe(&key);
        subscription.current();
        let shutdown = CancellationToken::new();
        let (synced, mut watching) = watch::channel(false);
        let running = tokio::spawn(source.run(synced, shutdown.clone()));
        watching.wait_for(|synced| *synced).await.unwrap();
        let mut expect = async |address: &str| {
            let snapshot = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("the change is seen without a poll");
            assert_eq!(snapshot.endpoints[0].address.to_string(), address);
        };

        // The ConfigMap update: a new directory, then ..data renamed over.
        std::fs::create_dir(dir.path().join("..v2")).unwrap();
        std::fs::write(dir.path().join("..v2/lb.yaml"), one_endpoint("10.0.0.2")).unwrap();
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        expect("10.0.0.2").await;

        // An editor's save: a new file renamed over the old one.
        let saved = dir.path().join("lb.yaml.tmp");
        std::fs::write(&saved, one_endpoint("10.0.0.3")).unwrap();
        std::fs::rename(&saved, &path).unwrap();
        expect("10.0.0.3").await;

        // A rewrite in place, seen once the writer closes the file.
        std::fs::write(&path, one_endpoint("10.0.0.4")).unwrap();
        expect("10.0.0.4").await;

        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test]
    async fn broken_reload_keeps_the_last_good_state_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        std::fs::write(
            &path,
            "services:\n  a.ns:grpc:\n    - address: 10.0.0.1:80\n",
        )
        .unwrap();
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let mut source = FileSource::start(
            path.clone(),
            Duration::from_secs(1),
            store.clone(),
            metrics.clone(),
        )
        .unwrap();
        let key = parse_target("a.ns:grpc").unwrap();
        let good = store.get(&key).unwrap();

        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"services: [")
            .unwrap();
        source.poll();
        assert_eq!(store.get(&key).unwrap().version, good.version);
        assert_eq!(metrics.file_reloads.with_label_values(&["error"]).get(), 1);

        std::fs::remove_file(&path).unwrap();
        source.poll();
        assert_eq!(store.get(&key).unwrap().version, good.version);

        std::fs::write(
            &path,
            "services:\n  a.ns:grpc:\n    - address: 10.0.0.2:80\n",
        )
        .unwrap();
        source.poll();
        let next = store.get(&key).unwrap();
        assert!(next.version > good.version);
        assert_eq!(next.endpoints[0].address.to_string(), "10.0.0.2");
        assert_eq!(metrics.file_reloads.with_label_values(&["ok"]).get(), 1);
    }

    #[test]
    fn broken_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let err = FileSource::start(
            path.clone(),
            Duration::from_secs(1),
            store.clone(),
            metrics.clone(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot read"));
        std::fs::write(&path, "services:\n  x:\n").unwrap();
        let err = FileSource::start(path, Duration::from_secs(1), store, metrics).unwrap_err();
        assert!(
            err.to_string().contains("expected NAME.NAMESPACE:PORT")
                || err.to_string().contains("missing port"),
            "{err}"
        );
    }
}
