//! `greeter-server`: answers `SayHello` with the name of the backend that served it.
//!
//! On shutdown it first reports NOT_SERVING (so health-checking balancers and
//! Kubernetes stop sending), then stops accepting and finishes calls in flight.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use lookaside_tls::Reloading;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};
use tonic::transport::server::Connected;

use lookaside_proto::helloworld::{
    HelloReply, HelloRequest,
    greeter_server::{Greeter, GreeterServer},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// The `helloworld.Greeter` implementation.
#[derive(Debug, Clone)]
pub struct GreeterService {
    name: String,
    cpu_work: Duration,
    zone: Option<CrossZone>,
}

/// The metadata key a caller names its zone with, for
/// [`GreeterService::with_cross_zone_delay`]: an emulated cross-zone hop for
/// experiments, not something production clients send.
pub const CLIENT_ZONE_HEADER: &str = "x-client-zone";

/// The zone a greeter is in and the delay calls from other zones get.
#[derive(Debug, Clone)]
struct CrossZone {
    zone: String,
    delay: Duration,
}

impl GreeterService {
    /// A greeter that signs replies with `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            cpu_work: Duration::ZERO,
            zone: None,
        }
    }

    /// Places this greeter in `zone` and delays (in wall time, without
    /// using CPU) each call whose [`CLIENT_ZONE_HEADER`] names another zone
    /// by `delay`: a cross-zone network hop, emulated on loopback for
    /// benchmarks. Calls without the header are not delayed.
    pub fn with_cross_zone_delay(mut self, zone: impl Into<String>, delay: Duration) -> Self {
        self.zone = Some(CrossZone {
            zone: zone.into(),
            delay,
        });
        self
    }

    /// Makes each call spend `work` of CPU before it answers, so that a
    /// backend can be made slow in a way its load reports show.
    pub fn with_cpu_work(mut self, work: Duration) -> Self {
        self.cpu_work = work;
        self
    }
}

/// Spends `work` of this thread's CPU time (not wall time: a preempted
/// thread keeps spinning until it has really used it).
fn spend_cpu(work: Duration) {
    use nix::time::{ClockId, clock_gettime};
    let now = || clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map(Duration::from);
    let Ok(start) = now() else {
        return;
    };
    let mut x = 0u64;
    while now().is_ok_and(|t| t.saturating_sub(start) < work) {
        for _ in 0..64 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
}

#[tonic::async_trait]
impl Greeter for GreeterService {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        if let Some(cross) = &self.zone
            && let Some(from) = request.metadata().get(CLIENT_ZONE_HEADER)
            && from.as_bytes() != cross.zone.as_bytes()
            && !cross.delay.is_zero()
        {
            tokio::time::sleep(cross.delay).await;
        }
        let who = request.into_inner().name;
        if !self.cpu_work.is_zero() {
            spend_cpu(self.cpu_work);
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello {who} from {}", self.name),
            backend: self.name.clone(),
        }))
    }
}

/// How a greeter server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The backend's name in replies.
    pub name: String,
    /// Close each connection after this long (grpc-go's `MaxConnectionAge`),
    /// so DNS-mode clients re-resolve. `None` keeps connections open.
    pub max_connection_age: Option<Duration>,
    /// After shutdown starts, keep serving (while reporting NOT_SERVING) this
    /// long, so that endpoint updates reach every client before the listener
    /// closes: Kubernetes removes a terminating pod from EndpointSlices at the
    /// same time as it sends SIGTERM.
    pub shutdown_delay: Duration,
    /// How long to wait for calls in flight after the listener closes.
    pub drain_timeout: Duration,
    /// Serve TLS with the configuration in use at each handshake (it is
    /// replaced when its files rotate); `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// CPU each call spends before answering (zero: none).
    pub cpu_work: Duration,
    /// The zone this backend is in and the delay calls from other zones get
    /// (see [`GreeterService::with_cross_zone_delay`]); `None`: no delay.
    pub cross_zone: Option<(String, Duration)>,
}

/// A TLS server configuration that rotates (see `lookaside_tls::Reloading`).
pub type ServerTls = Arc<Reloading<ServerConfig>>;

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections, each past its TLS handshake. Handshakes run in
/// tasks of their own so that a slow or silent client holds up no other;
/// failed ones are logged and dropped (the client sees the TLS alert).
fn tls_incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl futures::Stream<Item = std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConn(stream))).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A TLS connection as tonic's server takes it.
#[derive(Debug)]
pub struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = <tokio::net::TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serves the greeter on `listener` until `shutdown`, then reports
/// NOT_SERVING, keeps serving for `shutdown_delay`, stops accepting and
/// finishes calls in flight (bounded by `drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GreeterServer<GreeterService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lookaside_proto::HELLOWORLD_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(lookaside_proto::ORCA_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lookaside_proto::HELLOWORLD_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(lookaside_proto::ORCA_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Load reports (ORCA) per call and out of band, for weighted balancers.
    let load = lookaside_orca::LoadReporter::new();

    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = options.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_timeout = options.drain_timeout;
    let shutdown_delay = options.shutdown_delay;
    let mut greeter = GreeterService::new(options.name).with_cpu_work(options.cpu_work);
    if let Some((zone, delay)) = options.cross_zone {
        greeter = greeter.with_cross_zone_delay(zone, delay);
    }
    let router = builder
        .layer(load.layer())
        .add_service(GreeterServer::new(greeter))
        .add_service(load.service())
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1);
    let stopped = async {
        let _ = stop_rx.await;
    };
    let serving = match options.tls {
        None => {
            // tonic's tcp_nodelay applies only to sockets it accepts itself.
            let incoming =
                tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |accepted| {
                    accepted.inspect(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    })
                });
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        Some(tls) => {
            tokio::spawn(router.serve_with_incoming_shutdown(tls_incoming(listener, tls), stopped))
        }
    };
    shutdown.await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<GreeterServer<GreeterService>>()
        .await;
    if !shutdown_delay.is_zero() {
        tracing::info!(
            ?shutdown_delay,
            "NOT_SERVING; still serving until the delay passes"
        );
        tokio::time::sleep(shutdown_delay).await;
    }
    // Out-of-band report streams never end by themselves.
    load.close();
    let _ = stop_tx.send(());
    match tokio::time::timeout(drain_timeout, serving).await {
        Ok(joined) => joined??,
        Err(_) => tracing::warn!(?drain_timeout, "drain deadline passed with calls in flight"),
    }
    Ok(())
}

/// Binds `addr` and returns the listener with its actual address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// A greeter running in this process on loopback, stopped by its handle:
/// what the demo and the end-to-end tests run as backends.
#[derive(Debug)]
pub struct LocalGreeter {
    /// Its name, as replies carry it.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl LocalGreeter {
    /// Starts a greeter named `name` on `addr` (port 0: the OS picks).
    pub async fn start(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(name, addr, None).await
    }

    /// Starts a greeter that serves TLS with `tls` if given.
    pub async fn start_with(
        name: &str,
        addr: SocketAddr,
        tls: Option<ServerTls>,
    ) -> anyhow::Result<Self> {
        let (listener, addr) = bind(addr).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let options = ServerOptions {
            name: name.into(),
            max_connection_age: None,
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            tls,
            cpu_work: Duration::ZERO,
            cross_zone: None,
        };
        let task = tokio::spawn(serve(listener, options, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            name: name.into(),
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Stops gracefully: NOT_SERVING, no new connections, calls in flight
    /// finish (within the 5 s drain timeout).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}
