//! TLS for Lookaside: rustls configurations built from PEM files, checked
//! when they are loaded, and rebuilt when the files change.
//!
//! Kubernetes users hold certificates in Secrets mounted as files (often
//! issued by cert-manager), which the kubelet rotates in place by swapping the
//! volume's `..data` symlink. Every Lookaside process that serves or calls
//! over TLS (lb-server, greeter-server, lb-client) loads its files through
//! this crate, so every one of them checks them the same way and picks up a
//! rotation the same way:
//!
//! - [`ServerFiles::load`] and [`ClientFiles::load`] read the files and build
//!   the configuration, or say which file is wrong and why (missing,
//!   unreadable, no certificate or key in it, a key that does not match its
//!   certificate, a certificate expired or not yet valid).
//! - [`Reloading`] holds the configuration in use and, with [`Reloading::watch`],
//!   watches the files' directories (and polls them, for what a watch cannot
//!   see) and swaps in a new configuration when their contents change. A
//!   broken rotation is reported and the last good configuration stays.
//!
//! # Layout
//! - [`pem`]: certificates and keys from PEM files, with their checks.
//! - `generate` (feature `generate`): a CA and the certificates it issues,
//!   for tests and `demo --tls`.
//! - this module: the server and client configurations, and [`Reloading`].
//!
//! Crypto is rustls with *ring*, set explicitly on every configuration, so
//! no process-wide default provider is needed.

#[cfg(feature = "generate")]
pub mod generate;
pub mod pem;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier};

/// Why a TLS file could not be used. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read. (The reason is in the message, not a
    /// `source`, so that a printed error chain says it once.)
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file holds no PEM certificate, or one that does not parse.
    #[error("{}: {reason}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file holds no PEM private key, or one rustls cannot use.
    #[error("{}: {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key is not the one the certificate was issued for.
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The files are each fine but rustls refuses them together.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The file the configuration was mostly built from.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

