//! A Kubernetes API server stand-in for `discovery.k8s.io/v1` EndpointSlices.
//!
//! No registry ships an API server, so this one speaks the real wire protocol
//! over HTTP/1.1 on `127.0.0.1:0`, enough for kube-rs (or client-go) to list
//! and watch EndpointSlices exactly as against a cluster:
//!
//! - `GET /apis/discovery.k8s.io/v1/endpointslices` and
//!   `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`, with
//!   `labelSelector` (`key`, `!key`, `key=value`, `key==value`, `key!=value`,
//!   `key in (a,b)`, `key notin (a,b)`), `limit`/`continue` (consistent pages),
//!   `resourceVersion` and `resourceVersionMatch` (`NotOlderThan`, `Exact`).
//! - `watch=true|1` streams newline-delimited `{"type":…,"object":…}` events
//!   after `resourceVersion` (synthetic `ADDED`s for `""`/`"0"`), `BOOKMARK`s
//!   when `allowWatchBookmarks` is set, `sendInitialEvents` streaming lists
//!   ending in a `k8s.io/initial-events-end` bookmark, an `ERROR` event with a
//!   410 `Expired` Status for a version older than the retained history, and
//!   the end of the stream at `timeoutSeconds`. An object that stops (starts)
//!   matching the selector is sent as `DELETED` (`ADDED`), as the watch cache does.
//!
//! Resource versions come from one counter, like etcd's revision. The test
//! drives the server through [`KubeApi`]: write objects, compact the history,
//! drop or end open watches, send bookmarks, make requests fail, and await
//! request [`Counters`]. Invariant: every write and the registration of every
//! watch happen under one lock, so a watch never misses or repeats an event.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, State as AxumState},
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::{
    List, api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::ListMeta,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// The EndpointSlice fixture builders, shared with lb-server's unit tests.
pub use lb_server::source::kube::{
    SERVICE_NAME_LABEL,
    fixtures::{EndpointBuilder, SliceBuilder, ep, eps, slice},
};

const GROUP_VERSION: &str = "discovery.k8s.io/v1";
const CLUSTER_PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NAMESPACED_PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices";

/// What the server has been asked so far. Await changes with [`KubeApi::until`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// List requests answered with a list (every page counts).
    pub lists: usize,
    /// Watch requests accepted (including ones that got a 410 event).
    pub watches: usize,
    /// Watch streams open right now.
    pub open_watches: usize,
    /// `BOOKMARK` events written to watch streams.
    pub bookmarks: usize,
    /// Requests answered with 410 Gone (`ERROR` event or status).
    pub expired: usize,
    /// Requests failed on purpose by [`KubeApi::set_failing`].
    pub failed: usize,
}

/// A running stand-in. Stops when dropped or on [`KubeApi::shutdown`].
#[derive(Debug)]
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    // std Mutex: held only for short sections, never across `.await`.
    state: Mutex<ApiState>,
    counters: watch::Sender<Counters>,
    requests: Mutex<Vec<String>>,
    failing: AtomicBool,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct ApiState {
    /// The last resource version handed out (etcd's revision).
    revision: u64,
    /// Current objects by namespace and name.
    objects: BTreeMap<(String, String), EndpointSlice>,
    /// Every change after `compacted`, oldest first.
    history: Vec<Arc<Change>>,
    /// The oldest version a watch may resume from.
    compacted: u64,
    /// Open watch streams.
    watchers: Vec<mpsc::UnboundedSender<Signal>>,
    /// Remaining items of paginated lists, by continue token.
    pages: HashMap<String, Page>,
    next_page: u64,
    next_uid: u64,
}

