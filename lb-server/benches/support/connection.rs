//! One HTTP/2 connection driven directly through hyper, as a tonic
//! transport: no tower buffer or worker task in between, so a client in a
//! one-machine benchmark costs as little as it can and the server's cost shows.
//! Shared by the fan-out benchmark and the `connection_memory` example.

use std::net::SocketAddr;

/// One HTTP/2 connection.
#[derive(Clone)]
pub(crate) struct Connection {
    pub(crate) sender: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
}

impl Connection {
    /// Connects (TCP_NODELAY, HTTP/2 handshake) and returns the connection with its origin URI.
    pub(crate) async fn open(addr: SocketAddr) -> (Self, http::Uri) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let origin = format!("http://{addr}").parse().unwrap();
        (Self { sender }, origin)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.sender.send_request(request))
    }
}
