//! The file source: services and endpoints from a local YAML file, reloaded when it changes.
//!
//! ```yaml
//! services:
//!   greeter.default:grpc:
//!     - address: 127.0.0.1:50051
//!       zone: zone-a        # optional
//!       weight: 2           # optional, default 1
//!     - address: 127.0.0.1:50052
//!       zone: zone-b
//!       node: node-2        # optional, as `pod`
//!       draining: true      # optional, default false
//!       for_zones: [zone-a] # optional EndpointSlice hints: the zones,
//!       for_nodes: [node-1] #   and nodes, whose clients should use it
//! ```
//!
//! A zone (and each `for_zones` entry) is a Kubernetes label value, a node
//! (and each `for_nodes` entry) a DNS subdomain, as a client states its own
//! on its Watch: a name a client could not send would never match.
//!
//! A broken file at start-up is an error the caller reports; a broken file
//! later is logged and counted, and the last good state keeps being served.
//! Broken includes a service listed twice, even under two spellings of one
//! target, an address listed twice for one service, port 0, and a file past
//! [`MAX_FILE_BYTES`] or nested deeper than [`MAX_NESTING`]. A reload reads
//! and parses on a blocking thread, so that a large file never stalls the
//! runtime that serves the APIs.
//!
//! The file's directory is watched (inotify), so a change is seen as soon as
//! it is complete: a write closed, or a file renamed into place, which is how
//! editors save and how Kubernetes swaps a ConfigMap volume's `..data`
//! symlink. The file is also polled (`--file-poll-interval`) for what the
//! watch cannot see (network filesystems, a directory that cannot be watched,
//! a file replaced by a new symlink). Either way the file is reloaded only if
//! its bytes changed, and an empty file is taken as one being rewritten in
//! place, not as one without services.

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    hash::BuildHasher,
    io::Read,
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
    model::{
        Endpoint, Hints, ServiceKey, Services, TargetError, TopologyError, check_node, check_zone,
        parse_target,
    },
    store::Store,
};

/// The largest file the source reads, in bytes: 16 MiB, sixteen times what a
/// ConfigMap can hold. Checked on the file's size before reading and again
/// while reading, so that a file that grows meanwhile cannot get past it.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// The deepest nesting of YAML collections (mappings and sequences) a file
/// may have. The format needs four levels (the document, `services`, a
/// service's list, an endpoint); the limit rejects a file of nested brackets
/// before it costs time or stack.
pub const MAX_NESTING: usize = 8;

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
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{path} is larger than the file source's limit of {} MiB", .limit >> 20)]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: usize,
    },
    /// Not a regular file (a pipe, a device, a directory).
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Not YAML of the expected shape, a service listed twice, or an
    /// endpoint that is wrong in itself (address, port 0, weight 0).
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where (line and column) and why.
        reason: Box<serde_saphyr::Error>,
    },
    /// A key given twice in one mapping: a service listed twice, or a field
    /// of an endpoint.
    #[error("cannot parse {path}: {key} is listed twice (again at line {line}, column {column})")]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key, quoted.
        key: String,
        /// Where the second one is.
        line: u64,
        /// Where the second one is.
        column: u64,
    },
    /// Mappings and lists nested deeper than [`MAX_NESTING`].
    #[error("cannot parse {path}: {reason} (mappings and lists may nest at most {limit} deep)")]
    TooDeep {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: usize,
        /// Where (line and column).
        reason: Box<serde_saphyr::Error>,
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
    /// Two keys that are spellings of one service (`dns:///a.ns:80` and `a.ns:80`).
    #[error(
        "{path}: services {first:?} and {second:?} are the same service {service}; list it once"
    )]
    SameService {
        /// The file.
        path: PathBuf,
        /// One spelling.
        first: String,
        /// The other.
        second: String,
        /// The service both name, as `NAME.NAMESPACE:PORT`.
        service: String,
    },
    /// One address listed twice for one service.
    #[error("{path}: service {key:?}: address {address} is listed more than once")]
    DuplicateAddress {
        /// The file.
        path: PathBuf,
        /// The service key.
        key: String,
        /// The address.
        address: SocketAddr,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Option<BTreeMap<String, Option<Vec<CheckedEndpoint>>>>,
}