#[derive(Debug)]
struct Page {
    revision: u64,
    items: VecDeque<EndpointSlice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write. `object` carries the change's resource version (for a delete,
/// the last state with the deletion's version); `previous` the state before.
#[derive(Debug)]
struct Change {
    revision: u64,
    kind: ChangeKind,
    object: EndpointSlice,
    previous: Option<EndpointSlice>,
}

#[derive(Debug, Clone)]
enum Signal {
    Change(Arc<Change>),
    Bookmark(u64),
    /// End the stream cleanly, as at `timeoutSeconds`.
    End,
    /// Abort the connection mid-stream.
    Drop,
}

impl KubeApi {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let shared = Arc::new(Shared {
            state: Mutex::new(ApiState::default()),
            counters: watch::Sender::new(Counters::default()),
            requests: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
        });
        let app = Router::new()
            .route(CLUSTER_PATH, get(cluster_scoped))
            .route(NAMESPACED_PATH, get(namespace_scoped))
            .fallback(not_found)
            .with_state(Arc::clone(&shared));
        let shutdown = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            let serve =
                axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
            if let Err(error) = serve.await {
                tracing::warn!(%error, "kube api stand-in stopped");
            }
        });
        Self {
            shared,
            addr,
            server: Some(server),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs client for this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("the server URL is a valid URI");
        kube::Client::try_from(kube::Config::new(url)).expect("a client for the stand-in")
    }

    /// Writes a kubeconfig that points at this server (no credentials) to
    /// `dir/kubeconfig` and returns its path: what a program run with
    /// `KUBECONFIG` (lb-server `--source kube`) needs to use the stand-in.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
                 users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: stand-in\n    user: test\n\
                 current-context: test\n",
                self.url()
            ),
        )
        .expect("write the kubeconfig");
        path
    }

    /// Creates or replaces a slice (namespace `default` if unset), bumping the
    /// resource version; open watches see `ADDED` or `MODIFIED`. Returns the
    /// object's new resource version.
    ///
    /// # Panics
    /// If the slice has no name.
    pub fn apply(&self, slice: impl Into<EndpointSlice>) -> u64 {
        let mut slice = slice.into();
        let name = slice
            .metadata
            .name
            .clone()
            .expect("an EndpointSlice needs a name");
        let namespace = slice
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into())
            .clone();
        let mut state = self.shared.state.lock().unwrap();
        state.revision += 1;
        let revision = state.revision;
        let key = (namespace, name);
        let previous = state.objects.get(&key).cloned();
        slice.metadata.resource_version = Some(revision.to_string());
        slice.metadata.uid = match &previous {
            Some(previous) => previous.metadata.uid.clone(),
            None => {
                state.next_uid += 1;
                Some(format!("00000000-0000-4000-8000-{:012x}", state.next_uid))
            }
        };
        state.objects.insert(key, slice.clone());
        let kind = if previous.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        state.record(Change {
            revision,
            kind,
            object: slice,
            previous,
        });
        revision
    }

    /// Deletes a slice, bumping the resource version; open watches see
    /// `DELETED`. Returns whether it existed.
    pub fn delete(&self, namespace: &str, name: &str) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        let Some(previous) = state.objects.remove(&(namespace.into(), name.into())) else {
            return false;
        };
        state.revision += 1;
        let revision = state.revision;
        let mut object = previous.clone();
        object.metadata.resource_version = Some(revision.to_string());
        state.record(Change {
            revision,
            kind: ChangeKind::Deleted,
            object,
            previous: Some(previous),
        });
        true
    }

    /// The current objects, sorted by namespace and name.
    pub fn objects(&self) -> Vec<EndpointSlice> {
        let state = self.shared.state.lock().unwrap();
        state.objects.values().cloned().collect()
    }

    /// The current resource version.
    pub fn revision(&self) -> u64 {
        self.shared.state.lock().unwrap().revision
    }

    /// Forgets the history, like etcd compaction after other resources were
    /// written: the revision moves on by one, and a watch from any earlier
    /// version (or a list continue token) gets 410 Gone. Open watches go on.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.revision += 1;
        state.compacted = state.revision;
        state.history.clear();
        state.pages.clear();
    }

    /// Aborts every open watch connection mid-stream (no final chunk).
    pub fn drop_watches(&self) {
        let mut state = self.shared.state.lock().unwrap();
        for watcher in state.watchers.drain(..) {
            let _ = watcher.send(Signal::Drop);
        }
    }

    /// Ends every open watch cleanly, as the server does at `timeoutSeconds`.
    pub fn end_watches(&self) {
        let mut state = self.shared.state.lock().unwrap();
        for watcher in state.watchers.drain(..) {
            let _ = watcher.send(Signal::End);
        }
    }

    /// Sends a `BOOKMARK` at the current revision to every open watch that
    /// asked for bookmarks.
    pub fn bookmark(&self) {
        let mut state = self.shared.state.lock().unwrap();
        let revision = state.revision;
        state.broadcast(&Signal::Bookmark(revision));
    }

    /// While `failing`, every list and watch request gets HTTP 500 with an
    /// `InternalError` Status (not retried by kube-rs's client, unlike 503),
    /// as when the API server loses etcd. Open watches are not touched.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        *self.shared.counters.borrow()
    }

    /// List requests answered so far.
    pub fn lists(&self) -> usize {
        self.counters().lists
    }

    /// Watch requests accepted so far.
    pub fn watches(&self) -> usize {
        self.counters().watches
    }

    /// Waits until `condition` holds for the counters and returns them.
    /// Bound it with a timeout.
    pub async fn until(&self, mut condition: impl FnMut(&Counters) -> bool) -> Counters {
        let mut rx = self.shared.counters.subscribe();
        *rx.wait_for(|c| condition(c))
            .await
            .expect("the sender lives as long as the server")
    }

    /// Every EndpointSlice request so far, as path and query.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Stops accepting, ends every watch, and waits for the server to finish.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

