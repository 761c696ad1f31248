//! The gRPC port's front door: accepts connections under the connection
//! limit, finishes each one's handshake (TLS, when configured, then the
//! HTTP/2 preface) within the handshake timeout, and only then hands it to
//! the gRPC server.
//!
//! Handshakes run each in a task of their own, so a client that connects and
//! sends nothing delays no one, and holds its connection slot for at most
//! the handshake timeout. When accepting fails (out of file descriptors) the
//! loop backs off instead of spinning; the connection limit is lowered at
//! start to what the file descriptor limit allows, so that is rare.
//!
//! At shutdown every stream is ended, and a client that reads gets the end
//! at once; one that stopped reading leaves the end of its streams queued
//! behind flow control, and its connection open. [`Closer`] closes such
//! connections when the shutdown's grace runs out, so that they cannot hold
//! the process past its deadline.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use prometheus::IntCounterVec;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::Instrument;

use lookaside_tls::Reloading;
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig, server::TlsStream};

use crate::limits::{ConnInfo, Limits};

/// The TLS configuration of a port that serves TLS, as it is now.
pub type ServerTls = Arc<Reloading<ServerConfig>>;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest pause after a failed accept; it starts at 5 ms and doubles.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Closes, at once, every connection its listeners handed out that is still
/// open: for the connections left when the shutdown's grace has run out.
///
/// It shuts their sockets down (both ways): the server's pending read on
/// each then ends and the server drops the connection. Nothing is added to
/// a connection's reads and writes for it.
#[derive(Debug, Clone, Default)]
pub struct Closer {
    open: Arc<Mutex<HashMap<u64, RawFd>>>,
    next_id: Arc<AtomicU64>,
}

impl Closer {
    /// Closes every open connection; returns how many there were.
    pub fn close_all(&self) -> usize {
        let open = self.open.lock().unwrap();
        for fd in open.values() {
            // The fd is still open: a connection leaves the map (under this
            // lock) before its socket is closed.
            let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both);
        }
        open.len()
    }

    fn register(&self, fd: RawFd) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap().insert(id, fd);
        Registration {
            closer: self.clone(),
            id,
        }
    }
}

/// A connection's place in its [`Closer`], left when the connection is dropped.
#[derive(Debug)]
struct Registration {
    closer: Closer,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.closer.open.lock().unwrap().remove(&self.id);
    }
}

/// Accepts connections on `listener` until `token` is cancelled and yields
/// each one whose handshake (TLS with the configuration current when it
/// connected, if `tls`; then the HTTP/2 preface) completed in time, ready for
/// `serve_with_incoming`. Connections over `limits.max_connections` and
/// failed handshakes are closed and counted in `rejected{listener=name,reason}`;
/// `closer` closes the connections handed out.
pub fn incoming(
    name: &'static str,
    listener: TcpListener,
    tls: Option<ServerTls>,
    limits: Limits,
    rejected: IntCounterVec,
    token: CancellationToken,
    closer: Closer,
) -> impl futures::Stream<Item = io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(
        async move {
            accept_loop(
                &listener,
                &slots,
                &rejected,
                name,
                &token,
                |tcp, remote, slot| {
                    let accepted = Accepted {
                        name,
                        remote,
                        slot,
                        tls: tls.as_ref().map(|tls| TlsAcceptor::from(tls.current())),
                        timeout: limits.handshake_timeout,
                        closer: closer.clone(),
                    };
                    tokio::spawn(accepted.handshake(
                        tcp,
                        tx.clone(),
                        rejected.clone(),
                        token.clone(),
                    ));
                },
            )
            .await;
        }
        .instrument(tracing::info_span!("accept", listener = name)),
    );
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection accepted, before its handshake.
struct Accepted {
    name: &'static str,
    remote: SocketAddr,
    slot: OwnedSemaphorePermit,
    tls: Option<TlsAcceptor>,
    timeout: Duration,
    closer: Closer,
}

impl Accepted {
    /// Runs the handshake within its timeout and hands the connection on,
    /// or closes it and counts why.
    async fn handshake(
        self,
        tcp: TcpStream,
        ready: mpsc::Sender<io::Result<Conn>>,
        rejected: IntCounterVec,
        token: CancellationToken,
    ) {
        let done = tokio::select! {
            _ = token.cancelled() => return,
            done = tokio::time::timeout(self.timeout, handshake(tcp, self.tls)) => done,
        };
        let remote = self.remote;
        let reason = match done {
            Ok(Ok(transport)) => {
                let fd = match &transport {
                    Transport::Plain(tcp) => tcp.as_raw_fd(),
                    Transport::Tls(tls) => tls.get_ref().0.as_raw_fd(),
                };
                let conn = Conn {
                    _registration: self.closer.register(fd),
                    transport,
                    preface_replayed: 0,
                    info: ConnInfo::new(Some(remote)),
                    _slot: self.slot,
                };
                let _ = ready.send(Ok(conn)).await;
                return;
            }
            Ok(Err(HandshakeError::NotHttp2)) => "not_http2",
            Ok(Err(HandshakeError::Tls(error))) => {
                tracing::debug!(%remote, %error, "TLS handshake failed");
                "tls_handshake"
            }
            Ok(Err(HandshakeError::Io(error))) => {
                tracing::debug!(%remote, %error, "connection failed in its handshake");
                "handshake_error"
            }
            Err(_elapsed) => "handshake_timeout",
        };
        rejected.with_label_values(&[self.name, reason]).inc();
    }
}