/// An endpoint checked and converted as soon as it is read, so that a large
/// file is never held twice (as written and as endpoints), and so that its
/// errors carry the line and column.
#[derive(Debug, Deserialize)]
#[serde(try_from = "FileEndpoint")]
struct CheckedEndpoint(Endpoint);

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
    #[serde(default)]
    for_zones: Vec<String>,
    #[serde(default)]
    for_nodes: Vec<String>,
}

/// One hint list, checked: each name valid and not empty, none twice.
fn hint_list(
    names: Vec<String>,
    field: &str,
    check: fn(&str) -> Result<(), TopologyError>,
) -> Result<Box<[Arc<str>]>, String> {
    let mut out: Vec<Arc<str>> = Vec::with_capacity(names.len());
    for name in names {
        if name.is_empty() {
            return Err(format!("{field}: an empty name"));
        }
        check(&name).map_err(|error| format!("{field}: {error}"))?;
        if out.iter().any(|seen| **seen == *name) {
            return Err(format!("{field}: {name:?} is listed twice"));
        }
        out.push(Arc::from(name));
    }
    Ok(out.into())
}

fn one() -> u32 {
    1
}

impl TryFrom<FileEndpoint> for CheckedEndpoint {
    type Error = String;

    fn try_from(e: FileEndpoint) -> Result<Self, String> {
        let addr: SocketAddr = e.address.parse().map_err(|_| {
            format!(
                "address {:?} is not IP:PORT (IPv6 as [::1]:PORT)",
                e.address
            )
        })?;
        if addr.port() == 0 {
            return Err(format!("address {:?} has port 0", e.address));
        }
        if e.weight == 0 {
            return Err("weight must be at least 1".to_owned());
        }
        check_zone(&e.zone).map_err(|error| error.to_string())?;
        check_node(&e.node).map_err(|error| error.to_string())?;
        let hints = Hints {
            for_zones: hint_list(e.for_zones, "for_zones", check_zone)?,
            for_nodes: hint_list(e.for_nodes, "for_nodes", check_node)?,
        };
        let mut endpoint = Endpoint::new(addr.ip(), addr.port())
            .weight(e.weight)
            .zone(e.zone)
            .node(e.node)
            .pod(e.pod)
            .with_hints(hints);
        endpoint.draining = e.draining;
        Ok(Self(endpoint))
    }
}

/// How the YAML parser is held to the file's limits.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_NESTING,
            flow_nesting_limit: MAX_NESTING,
            // A file has at most about one node or event per byte, so
            // MAX_FILE_BYTES bounds them already: a file under the size
            // limit is not refused for its number of endpoints.
            max_nodes: MAX_FILE_BYTES,
            max_events: MAX_FILE_BYTES,
        },
        // The default, said here because the source relies on it: a service
        // listed twice is an error, not the last one winning.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        // One line (with line and column) for a log, not a rendered excerpt.
        with_snippet: false,
    }
}

/// The parser's error, said for this file: a duplicate key without the
/// parser's advice to its programmer, and a nesting limit named.
fn parse_error(path: &Path, reason: serde_saphyr::Error) -> FileError {
    if let serde_saphyr::Error::DuplicateMappingKey { key, location, .. } = &reason {
        return FileError::DuplicateKey {
            path: path.into(),
            key: key
                .as_ref()
                .map_or_else(|| "a key".to_owned(), |key| format!("{key:?}")),
            line: location.line(),
            column: location.column(),
        };
    }
    // Boxed: the parser's error is large, and results carry it.
    let reason = Box::new(reason);
    if too_deep(&reason) {
        FileError::TooDeep {
            path: path.into(),
            limit: MAX_NESTING,
            reason,
        }
    } else {
        FileError::Parse {
            path: path.into(),
            reason,
        }
    }
}