impl ApiState {
    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push(Arc::clone(&change));
        self.broadcast(&Signal::Change(change));
    }

    fn broadcast(&mut self, signal: &Signal) {
        self.watchers
            .retain(|watcher| watcher.send(signal.clone()).is_ok());
    }

    /// The objects as they were at `revision` (at least `compacted`), by
    /// undoing the newer changes.
    fn objects_at(&self, revision: u64) -> BTreeMap<(String, String), EndpointSlice> {
        let mut objects = self.objects.clone();
        for change in self
            .history
            .iter()
            .rev()
            .take_while(|c| c.revision > revision)
        {
            let key = object_key(&change.object);
            match &change.previous {
                Some(previous) => objects.insert(key, previous.clone()),
                None => objects.remove(&key),
            };
        }
        objects
    }
}

fn object_key(slice: &EndpointSlice) -> (String, String) {
    (
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

type Params = HashMap<String, String>;

async fn cluster_scoped(
    AxumState(shared): AxumState<Arc<Shared>>,
    uri: Uri,
    Query(params): Query<Params>,
) -> Response {
    serve(&shared, None, &uri, &params)
}

async fn namespace_scoped(
    AxumState(shared): AxumState<Arc<Shared>>,
    uri: Uri,
    Path(namespace): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    serve(&shared, Some(namespace), &uri, &params)
}

async fn not_found(uri: Uri) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "the server could not find the requested resource ({})",
            uri.path()
        ),
    )
}

fn serve(shared: &Arc<Shared>, namespace: Option<String>, uri: &Uri, params: &Params) -> Response {
    shared.requests.lock().unwrap().push(uri.to_string());
    if shared.failing.load(Ordering::SeqCst) {
        shared.counters.send_modify(|c| c.failed += 1);
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out".into(),
        );
    }
    let selector = match params
        .get("labelSelector")
        .map(|s| Selector::parse(s))
        .transpose()
    {
        Ok(selector) => selector.unwrap_or_default(),
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", message),
    };
    let filter = Filter {
        namespace,
        selector,
    };
    if params.get("watch").is_some_and(|w| flag(w)) {
        watch(shared, filter, params)
    } else {
        list(shared, &filter, params)
    }
}

fn flag(value: &str) -> bool {
    matches!(value, "true" | "1")
}

/// A resource version, or the 400 response for a malformed one.
fn parse_version(value: &str) -> Result<u64, Box<Response>> {
    value.parse().map_err(|_| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("invalid resourceVersion {value:?}"),
        ))
    })
}