/// Accepts until `token` is cancelled, hands each connection that gets a
/// slot to `serve`, and closes (and counts) the rest. Accept errors back off
/// from 5 ms to [`MAX_ACCEPT_BACKOFF`], logging when they start and end.
pub(crate) async fn accept_loop(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    rejected: &IntCounterVec,
    name: &str,
    token: &CancellationToken,
    mut serve: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
) {
    let mut backoff = Duration::ZERO;
    let mut failures = 0u64;
    let mut full = false;
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, remote)) => {
                if failures > 0 {
                    tracing::info!(failures, "accepting connections again");
                    failures = 0;
                    backoff = Duration::ZERO;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    rejected.with_label_values(&[name, "max_connections"]).inc();
                    if !full {
                        tracing::warn!("connection limit reached; closing new connections");
                        full = true;
                    }
                    drop(tcp);
                    continue;
                };
                full = false;
                // Without it a second small write waits for the peer's ACK
                // of the first (Nagle), which a delayed ACK can hold 40 ms.
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "could not set TCP_NODELAY");
                }
                serve(tcp, remote, slot);
            }
            Err(error) if is_connection_error(&error) => {
                // The peer gave up before we accepted: nothing to back off from.
                rejected.with_label_values(&[name, "accept_error"]).inc();
            }
            Err(error) => {
                rejected.with_label_values(&[name, "accept_error"]).inc();
                if failures == 0 {
                    tracing::warn!(%error, "cannot accept connections; backing off");
                }
                failures += 1;
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[derive(Debug)]
enum HandshakeError {
    NotHttp2,
    Tls(io::Error),
    Io(io::Error),
}

/// The TLS handshake, if `tls`, then the HTTP/2 preface, read to check it
/// ([`Conn`] replays it to the server).
async fn handshake(tcp: TcpStream, tls: Option<TlsAcceptor>) -> Result<Transport, HandshakeError> {
    let mut transport = match tls {
        Some(acceptor) => Transport::Tls(Box::new(
            acceptor.accept(tcp).await.map_err(HandshakeError::Tls)?,
        )),
        None => Transport::Plain(tcp),
    };
    let mut preface = [0u8; 24];
    transport
        .read_exact(&mut preface)
        .await
        .map_err(HandshakeError::Io)?;
    if &preface != PREFACE {
        return Err(HandshakeError::NotHttp2);
    }
    Ok(transport)
}

/// A connection in plaintext or in TLS.
#[derive(Debug)]
pub enum Transport {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS (boxed: its state is large, and a port serves one or the other).
    Tls(Box<TlsStream<TcpStream>>),
}

/// Calls the same method on whichever stream a [`Transport`] holds.
macro_rules! delegate {
    ($self:ident, $io:ident => $body:expr) => {
        match $self.get_mut() {
            Transport::Plain($io) => {
                let $io = Pin::new($io);
                $body
            }
            Transport::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $body
            }
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(io) => io.is_write_vectored(),
            Transport::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// One accepted connection, past its handshake: holds its connection slot
/// until the gRPC server drops it. Its first reads give back the HTTP/2
/// preface the handshake read to check.
#[derive(Debug)]
pub struct Conn {
    /// First: fields drop in order, and the connection must leave its
    /// [`Closer`] before its socket is closed (and its fd number reused).
    _registration: Registration,
    transport: Transport,
    /// How much of [`PREFACE`] was given back.
    preface_replayed: usize,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.preface_replayed < PREFACE.len() {
            let rest = &PREFACE[self.preface_replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface_replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.transport).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.transport.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_shutdown(cx)
    }
}

/// The connection limit the file descriptor limit allows: the soft limit is
/// first raised to the hard one (as Go's runtime does), then
/// [`RESERVED_FDS`](crate::limits::RESERVED_FDS) are kept back for
/// everything else. Returns the limit to use and, if it had to be lowered,
/// the file descriptor limit that lowered it.
pub fn fit_to_fd_limit(max_connections: usize) -> (usize, Option<u64>) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (max_connections, None);
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let allowed = soft.saturating_sub(crate::limits::RESERVED_FDS).max(1);
    if (max_connections as u64) > allowed {
        (allowed as usize, Some(soft))
    } else {
        (max_connections, None)
    }
}