/// The crypto provider of every configuration this crate builds: *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files a TLS server is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    /// The files to watch for a rotation.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// Reads the files and builds a server configuration that offers HTTP/2
    /// (ALPN `h2`), checking that the certificate is valid now and matches
    /// the key.
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let chain = pem::certificates(&self.cert)?;
        pem::check_validity(&self.cert, &chain[0])?;
        let key = pem::private_key(&self.key)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&self.cert, e))?;
        let builder = match &self.client_ca {
            Some(path) => {
                let roots = pem::roots(path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Certificate {
                            path: path.clone(),
                            reason: format!("not usable as a client CA: {e}"),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| self.key_error(e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    fn key_error(&self, error: rustls::Error) -> TlsError {
        match error {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
            },
            other => TlsError::Key {
                path: self.key.clone(),
                reason: other.to_string(),
            },
        }
    }
}

/// Where a TLS client's trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The operating system's trust store.
    System,
    /// The CA certificates in a PEM file.
    File(PathBuf),
}

/// The files a TLS client is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The CAs a server's certificate must chain to.
    pub roots: Roots,
    /// A client certificate and key, for servers that ask for one (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientFiles {
    /// The files to watch for a rotation (the system store is not watched).
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if let Roots::File(path) = &self.roots {
            paths.push(path.clone());
        }
        if let Some((cert, key)) = &self.identity {
            paths.push(cert.clone());
            paths.push(key.clone());
        }
        paths
    }

    /// Reads the files and builds a client configuration that asks for
    /// HTTP/2 (ALPN `h2`).
    pub fn load(&self) -> Result<ClientConfig, TlsError> {
        let roots = match &self.roots {
            Roots::File(path) => pem::roots(path)?,
            Roots::System => pem::system_roots(),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(Path::new("<rustls>"), e))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let chain = pem::certificates(cert)?;
                pem::check_validity(cert, &chain[0])?;
                let private_key = pem::private_key(key)?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|e| match e {
                        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                            cert: cert.clone(),
                            key: key.clone(),
                        },
                        other => TlsError::Key {
                            path: key.clone(),
                            reason: other.to_string(),
                        },
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn config_error(path: &Path, error: rustls::Error) -> TlsError {
    TlsError::Config {
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

/// How often watched files are also read to look for a change a directory
/// watch cannot see (network filesystems, a watch that failed).
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);

/// After a change is seen, how long to wait for the rest of it: a writer
/// that replaces the certificate and then the key (not atomically, as a
/// Secret volume does) is given this long to finish before the pair is read.
pub const SETTLE: Duration = Duration::from_millis(200);

/// A configuration in use, replaced when its files change.
#[derive(Debug)]
pub struct Reloading<T> {
    current: ArcSwap<T>,
}

impl<T> Reloading<T> {
    /// Holds `config` until it is replaced.
    pub fn new(config: T) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(config),
        })
    }

    /// The configuration in use now.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Replaces the configuration.
    pub fn replace(&self, config: T) {
        self.current.store(Arc::new(config));
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Watches `paths` and, when their contents change, builds a new
    /// configuration with `load` and swaps it in; `report` hears of every
    /// attempt (`Ok` when the new configuration is in use, the error when the
    /// old one stays). A broken set of files is reported once, not on every
    /// poll. Must be called within a tokio runtime; the watch ends when the
    /// returned handle is dropped.
    pub fn watch<L, R>(self: &Arc<Self>, paths: Vec<PathBuf>, load: L, report: R) -> WatchHandle
    where
        L: Fn() -> Result<T, TlsError> + Send + 'static,
        R: Fn(Result<(), &TlsError>) + Send + 'static,
    {
        let changed = Arc::new(tokio::sync::Notify::new());
        let watchers = watch_directories(&paths, &changed);
        let this = Arc::downgrade(self);
        // What the configuration in use was loaded from, as near as can be
        // told: read now, not when the task first runs.
        let mut seen = read_all(&paths);
        let task = tokio::spawn(async move {
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            poll.tick().await;
            loop {
                tokio::select! {
                    _ = changed.notified() => tokio::time::sleep(SETTLE).await,
                    _ = poll.tick() => {}
                }
                let now = read_all(&paths);
                if now == seen {
                    continue;
                }
                seen = now;
                let Some(this) = this.upgrade() else { return };
                // Reading and parsing a few kilobytes of PEM: short enough
                // for a runtime worker.
                match load() {
                    Ok(config) => {
                        this.replace(config);
                        report(Ok(()));
                    }
                    Err(error) => report(Err(&error)),
                }
            }
        });
        WatchHandle {
            _watchers: watchers,
            task,
        }
    }
}

/// Keeps a [`Reloading::watch`] running; dropping it ends the watch.
#[derive(Debug)]
pub struct WatchHandle {
    _watchers: Vec<notify::RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The contents of each file, or what kept it from being read.
fn read_all(paths: &[PathBuf]) -> Vec<Result<Vec<u8>, std::io::ErrorKind>> {
    paths
        .iter()
        .map(|path| std::fs::read(path).map_err(|e| e.kind()))
        .collect()
}

/// One watch per distinct directory of `paths`, each notifying `changed` on
/// any entry created, written or renamed (a Secret volume's rotation renames
/// `..data`; an editor writes or renames in place). A directory that cannot
/// be watched is left to the poll.
fn watch_directories(
    paths: &[PathBuf],
    changed: &Arc<tokio::sync::Notify>,
) -> Vec<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut directories: Vec<&Path> = paths
        .iter()
        .map(|path| match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        })
        .collect();
    directories.sort();
    directories.dedup();
    directories
        .into_iter()
        .filter_map(|directory| {
            let changed = changed.clone();
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    use notify::{
                        EventKind,
                        event::{AccessKind, AccessMode},
                    };
                    // Our own reads are accesses too: only a write counts.
                    let relevant = match event {
                        Ok(event) => match event.kind {
                            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                            EventKind::Access(_) => false,
                            _ => true,
                        },
                        Err(_) => true,
                    };
                    if relevant {
                        changed.notify_one();
                    }
                })
                .ok()?;
            match watcher.watch(directory, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(watcher),
                Err(error) => {
                    tracing::warn!(
                        directory = %directory.display(),
                        %error,
                        "cannot watch for certificate rotation; polling every {POLL_INTERVAL:?}"
                    );
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