fn list(shared: &Shared, filter: &Filter, params: &Params) -> Response {
    let mut state = shared.state.lock().unwrap();
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let version = params.get("resourceVersion").filter(|v| !v.is_empty());
    let version_match = params.get("resourceVersionMatch").filter(|v| !v.is_empty());

    let (revision, mut items) = if let Some(token) =
        params.get("continue").filter(|t| !t.is_empty())
    {
        let Some(page) = state.pages.remove(token) else {
            drop(state);
            shared.counters.send_modify(|c| c.expired += 1);
            return status(
                StatusCode::GONE,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter."
                    .into(),
            );
        };
        (page.revision, page.items)
    } else {
        let revision = match (version, version_match.map(String::as_str)) {
            (None, Some(_)) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                );
            }
            (Some(version), Some("Exact")) => match parse_version(version) {
                Err(response) => return *response,
                Ok(version) if version < state.compacted => {
                    drop(state);
                    shared.counters.send_modify(|c| c.expired += 1);
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        format!("too old resource version: {version}"),
                    );
                }
                Ok(version) => version,
            },
            (Some(version), None | Some("NotOlderThan")) => match parse_version(version) {
                Err(response) => return *response,
                Ok(_) => state.revision,
            },
            (Some(_), Some(other)) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("unsupported resourceVersionMatch {other:?}"),
                );
            }
            (None, None) => state.revision,
        };
        if revision > state.revision {
            return status(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "Too large resource version: {revision}, current: {}",
                    state.revision
                ),
            );
        }
        let objects = if revision == state.revision {
            state.objects.clone()
        } else {
            state.objects_at(revision)
        };
        let items = objects
            .into_values()
            .filter(|o| filter.matches(o))
            .collect();
        (revision, items)
    };

    let mut metadata = ListMeta {
        resource_version: Some(revision.to_string()),
        ..ListMeta::default()
    };
    if let Some(limit) = limit.filter(|&l| items.len() > l) {
        let rest = items.split_off(limit);
        state.next_page += 1;
        let token = format!("page-{}-{}", revision, state.next_page);
        metadata.remaining_item_count = i64::try_from(rest.len()).ok();
        metadata.continue_ = Some(token.clone());
        state.pages.insert(
            token,
            Page {
                revision,
                items: rest,
            },
        );
    }
    drop(state);
    shared.counters.send_modify(|c| c.lists += 1);
    let list = List::<EndpointSlice> {
        items: items.into(),
        metadata,
    };
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&list).expect("a list serializes"),
    )
}

fn watch(shared: &Arc<Shared>, filter: Filter, params: &Params) -> Response {
    let bookmarks = params.get("allowWatchBookmarks").is_some_and(|b| flag(b));
    let initial_events = params.get("sendInitialEvents").is_some_and(|b| flag(b));
    let deadline = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|&t| t > 0)
        .map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let version = params.get("resourceVersion").filter(|v| !v.is_empty());

    let mut state = shared.state.lock().unwrap();
    let mut pending = VecDeque::new();
    let synthetic = initial_events || version.is_none_or(|v| v == "0");
    if synthetic {
        for object in state.objects.values().filter(|o| filter.matches(o)) {
            pending.push_back(event_line("ADDED", object));
        }
        if initial_events {
            pending.push_back(bookmark_line(state.revision, true));
        }
    } else if let Some(version) = version {
        let version = match parse_version(version) {
            Ok(version) => version,
            Err(response) => return *response,
        };
        if version < state.compacted {
            let message = format!("too old resource version: {version} ({})", state.compacted);
            drop(state);
            shared.counters.send_modify(|c| {
                c.watches += 1;
                c.expired += 1;
            });
            let status = status_object(410, "Expired", &message);
            let line = event_line("ERROR", &status);
            return json_response(StatusCode::OK, line);
        }
        for change in state.history.iter().filter(|c| c.revision > version) {
            pending.extend(filter.render(change));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    state.watchers.push(tx);
    drop(state);
    if initial_events {
        shared.counters.send_modify(|c| c.bookmarks += 1);
    }
    shared.counters.send_modify(|c| {
        c.watches += 1;
        c.open_watches += 1;
    });

    let stream = WatchStream {
        pending,
        rx,
        filter,
        bookmarks,
        deadline,
        open: OpenWatch(Arc::clone(shared)),
    };
    let body = futures::stream::unfold(stream, WatchStream::next);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .expect("a valid response")
}

/// One open watch: its queued lines and where new events come from.
struct WatchStream {
    pending: VecDeque<Bytes>,
    rx: mpsc::UnboundedReceiver<Signal>,
    filter: Filter,
    bookmarks: bool,
    deadline: Option<tokio::time::Instant>,
    open: OpenWatch,
}

/// Counts a watch as open until its stream is dropped.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.counters.send_modify(|c| c.open_watches -= 1);
    }
}

