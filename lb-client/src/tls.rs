//! TLS for the LB connection and the backend connections: which CAs to
//! trust, which certificate to present, and the configuration in use,
//! reloaded when its files change.
//!
//! Loading, checking and watching the files is `lookaside-tls`'s; this
//! module only says what a channel needs from it.

use std::{path::PathBuf, sync::Arc};

use lookaside_tls::{ClientFiles, Reloading, Roots, TlsError, WatchHandle};
use tokio_rustls::rustls::ClientConfig;

/// TLS settings for a channel's connections: the CAs a server's certificate
/// must chain to and, for servers that require one (mTLS), a client
/// certificate and key. The files are read when the channel is built and
/// again whenever they change (a Secret volume's rotation); new connections
/// use the new files, open ones stay as they are.
///
/// ```no_run
/// let tls = lb_client::ClientTls::ca_file("/etc/lookaside/tls/ca.crt")
///     .identity("/etc/lookaside/tls/tls.crt", "/etc/lookaside/tls/tls.key");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    files: ClientFiles,
}

impl ClientTls {
    /// Trusts the CA certificates in a PEM file.
    pub fn ca_file(path: impl Into<PathBuf>) -> Self {
        Self {
            files: ClientFiles {
                roots: Roots::File(path.into()),
                identity: None,
            },
        }
    }

    /// Trusts the operating system's CA store.
    pub fn system_roots() -> Self {
        Self {
            files: ClientFiles {
                roots: Roots::System,
                identity: None,
            },
        }
    }

    /// Presents this certificate chain (PEM, leaf first) and key to servers
    /// that ask for one (mTLS).
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.files.identity = Some((cert.into(), key.into()));
        self
    }

    /// Loads the files and starts watching them. Needs a Tokio runtime.
    pub(crate) fn start(&self) -> Result<Loaded, TlsError> {
        let config = Reloading::new(self.files.load()?);
        let files = self.files.clone();
        let watch = config.watch(
            self.files.paths(),
            move || files.load(),
            |result| match result {
                Ok(()) => tracing::info!("lb-client: TLS files reloaded"),
                Err(error) => tracing::warn!(
                    %error,
                    "lb-client: TLS files changed but cannot be used; keeping the previous ones"
                ),
            },
        );
        Ok(Loaded {
            config,
            _watch: Arc::new(watch),
        })
    }
}

/// A loaded configuration and the watch that keeps it current (the watch
/// ends when the last clone goes).
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) config: Arc<Reloading<ClientConfig>>,
    _watch: Arc<WatchHandle>,
}

/// The reason a TLS handshake failed, as a call's error shows it: rustls's
/// error when there is one (unknown CA, name mismatch, expired certificate,
/// a peer that does not speak TLS).
pub(crate) fn handshake_error(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<tokio_rustls::rustls::Error>())
    {
        Some(tls) => format!("TLS handshake: {tls}"),
        None => format!("TLS handshake: {error}"),
    }
}