/// Whether the parser stopped at [`MAX_NESTING`]: its own message does not
/// say which limit.
fn too_deep(error: &serde_saphyr::Error) -> bool {
    use serde_saphyr::{ExternalMessageSource, budget::BudgetBreach, granit_parser::ErrorKind};
    match error {
        serde_saphyr::Error::Budget {
            breach: BudgetBreach::Depth { .. },
            ..
        } => true,
        serde_saphyr::Error::ExternalMessage { source, .. } => matches!(
            source.as_ref(),
            ExternalMessageSource::Parser(scan)
                if matches!(scan.kind(), ErrorKind::RecursionLimitExceeded)
        ),
        _ => false,
    }
}

/// Parses file contents into whole endpoint sets, one per service.
pub fn parse(path: &Path, text: &str) -> Result<Services, FileError> {
    let doc: Option<FileDoc> = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|reason| parse_error(path, reason))?;
    let services = doc.and_then(|d| d.services).unwrap_or_default();
    let mut out = HashMap::with_capacity(services.len());
    // The spelling each service came from, to name both of two spellings.
    let mut spellings: HashMap<ServiceKey, String> = HashMap::with_capacity(services.len());
    for (key_text, endpoints) in services {
        let key = parse_target(&key_text).map_err(|reason| FileError::Target {
            path: path.into(),
            key: key_text.clone(),
            reason,
        })?;
        if let Some(first) = spellings.get(&key) {
            return Err(FileError::SameService {
                path: path.into(),
                first: first.clone(),
                second: key_text,
                service: key.to_string(),
            });
        }
        // The same allocation: a CheckedEndpoint is an Endpoint.
        let mut list: Vec<Endpoint> = endpoints
            .unwrap_or_default()
            .into_iter()
            .map(|checked| checked.0)
            .collect();
        // Sorted as the store keeps them anyway, so that a repeated address
        // is found without a second copy of the list.
        list.sort_by_key(|e| (e.address, e.port));
        if let Some(pair) = list
            .windows(2)
            .find(|pair| (pair[0].address, pair[0].port) == (pair[1].address, pair[1].port))
        {
            return Err(FileError::DuplicateAddress {
                path: path.into(),
                key: key_text,
                address: SocketAddr::new(pair[0].address, pair[0].port),
            });
        }
        out.insert(key.clone(), list);
        spellings.insert(key, key_text);
    }
    Ok(out)
}

/// Reads the file, at most [`MAX_FILE_BYTES`] of it.
fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Without O_NONBLOCK, opening a pipe would wait for a writer, holding up
    // every later reload and shutdown. A regular file ignores the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|reason| FileError::Read {
            path: path.into(),
            reason,
        })?;
    let metadata = file.metadata().map_err(|reason| FileError::Read {
        path: path.into(),
        reason,
    })?;
    if !metadata.is_file() {
        return Err(FileError::NotAFile { path: path.into() });
    }
    read_at_most(file, metadata.len(), MAX_FILE_BYTES, path)
}

/// Reads all of `reader`, whose size was `size`, unless it is more than
/// `limit` bytes. The size is checked first, so that a large file is
/// refused without reading it, and the read is bounded too, so that a file
/// that grew since cannot get past the limit.
fn read_at_most(
    reader: impl Read,
    size: u64,
    limit: usize,
    path: &Path,
) -> Result<Vec<u8>, FileError> {
    let too_large = || FileError::TooLarge {
        path: path.into(),
        limit,
    };
    if size > limit as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|reason| FileError::Read {
            path: path.into(),
            reason,
        })?;
    if bytes.len() > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads and parses the file. It takes time in proportion to the file's
/// size: call it off the async runtime.
pub fn load(path: &Path) -> Result<Services, FileError> {
    parse(path, &String::from_utf8_lossy(&read(path)?))
}

/// Serves a YAML file's services, watching and polling it for changes.
#[derive(Debug)]
pub struct FileSource {
    reloader: Reloader,
    interval: Duration,
    /// Notified by the directory watch.
    changed: Arc<Notify>,
    /// The directory watch, if the directory could be watched. Never read:
    /// it lives as long as the source, and dropping it ends the watch.
    _watcher: Option<RecommendedWatcher>,
}