impl WatchStream {
    async fn next(mut self) -> Option<(Result<Bytes, io::Error>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(line), self));
            }
            let deadline = async {
                match self.deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            let signal = tokio::select! {
                () = self.open.0.shutdown.cancelled() => return None,
                () = deadline => return None,
                signal = self.rx.recv() => signal?,
            };
            match signal {
                Signal::Change(change) => self.pending.extend(self.filter.render(&change)),
                Signal::Bookmark(revision) if self.bookmarks => {
                    self.open.0.counters.send_modify(|c| c.bookmarks += 1);
                    self.pending.push_back(bookmark_line(revision, false));
                }
                Signal::Bookmark(_) => {}
                Signal::End => return None,
                Signal::Drop => {
                    // An error from the body makes hyper abort the connection.
                    let error = io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "watch dropped by the test",
                    );
                    return Some((Err(error), self));
                }
            }
        }
    }
}

/// Which objects a request sees.
#[derive(Debug, Clone, Default)]
struct Filter {
    namespace: Option<String>,
    selector: Selector,
}

impl Filter {
    fn matches(&self, object: &EndpointSlice) -> bool {
        let in_namespace = self
            .namespace
            .as_ref()
            .is_none_or(|ns| object.metadata.namespace.as_ref() == Some(ns));
        in_namespace && self.selector.matches(object.metadata.labels.as_ref())
    }

    /// The event a watcher sees for a change, if any: an object that starts
    /// matching is `ADDED`, one that stops matching is `DELETED` (with its
    /// previous content at the new version), as the API server's watch cache does.
    fn render(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        match change.kind {
            ChangeKind::Added => now.then(|| event_line("ADDED", &change.object)),
            ChangeKind::Deleted => now.then(|| event_line("DELETED", &change.object)),
            ChangeKind::Modified => match (before, now) {
                (true, true) => Some(event_line("MODIFIED", &change.object)),
                (false, true) => Some(event_line("ADDED", &change.object)),
                (true, false) => {
                    let mut previous = change.previous.clone().expect("matched before");
                    previous.metadata.resource_version = Some(change.revision.to_string());
                    Some(event_line("DELETED", &previous))
                }
                (false, false) => None,
            },
        }
    }
}

/// A label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
    /// `key=value` or `key==value`
    Equals(String, String),
    /// `key!=value` (also true when the key is absent)
    NotEquals(String, String),
    /// `key in (a,b)`
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent)
    NotIn(String, Vec<String>),
}

impl Selector {
    /// Parses the `labelSelector` query syntax.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(Requirement::parse(part)?);
        }
        Ok(Self(requirements))
    }

    /// Whether labels satisfy every requirement.
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Exists(key) => get(key).is_some(),
            Requirement::NotExists(key) => get(key).is_none(),
            Requirement::Equals(key, value) => get(key) == Some(value),
            Requirement::NotEquals(key, value) => get(key) != Some(value),
            Requirement::In(key, values) => get(key).is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn(key, values) => {
                !get(key).is_some_and(|v| values.iter().any(|x| x == v))
            }
        })
    }
}

