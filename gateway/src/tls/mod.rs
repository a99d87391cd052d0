//! TLS on both sides of the gateway, with rustls (the `ring` provider):
//! - downstream, the traffic and admin listeners speak HTTPS (and HTTP/2 by ALPN) when the
//!   policy's `[gateway.tls]` / `[gateway.admin_tls]` name a certificate ([`listener`]);
//! - upstream, `https://` shards are verified against the system roots or the pool's
//!   `[pools.tls] ca_file`, with an optional client certificate for mTLS ([`upstream`]).
//!
//! Certificates are read from PEM files and read again when the files change
//! ([`live::LiveCert`]), so a rotation (cert-manager, a renewed Let's Encrypt pair) reaches
//! new connections without a restart while the open ones carry on.

pub mod listener;
pub mod live;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file holds no PEM item of the kind asked for, or a malformed one.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key does not belong to the certificate, or rustls refuses them.
    #[error("{cert} with {key}: {reason}")]
    Pair {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why the pair is unusable.
        reason: String,
    },
}

/// A certificate chain and its private key, as two PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertFiles {
    /// The chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// The process's crypto provider (rustls with `ring`), installed once.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return Arc::clone(p);
    }
    // Another thread may have won the race; either way a default is there now.
    let _ = CryptoProvider::install_default(rustls::crypto::ring::default_provider());
    CryptoProvider::get_default()
        .map(Arc::clone)
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The certificates in a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate (-----BEGIN CERTIFICATE-----) in the file".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key (PKCS#8, PKCS#1 or SEC1 PEM) in the file".into()
            }
            e => format!("malformed PEM: {e}"),
        },
    })
}

impl CertFiles {
    /// Reads the pair and checks that the key is the certificate's.
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let certs = load_certs(&self.cert_file)?;
        let key = load_key(&self.key_file)?;
        CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Pair {
            cert: self.cert_file.clone(),
            key: self.key_file.clone(),
            reason: e.to_string(),
        })
    }
}

/// Trust anchors: the certificates of `ca_file`, or the system's roots when there is none
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
pub fn load_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: path.to_owned(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if ignored > 0 {
                tracing::debug!(added, ignored, "system CA certificates");
            }
        }
    }
    Ok(roots)
}