/// Reloads the file into the store: the part of the source that runs on a
/// blocking thread.
#[derive(Debug)]
struct Reloader {
    path: PathBuf,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// A digest of the bytes last read, not the bytes, which may be up to
    /// [`MAX_FILE_BYTES`]; `None` to read the next file whatever it holds.
    /// The hasher is keyed at random, so no file can be made to collide.
    last: Option<u64>,
    hasher: RandomState,
}

impl FileSource {
    /// Loads the file, publishes its services and starts watching its
    /// directory. A broken file is an error here, so that a process starting
    /// on one exits with the reason. The file is read and parsed on the
    /// calling thread: lb-server does it before it serves anything.
    pub fn start(
        path: PathBuf,
        interval: Duration,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FileError> {
        let hasher = RandomState::new();
        let bytes = read(&path)?;
        let services = parse(&path, &String::from_utf8_lossy(&bytes))?;
        let last = Some(hasher.hash_one(&bytes));
        drop(bytes);
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
            reloader: Reloader {
                path,
                store,
                metrics,
                last,
                hasher,
            },
            interval,
            changed,
            _watcher: watcher,
        })
    }

    /// Polls the file, and reloads it when the directory watch reports a
    /// change, until `shutdown`, publishing each good change.
    pub async fn run(self, synced: watch::Sender<bool>, shutdown: CancellationToken) {
        // `_watcher` is bound, not dropped, so that the watch lasts the loop.
        let Self {
            mut reloader,
            interval,
            changed,
            _watcher,
        } = self;
        // start() has just read the file: the first poll is one interval away.
        let first = tokio::time::Instant::now() + interval;
        let mut ticker = tokio::time::interval_at(first, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        synced.send_replace(true);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = changed.notified() => {}
                _ = ticker.tick() => {}
            }
            // Reading and parsing take time in proportion to the file: on a
            // runtime worker they would stall every API that worker serves.
            let reading = tokio::task::spawn_blocking(move || {
                let read = reloader.read();
                (reloader, read)
            });
            let read;
            (reloader, read) = match reading.await {
                Ok(done) => done,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // The runtime is shutting down.
                Err(_) => return,
            };
            // Published from here, as before: the store then changes all at
            // once for the tasks of a single-threaded runtime.
            reloader.apply(read);
        }
    }
}

/// What reading the file gave: when the read began, and the services, or
/// `None` if the file had not changed.
type Reading = (Instant, Result<Option<Services>, FileError>);

impl Reloader {
    /// Reloads the file if its contents changed.
    #[cfg(test)]
    fn poll(&mut self) {
        let read = self.read();
        self.apply(read);
    }

    /// Reads and parses the file if its contents changed: the slow part.
    fn read(&mut self) -> Reading {
        let event_at = Instant::now();
        let result = read(&self.path).and_then(|bytes| {
            // A file rewritten in place is empty between its truncation and
            // its first write, and a reload may look just then: an empty
            // file is one being written, not one without services (that is
            // `services: {}`), and is read again at the next change.
            if bytes.is_empty() {
                return Ok(None);
            }
            let digest = self.hasher.hash_one(&bytes);
            if self.last == Some(digest) {
                return Ok(None);
            }
            // Remembered even if broken, so a broken file is reported once.
            self.last = Some(digest);
            parse(&self.path, &String::from_utf8_lossy(&bytes)).map(Some)
        });
        (event_at, result)
    }