impl Requirement {
    fn parse(part: &str) -> Result<Self, String> {
        let bad = || format!("unable to parse requirement {part:?}");
        let key = |k: &str| {
            let k = k.trim();
            if k.is_empty() || k.contains(char::is_whitespace) || k.contains(['(', ')', '=', '!']) {
                Err(bad())
            } else {
                Ok(k.to_owned())
            }
        };
        let value = |v: &str| {
            let v = v.trim();
            if v.contains(char::is_whitespace) || v.contains(['(', ')', '=', '!', ',']) {
                Err(bad())
            } else {
                Ok(v.to_owned())
            }
        };
        if let Some(rest) = part.strip_prefix('!') {
            return Ok(Self::NotExists(key(rest)?));
        }
        for (operator, negated) in [(" notin ", true), (" in ", false)] {
            if let Some((k, set)) = part.split_once(operator) {
                let set = set
                    .trim()
                    .strip_prefix('(')
                    .and_then(|s| s.strip_suffix(')'))
                    .ok_or_else(bad)?;
                let values = set.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
                let k = key(k)?;
                return Ok(if negated {
                    Self::NotIn(k, values)
                } else {
                    Self::In(k, values)
                });
            }
        }
        if let Some((k, v)) = part.split_once("!=") {
            return Ok(Self::NotEquals(key(k)?, value(v)?));
        }
        if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            return Ok(Self::Equals(key(k)?, value(v)?));
        }
        Ok(Self::Exists(key(part)?))
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// One watch event, `{"type":KIND,"object":…}`, with `type` first as the API
/// server writes it (Go encodes `metav1.WatchEvent`'s fields in order; a
/// `json!` map would sort `object` first, which makes an adjacently tagged
/// decoder such as kube's buffer the whole object before decoding it).
fn event_line(kind: &str, object: &impl k8s_openapi::serde::Serialize) -> Bytes {
    let mut bytes = format!("{{\"type\":{},\"object\":", json!(kind)).into_bytes();
    serde_json::to_writer(&mut bytes, object).expect("JSON serializes");
    bytes.extend_from_slice(b"}\n");
    Bytes::from(bytes)
}

fn bookmark_line(revision: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": revision.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        &json!({ "kind": "EndpointSlice", "apiVersion": GROUP_VERSION, "metadata": metadata }),
    )
}

fn status_object(code: u16, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = serde_json::to_vec(&status_object(code.as_u16(), reason, &message)).expect("JSON");
    json_response(code, body)
}

