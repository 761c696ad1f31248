//! lb-server's gRPC port over TLS and mutual TLS: who is served, who is
//! refused, and certificates that rotate while clients stay connected.

mod common;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use common::{TestServer, WAIT, next_update, watch_greeter};
use hyper_util::rt::TokioIo;
use lb_server::{Config, LbServer};
use lookaside_proto::lookaside::v1::{ListServicesRequest, admin_client::AdminClient};
use lookaside_tls::{
    ClientFiles, Roots,
    generate::{Ca, Validity},
};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tonic::transport::{Channel, Endpoint};

const ONE: &str = "services:\n  greeter.default:grpc:\n    - address: 10.0.0.1:50051\n";

/// A CA, the server's certificate from it (for `lb.test`), and a client's.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("lookaside test CA").unwrap(),
        };
        std::fs::write(pki.path("ca.crt"), pki.ca.cert()).unwrap();
        pki.ca
            .issue(&["lb.test"])
            .unwrap()
            .write(pki.dir.path(), "server")
            .unwrap();
        pki.ca
            .issue(&["client.test"])
            .unwrap()
            .write(pki.dir.path(), "client")
            .unwrap();
        pki
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// A server configuration with TLS from these files, mTLS if `mutual`.
    fn configure(&self, config: &mut Config, mutual: bool) {
        config.tls_cert = Some(self.path("server.crt"));
        config.tls_key = Some(self.path("server.key"));
        config.tls_client_ca = mutual.then(|| self.path("ca.crt"));
    }

    /// A client that trusts this CA and, if `identity`, presents `client.crt`.
    fn client(&self, identity: bool) -> ClientFiles {
        ClientFiles {
            roots: Roots::File(self.path("ca.crt")),
            identity: identity.then(|| (self.path("client.crt"), self.path("client.key"))),
        }
    }
}