    /// Publishes what [`Reloader::read`] gave, or reports why it could not.
    fn apply(&mut self, (event_at, result): Reading) {
        match result {
            Ok(None) => {}
            Ok(Some(services)) => {
                let changed = self.store.replace_all(services, event_at);
                self.metrics.file_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(path = %self.path.display(), changed, "reloaded file source");
            }
            Err(error) => {
                // Forget the bytes of a file we could not read, so that the
                // same file is retried once it can be read again.
                if matches!(
                    error,
                    FileError::Read { .. }
                        | FileError::TooLarge { .. }
                        | FileError::NotAFile { .. }
                ) {
                    self.last = None;
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
        assert_eq!(&*greeter[0].zone, "zone-a");
        assert_eq!(greeter[0].weight, 2);
        assert!(greeter[1].draining && greeter[1].address.is_ipv6());
        assert!(services[&parse_target("empty.default:80").unwrap()].is_empty());
        assert!(parse_str("").unwrap().is_empty());
    }

    #[test]
    fn hints_are_read_and_checked() {
        let services = parse_str(
            "services:\n  a.b:c:\n    - address: 1.2.3.4:5\n      zone: us-east-1a\n      node: node-1.example\n      for_zones: [us-east-1a, us-east-1b]\n      for_nodes: [node-1.example]\n    - address: 1.2.3.5:5\n      for_zones: []\n",
        )
        .unwrap();
        let list = &services[&parse_target("a.b:c").unwrap()];
        assert_eq!(
            list[0],
            Endpoint::new("1.2.3.4".parse().unwrap(), 5)
                .zone("us-east-1a")
                .node("node-1.example")
                .for_zones(["us-east-1a", "us-east-1b"])
                .for_nodes(["node-1.example"])
        );
        assert!(list[1].hints.is_none(), "an empty list is no hint");

        let endpoint =
            |fields: &str| format!("services:\n  a.b:c:\n    - address: 1.2.3.4:5\n{fields}");
        let cases = [
            ("      zone: 'zone a'\n", "bad zone \"zone a\""),
            ("      zone: -a\n", "bad zone"),
            ("      node: Node1\n", "bad node \"Node1\""),
            (
                &format!("      zone: {}\n", "z".repeat(64)),
                "zone is 64 bytes long; the limit is 63",
            ),
            ("      for_zones: [a, '']\n", "for_zones: an empty name"),
            (
                "      for_zones: [a, b, a]\n",
                "for_zones: \"a\" is listed twice",
            ),
            (
                "      for_zones: [\"a\\n\"]\n",
                "for_zones: bad zone \"a\\n\"",
            ),
            ("      for_nodes: [n_1]\n", "for_nodes: bad node \"n_1\""),
            ("      for_zones: a\n", "cannot parse"),
            ("      for_zones: [[a]]\n", "cannot parse"),
        ];
        for (fields, want) in cases {
            let text = endpoint(fields);
            let message = parse_str(&text).unwrap_err().to_string();
            assert!(message.contains(want), "{text:?}: {message}");
            assert!(message.contains("at line "), "{text:?}: {message}");
        }
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
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:5\n  a.b:c:\n    - address: 1.2.3.5:5\n",
                "\"a.b:c\" is listed twice (again at line 4, column 3)",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:5\n      address: 1.2.3.5:5\n",
                "\"address\" is listed twice (again at line 4, column 7)",
            ),
            (
                "services:\n  greeter.default:grpc:\n    - address: 1.2.3.4:5\n  dns:///greeter.default:grpc:\n    - address: 1.2.3.5:5\n",
                "services \"dns:///greeter.default:grpc\" and \"greeter.default:grpc\" are the same service",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:0\n",
                "address \"1.2.3.4:0\" has port 0",
            ),
            (
                "services:\n  a.b:c:\n    - address: '[::1]:0'\n",
                "has port 0",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:5\n    - address: 1.2.3.5:5\n    - address: 1.2.3.4:5\n",
                "address 1.2.3.4:5 is listed more than once",
            ),
            (
                "services:\n  a.b:c:\n    - address: 1.2.3.4:0\n",
                "at line 3, column 7",
            ),
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

    /// A source started on `path` (its poll an hour apart, so only the
    /// directory watch or a test's own `poll` reloads), with its store and metrics.
    fn started(path: &Path) -> (FileSource, Arc<Store>, Arc<Metrics>) {
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let source = FileSource::start(
            path.to_owned(),
            Duration::from_secs(3600),
            store.clone(),
            metrics.clone(),
        )
        .unwrap();
        (source, store, metrics)
    }

    /// Runs `source` until it has synced; cancel the token and await the
    /// handle to stop it.
    async fn running(source: FileSource) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let (synced, mut watching) = watch::channel(false);
        let running = tokio::spawn(source.run(synced, shutdown.clone()));
        watching.wait_for(|synced| *synced).await.unwrap();
        (shutdown, running)
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

        let (source, store, _metrics) = started(&path);
        let key = parse_target("a.ns:grpc").unwrap();
        let mut subscription = store.subscribe(&key);
        subscription.current();
        let (shutdown, running) = running(source).await;
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
        let (mut source, store, metrics) = started(&path);
        let key = parse_target("a.ns:grpc").unwrap();
        let good = store.get(&key).unwrap();

        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"services: [")
            .unwrap();
        source.reloader.poll();
        assert_eq!(store.get(&key).unwrap().version, good.version);
        assert_eq!(metrics.file_reloads.with_label_values(&["error"]).get(), 1);

        std::fs::remove_file(&path).unwrap();
        source.reloader.poll();
        assert_eq!(store.get(&key).unwrap().version, good.version);

        std::fs::write(
            &path,
            "services:\n  a.ns:grpc:\n    - address: 10.0.0.2:80\n",
        )
        .unwrap();
        source.reloader.poll();
        let next = store.get(&key).unwrap();
        assert!(next.version > good.version);
        assert_eq!(next.endpoints[0].address.to_string(), "10.0.0.2");
        assert_eq!(metrics.file_reloads.with_label_values(&["ok"]).get(), 1);
    }

    /// A file rewritten in place is empty for a moment: a reload that looks
    /// then keeps the services; `services: {}` is how to have none.
    #[test]
    fn an_empty_file_is_one_being_written_not_one_without_services() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, one_endpoint("10.0.0.1")).unwrap();
        let (mut source, store, metrics) = started(&path);
        let key = parse_target("a.ns:grpc").unwrap();
        let good = store.get(&key).unwrap();