fn json_response(code: StatusCode, body: impl Into<Body>) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt, TryStreamExt};
    use kube::{
        Api,
        api::{ListParams, VersionMatch, WatchEvent, WatchParams},
        runtime::{watcher, watcher::Event},
    };

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn names(list: &[EndpointSlice]) -> Vec<String> {
        list.iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect()
    }

    fn name_of<K: kube::Resource>(event: &WatchEvent<K>) -> (String, String) {
        match event {
            WatchEvent::Added(o) => ("ADDED".into(), o.meta().name.clone().unwrap()),
            WatchEvent::Modified(o) => ("MODIFIED".into(), o.meta().name.clone().unwrap()),
            WatchEvent::Deleted(o) => ("DELETED".into(), o.meta().name.clone().unwrap()),
            WatchEvent::Bookmark(b) => ("BOOKMARK".into(), b.metadata.resource_version.clone()),
            WatchEvent::Error(e) => ("ERROR".into(), e.code.to_string()),
        }
    }

    #[test]
    fn watch_events_name_their_type_before_their_object_as_the_api_server_does() {
        let object = slice("default", "greeter-a", "greeter")
            .port("grpc", 50051)
            .endpoint(ep("10.0.0.1"))
            .build();
        for (line, kind) in [
            (event_line("MODIFIED", &object), "MODIFIED"),
            (bookmark_line(7, true), "BOOKMARK"),
            (
                event_line("ERROR", &status_object(410, "Expired", "gone")),
                "ERROR",
            ),
        ] {
            let text = std::str::from_utf8(&line).unwrap();
            let prefix = format!("{{\"type\":\"{kind}\",\"object\":{{");
            assert!(text.starts_with(&prefix), "{text}");
            assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
            let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(parsed["type"], kind);
        }
        let event: WatchEvent<EndpointSlice> =
            serde_json::from_slice(&event_line("MODIFIED", &object)).unwrap();
        assert_eq!(name_of(&event), ("MODIFIED".into(), "greeter-a".into()));
    }

    #[test]
    fn selector_parses_and_matches_the_query_syntax() {
        let l = labels(&[("kubernetes.io/service-name", "greeter"), ("tier", "web")]);
        let cases = [
            ("", true),
            ("kubernetes.io/service-name", true),
            ("!kubernetes.io/service-name", false),
            ("!missing", true),
            ("tier=web", true),
            ("tier==web", true),
            ("tier!=web", false),
            ("missing!=x", true),
            ("tier in (api, web)", true),
            ("tier in (api)", false),
            ("tier notin (api,db)", true),
            ("missing notin (a)", true),
            ("kubernetes.io/service-name,tier=web", true),
            ("kubernetes.io/service-name,tier=api", false),
        ];
        for (text, want) in cases {
            let selector = Selector::parse(text).unwrap();
            assert_eq!(selector.matches(Some(&l)), want, "{text:?}");
        }
        assert!(!Selector::parse("tier").unwrap().matches(None));
        for bad in ["tier in web", "a b", "=x", "tier in (a b)"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn list_then_watch_from_its_version_sees_every_change_and_bookmarks() {
        let server = KubeApi::start().await;
        server.apply(
            slice("default", "greeter-a", "greeter")
                .port("grpc", 50051)
                .endpoint(ep("10.0.0.1")),
        );
        server.apply(slice("other", "x-a", "x").port("http", 80));
        let api: Api<EndpointSlice> = Api::all(server.client());

        let list = api
            .list(&ListParams::default().labels(SERVICE_NAME_LABEL))
            .await
            .unwrap();
        assert_eq!(names(&list.items), ["greeter-a", "x-a"]);
        let version = list.metadata.resource_version.clone().unwrap();
        assert_eq!(version, "2");
        assert_eq!(
            list.items[0].metadata.resource_version.as_deref(),
            Some("1")
        );

        let stream = api
            .watch(&WatchParams::default().labels(SERVICE_NAME_LABEL), &version)
            .await
            .unwrap();
        let mut stream = std::pin::pin!(stream);
        tokio::time::timeout(WAIT, server.until(|c| c.open_watches == 1))
            .await
            .unwrap();
        server.apply(slice("default", "greeter-a", "greeter").port("grpc", 50051));
        server.apply(slice("default", "unlabeled", "greeter").without_service_label());
        server.bookmark();
        assert!(server.delete("other", "x-a"));
        let mut seen = Vec::new();
        for _ in 0..3 {
            let event = tokio::time::timeout(WAIT, stream.try_next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen.push(name_of(&event));
        }
        assert_eq!(
            seen,
            [
                ("MODIFIED", "greeter-a"),
                ("BOOKMARK", "4"),
                ("DELETED", "x-a")
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        assert_eq!(server.counters().bookmarks, 1);
        assert_eq!(server.requests().len(), 2);
        assert!(server.requests()[1].contains("watch=true"));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_watch_from_a_compacted_version_gets_an_expired_error_event() {
        let server = KubeApi::start().await;
        let version = server.apply(slice("default", "greeter-a", "greeter"));
        server.compact();
        let api: Api<EndpointSlice> = Api::all(server.client());
        let events: Vec<_> = api
            .watch(&WatchParams::default(), &version.to_string())
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(events.len(), 1);
        match events[0].as_ref().unwrap() {
            WatchEvent::Error(status) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        // The current version is still fine.
        let stream = api
            .watch(
                &WatchParams::default().timeout(1),
                &server.revision().to_string(),
            )
            .await
            .unwrap();
        let events: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
            .await
            .unwrap();
        assert!(
            events.is_empty(),
            "timeoutSeconds ends a quiet watch: {events:?}"
        );
        assert_eq!(server.counters().expired, 1);
    }

    #[tokio::test]
    async fn pages_are_consistent_and_expire_with_compaction() {
        let server = KubeApi::start().await;
        for i in 0..5 {
            server.apply(slice("default", &format!("s-{i}"), "greeter"));
        }
        let api: Api<EndpointSlice> = Api::all(server.client());
        let first = api.list(&ListParams::default().limit(2)).await.unwrap();
        assert_eq!(names(&first.items), ["s-0", "s-1"]);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        server.apply(slice("default", "s-00", "greeter"));
        let token = first.metadata.continue_.clone().unwrap();
        let second = api
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(
            names(&second.items),
            ["s-2", "s-3"],
            "pages come from one snapshot"
        );
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );

        server.compact();
        let token = second.metadata.continue_.clone().unwrap();
        let error = api
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err();
        assert!(
            matches!(error, kube::Error::Api(ref s) if s.code == 410),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_exact_list_rewinds_history_and_a_compacted_one_is_gone() {
        let server = KubeApi::start().await;
        let v1 = server.apply(slice("default", "a", "greeter"));
        server.apply(slice("default", "b", "greeter"));
        server.delete("default", "a");
        let api: Api<EndpointSlice> = Api::all(server.client());
        let exact = ListParams::default()
            .at(&v1.to_string())
            .matching(VersionMatch::Exact);
        let old = api.list(&exact).await.unwrap();
        assert_eq!(names(&old.items), ["a"]);
        assert_eq!(old.metadata.resource_version, Some(v1.to_string()));
        let now = api.list(&ListParams::default()).await.unwrap();
        assert_eq!(names(&now.items), ["b"]);
        server.compact();
        let error = api.list(&exact).await.unwrap_err();
        assert!(
            matches!(error, kube::Error::Api(ref s) if s.code == 410),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn label_and_namespace_changes_look_like_the_watch_cache() {
        let server = KubeApi::start().await;
        server.apply(slice("a", "greeter-a", "greeter"));
        server.apply(slice("b", "greeter-b", "greeter"));
        let api: Api<EndpointSlice> = Api::namespaced(server.client(), "a");
        let list = api
            .list(&ListParams::default().labels(SERVICE_NAME_LABEL))
            .await
            .unwrap();
        assert_eq!(names(&list.items), ["greeter-a"]);
        let stream = api
            .watch(
                &WatchParams::default().labels(SERVICE_NAME_LABEL),
                list.metadata.resource_version.as_deref().unwrap(),
            )
            .await
            .unwrap();
        let mut stream = std::pin::pin!(stream);
        tokio::time::timeout(WAIT, server.until(|c| c.open_watches == 1))
            .await
            .unwrap();
        server.apply(slice("b", "greeter-b", "greeter").label("x", "y"));
        server.apply(slice("a", "greeter-a", "greeter").without_service_label());
        server.apply(slice("a", "greeter-a", "greeter"));
        let mut seen = Vec::new();
        for _ in 0..2 {
            let event = tokio::time::timeout(WAIT, stream.try_next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen.push(name_of(&event));
        }
        assert_eq!(
            seen,
            [("DELETED", "greeter-a"), ("ADDED", "greeter-a")]
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        assert!(
            server
                .requests()
                .iter()
                .all(|r| r.starts_with("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices"))
        );
    }

    #[tokio::test]
    async fn kube_watcher_streaming_lists_and_dropped_connections_work() {
        let server = KubeApi::start().await;
        server.apply(slice("default", "a", "greeter"));
        server.apply(slice("default", "b", "greeter"));
        let api: Api<EndpointSlice> = Api::all(server.client());
        let stream = watcher(api, watcher::Config::default().streaming_lists());
        let mut stream = std::pin::pin!(stream);
        let mut next = async || {
            // One deadline for the whole wait: errors before the resume must
            // not restart the clock.
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let event = tokio::time::timeout_at(deadline, stream.next())
                    .await
                    .expect("an event before the deadline")
                    .unwrap();
                return match event {
                    // A dropped connection surfaces as an error before the resume.
                    Err(_) => continue,
                    Ok(Event::Init) => "init".to_owned(),
                    Ok(Event::InitApply(o)) => format!("init-apply {}", o.metadata.name.unwrap()),
                    Ok(Event::InitDone) => "init-done".to_owned(),
                    Ok(Event::Apply(o)) => format!("apply {}", o.metadata.name.unwrap()),
                    Ok(Event::Delete(o)) => format!("delete {}", o.metadata.name.unwrap()),
                };
            }
        };
        for want in ["init", "init-apply a", "init-apply b", "init-done"] {
            assert_eq!(next().await, want);
        }
        assert!(server.requests()[0].contains("sendInitialEvents=true"));
        // The watcher is lazy: it reconnects when polled, from its last version.
        server.drop_watches();
        server.apply(slice("default", "c", "greeter"));
        assert_eq!(next().await, "apply c", "resumed without a re-list");
        assert_eq!(server.watches(), 2);
        assert_eq!(server.lists(), 0);
    }
}
