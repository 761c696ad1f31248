//! Certificates and keys from PEM files, each checked with an error that
//! names the file.

use std::path::Path;

use rustls::{
    RootCertStore,
    pki_types::{
        CertificateDer, PrivateKeyDer, UnixTime,
        pem::{self, PemObject},
    },
};

use crate::TlsError;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Every certificate in a PEM file, in order; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: format!("not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            reason: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: format!("a certificate in it does not parse: {e}"),
        })?;
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: match e {
            pem::Error::NoItemsFound => {
                "no PEM private key (-----BEGIN PRIVATE KEY-----) in it".into()
            }
            other => format!("not a usable PEM private key: {other}"),
        },
    })
}

/// Fails if `cert` is not valid now: expired, or not valid yet.
pub fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: format!("the certificate does not parse: {e}"),
        })?;
    let now = i64::try_from(UnixTime::now().as_secs()).unwrap_or(i64::MAX);
    let validity = parsed.validity();
    if now > validity.not_after.timestamp() {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            reason: format!("the certificate expired on {}", validity.not_after),
        });
    }
    if now < validity.not_before.timestamp() {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            reason: format!("the certificate is not valid until {}", validity.not_before),
        });
    }
    Ok(())
}

/// The CA certificates of a PEM file, as trust anchors.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path)? {
        store.add(cert).map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: format!("not usable as a CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

/// The operating system's trust store; certificates it cannot use are
/// skipped (as every TLS client does with a system store).
pub fn system_roots() -> RootCertStore {
    let mut store = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(%error, "skipping part of the system trust store");
    }
    let (added, skipped) = store.add_parsable_certificates(found.certs);
    tracing::debug!(added, skipped, "system trust store loaded");
    store
}