        std::fs::File::create(&path).unwrap();
        source.reloader.poll();
        assert_eq!(store.get(&key).unwrap().version, good.version);
        assert_eq!(metrics.file_reloads.with_label_values(&["error"]).get(), 0);

        std::fs::write(&path, "services: {}\n").unwrap();
        source.reloader.poll();
        assert!(store.get(&key).is_none());
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

    /// Replaces the file at `path` with `text`, renaming it into place as an
    /// editor saves.
    fn save(path: &Path, text: &[u8]) {
        let saved = path.with_extension("tmp");
        std::fs::write(&saved, text).unwrap();
        std::fs::rename(&saved, path).unwrap();
    }

    /// A file past a limit is refused at start and at reload, at once (100 KB
    /// of nested brackets took the previous parser 12 s on a runtime worker),
    /// counted, and the last good state kept; a file at the size limit loads.
    #[test]
    fn oversized_and_deeply_nested_files_are_refused_quickly_keeping_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, one_endpoint("10.0.0.1")).unwrap();
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let start = || {
            FileSource::start(
                path.clone(),
                Duration::from_secs(3600),
                store.clone(),
                metrics.clone(),
            )
        };
        let mut source = start().unwrap();
        let key = parse_target("a.ns:grpc").unwrap();
        let good = store.get(&key).unwrap();

        let nesting = "mappings and lists may nest at most 8 deep";
        let too_large = "larger than the file source's limit of 16 MiB";
        // What the file becomes, how, and what its error says.
        type Replace = fn(&Path);
        let replacements: [(&str, Replace, &str); 4] = [
            (
                "nested brackets in a key",
                |path| {
                    save(
                        path,
                        format!("services:\n  ? {}", "[".repeat(100_000)).as_bytes(),
                    )
                },
                nesting,
            ),
            (
                "nested brackets in a second document",
                |path| {
                    save(
                        path,
                        format!("services: {{}}\n---\n{}", "[".repeat(100_000)).as_bytes(),
                    )
                },
                nesting,
            ),
            (
                "one byte over the size limit",
                |path| {
                    let saved = path.with_extension("tmp");
                    std::fs::File::create(&saved)
                        .unwrap()
                        .set_len(MAX_FILE_BYTES as u64 + 1)
                        .unwrap();
                    std::fs::rename(&saved, path).unwrap();
                },
                too_large,
            ),
            (
                // Opening a pipe for reading waits for a writer: it must not.
                "a named pipe",
                |path| {
                    let pipe = path.with_extension("fifo");
                    let made = std::process::Command::new("mkfifo")
                        .arg(&pipe)
                        .status()
                        .unwrap();
                    assert!(made.success());
                    std::fs::rename(&pipe, path).unwrap();
                },
                "not a regular file",
            ),
        ];
        for (errors, (what, replace, want)) in (1..).zip(replacements) {
            replace(&path);
            let began = Instant::now();
            source.reloader.poll();
            let took = began.elapsed();
            assert!(took < Duration::from_secs(1), "{what}: refused in {took:?}");
            assert_eq!(store.get(&key).unwrap().version, good.version, "{what}");
            assert_eq!(
                metrics.file_reloads.with_label_values(&["error"]).get(),
                errors,
                "{what}"
            );
            let message = start().unwrap_err().to_string();
            assert!(message.contains(want), "{what}: {message}");
        }

        // Exactly at the limit: loads.
        let mut text = one_endpoint("10.0.0.2");
        while text.len() < MAX_FILE_BYTES {
            let line = (MAX_FILE_BYTES - text.len()).min(1000);
            text.push_str(&"#".repeat(line - 1));
            text.push('\n');
        }
        assert_eq!(text.len(), MAX_FILE_BYTES);
        save(&path, text.as_bytes());
        source.reloader.poll();
        let next = store.get(&key).unwrap();
        assert!(next.version > good.version);
        assert_eq!(next.endpoints[0].address.to_string(), "10.0.0.2");
    }

    /// The read is bounded, not only the size checked: a file that grew after
    /// its size was read is refused too.
    #[test]
    fn a_file_that_grows_past_the_limit_while_read_is_refused() {
        let path = Path::new("lb.yaml");
        let grown = read_at_most(std::io::repeat(b'#'), 10, 100, path).unwrap_err();
        assert!(
            matches!(grown, FileError::TooLarge { limit: 100, .. }),
            "{grown}"
        );
        let at_limit = read_at_most(&[b'#'; 100][..], 10, 100, path).unwrap();
        assert_eq!(at_limit.len(), 100);
    }

    /// A reload reads and parses on a blocking thread, not on the runtime:
    /// on a runtime of one thread, a timer keeps firing while a large file is
    /// parsed. Were the parse on the runtime, the timer would stop for all of
    /// it, most of the time from the file's change to its publication.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_file_is_parsed_without_stalling_the_runtime() {
        const ENDPOINTS: u32 = 100_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, one_endpoint("10.0.0.1")).unwrap();
        let (source, store, _metrics) = started(&path);
        let key = parse_target("a.ns:grpc").unwrap();
        let mut subscription = store.subscribe(&key);
        subscription.current();
        let (shutdown, running) = running(source).await;

        // About 3 MB.
        let large: String = std::iter::once("services:\n  a.ns:grpc:\n".to_owned())
            .chain((0..ENDPOINTS).map(|i| {
                let [_, a, b, c] = i.to_be_bytes();
                format!("    - address: 10.{a}.{b}.{c}:80\n")
            }))
            .collect();
        let ticks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let timer = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                let mut interval = tokio::time::interval(Duration::from_millis(1));
                loop {
                    interval.tick().await;
                    // Never held across an await.
                    ticks.lock().unwrap().push(Instant::now());
                }
            }
        });
        let changed_at = Instant::now();
        save(&path, large.as_bytes());
        let snapshot = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("the large file is published");
        let published_at = Instant::now();
        assert_eq!(snapshot.endpoints.len(), ENDPOINTS as usize);
        timer.abort();

        let ticks = ticks.lock().unwrap().clone();
        let marks: Vec<Instant> = std::iter::once(changed_at)
            .chain(
                ticks
                    .into_iter()
                    .filter(|at| (changed_at..published_at).contains(at)),
            )
            .chain(std::iter::once(published_at))
            .collect();
        let stalled = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        let took = published_at - changed_at;
        assert!(
            stalled < took / 2,
            "the runtime stalled for {stalled:?} of the {took:?} the reload took"
        );
        shutdown.cancel();
        running.await.unwrap();
    }
}