/// A channel to `addr` over TLS with `files`, verifying the name `lb.test`.
async fn tls_channel(
    addr: SocketAddr,
    files: &ClientFiles,
) -> Result<Channel, tonic::transport::Error> {
    let connector = TlsConnector::from(Arc::new(files.load().unwrap()));
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("lb.test").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

async fn list_services(channel: Channel) -> Result<usize, tonic::Status> {
    Ok(AdminClient::new(channel)
        .list_services(ListServicesRequest::default())
        .await?
        .into_inner()
        .services
        .len())
}

fn metric(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn mutual_tls_serves_clients_with_a_certificate_and_refuses_the_rest() {
    let pki = Pki::new();
    let server = TestServer::start_with(ONE, |config| pki.configure(config, true)).await;

    let channel = tls_channel(server.grpc, &pki.client(true)).await.unwrap();
    assert_eq!(list_services(channel.clone()).await.unwrap(), 1);
    let mut watch = watch_greeter(channel).await;

    // No client certificate: the server ends the handshake (TLS 1.3 tells
    // the client with its first read, so the call fails rather than the connect).
    let refused = async |files: &ClientFiles| match tls_channel(server.grpc, files).await {
        Err(_) => true,
        Ok(channel) => list_services(channel).await.is_err(),
    };
    assert!(refused(&pki.client(false)).await, "no client certificate");
    // A certificate from another CA.
    let other = Ca::new("another CA").unwrap();
    other
        .issue(&["client.test"])
        .unwrap()
        .write(pki.dir.path(), "stranger")
        .unwrap();
    let stranger = ClientFiles {
        roots: Roots::File(pki.path("ca.crt")),
        identity: Some((pki.path("stranger.crt"), pki.path("stranger.key"))),
    };
    assert!(
        refused(&stranger).await,
        "a client certificate from another CA"
    );
    // Plaintext.
    let plaintext = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(list_services(channel).await.is_err(), "plaintext");
    }

    // The server kept serving the client it had, and counted the others.
    let update = "services:\n  greeter.default:grpc:\n    - address: 10.0.0.2:50051\n";
    server.write_file(update);
    let next = next_update(&mut watch).await;
    assert_eq!(next.endpoints[0].address, "10.0.0.2");
    let metrics = server.metrics().await;
    let key = "lookaside_rejected_connections_total{listener=\"grpc\",reason=\"tls_handshake\"}";
    assert!(metric(&metrics, key) >= 3, "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn server_only_tls_needs_no_client_certificate() {
    let pki = Pki::new();
    let server = TestServer::start_with(ONE, |config| pki.configure(config, false)).await;
    let channel = tls_channel(server.grpc, &pki.client(false)).await.unwrap();
    assert_eq!(list_services(channel).await.unwrap(), 1);
    server.shutdown().await.unwrap();
}

/// Replaces a certificate and key pair the way the kubelet updates a Secret
/// volume: the new files are written elsewhere and renamed into place.
fn rotate(dir: &Path, name: &str, cert: &str, key: &str) {
    for (ext, contents) in [("crt", cert), ("key", key)] {
        let tmp = dir.join(format!(".{name}.{ext}.new"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_and_open_streams_stay() {
    let pki = Pki::new();
    let server = TestServer::start_with(ONE, |config| pki.configure(config, true)).await;
    let channel = tls_channel(server.grpc, &pki.client(true)).await.unwrap();
    let mut watch = watch_greeter(channel).await;

    // A new CA issues the server a new certificate: a client that trusts
    // only the new CA is refused until the rotation, and served after it.
    let next_ca = Ca::new("next CA").unwrap();
    std::fs::write(pki.path("next-ca.crt"), next_ca.cert()).unwrap();
    let trusts_next = ClientFiles {
        roots: Roots::File(pki.path("next-ca.crt")),
        identity: Some((pki.path("client.crt"), pki.path("client.key"))),
    };
    let served = async || match tls_channel(server.grpc, &trusts_next).await {
        Ok(channel) => list_services(channel).await.is_ok(),
        Err(_) => false,
    };
    assert!(!served().await);
    let issued = next_ca.issue(&["lb.test"]).unwrap();
    rotate(pki.dir.path(), "server", &issued.cert, &issued.key);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !served().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(
            &server.metrics().await,
            "lookaside_tls_reloads_total{result=\"ok\"}"
        ),
        1
    );

    // The Watch opened before the rotation still gets changes.
    server.write_file("services:\n  greeter.default:grpc:\n    - address: 10.0.0.3:50051\n");
    let next = next_update(&mut watch).await;
    assert_eq!(next.endpoints[0].address, "10.0.0.3");

    // A broken rotation (a key of another certificate) is counted, and the
    // last good certificate stays in use.
    let stray = next_ca.issue(&["lb.test"]).unwrap();
    rotate(pki.dir.path(), "server", &issued.cert, &stray.key);
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(
        &server.metrics().await,
        "lookaside_tls_reloads_total{result=\"error\"}",
    ) == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken rotation was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served().await, "the last good certificate is still served");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn broken_tls_files_at_start_name_the_file_and_the_reason() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(&file, ONE).unwrap();
    let expired = pki.ca.issue_with(&["lb.test"], Validity::Expired).unwrap();
    expired.write(pki.dir.path(), "expired").unwrap();
    std::fs::write(pki.path("garbage.pem"), "hello\n").unwrap();
    let other = pki.ca.issue(&["lb.test"]).unwrap();
    other.write(pki.dir.path(), "other").unwrap();
    for (cert, key, expect) in [
        ("missing.crt", "server.key", "missing.crt: No such file"),
        (
            "garbage.pem",
            "server.key",
            "garbage.pem: no PEM certificate",
        ),
        (
            "server.crt",
            "garbage.pem",
            "garbage.pem: no PEM private key",
        ),
        ("server.crt", "other.key", "does not match"),
        (
            "expired.crt",
            "expired.key",
            "expired.crt: the certificate expired on",
        ),
    ] {
        let mut config = Config::for_file(&file);
        config.tls_cert = Some(pki.path(cert));
        config.tls_key = Some(pki.path(key));
        let error = format!("{:#}", LbServer::bind(config).await.unwrap_err());
        assert!(error.contains(expect), "{cert}/{key}: {error}");
        assert!(error.starts_with("TLS: "), "{error}");
    }
}

#[tokio::test]
async fn admin_on_a_port_of_its_own_is_not_on_the_grpc_port() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    std::fs::write(&file, ONE).unwrap();
    let mut config = Config::for_file(&file);
    config.admin_listen = Some(([127, 0, 0, 1], 0).into());
    let server = LbServer::bind(config).await.unwrap();
    let (grpc, admin) = (server.grpc_addr(), server.admin_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let connect = async |addr: SocketAddr| {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    assert_eq!(list_services(connect(admin).await).await.unwrap(), 1);
    let status = list_services(connect(grpc).await).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    // Discovery stays on the gRPC port.
    let watch = watch_greeter(connect(grpc).await).await;
    drop(watch);
    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
