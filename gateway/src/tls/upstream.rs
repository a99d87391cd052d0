//! TLS to shards: one [`UpstreamTls`] per pool with `https://` shards — the trust anchors
//! (the pool's `ca_file`, else the system's roots), an optional client certificate (mTLS),
//! ALPN `http/1.1` (the upstream client speaks HTTP/1.1), and the server name from each
//! shard's URL.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::live::LiveCert;
use super::{CertFiles, TlsError};

/// A pool's `[pools.tls]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PoolTlsFiles {
    /// CA bundle (PEM) the shards' certificates must chain to; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The gateway's client certificate and key, for shards that require mTLS.
    pub client_cert: Option<CertFiles>,
}

/// A pool's client-side TLS, ready to connect.
#[derive(Clone)]
pub struct UpstreamTls {
    files: PoolTlsFiles,
    /// Identifies the trust anchors and client certificate: connections made with
    /// different ones are never pooled together, and a changed CA bundle is a new policy.
    id: String,
    connector: TlsConnector,
    client_cert: Option<Arc<LiveCert>>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("files", &self.files)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl UpstreamTls {
    /// Reads the files and builds the connector; `pool` names it in the log.
    pub fn load(pool: &str, files: PoolTlsFiles) -> Result<Self, TlsError> {
        let roots = super::load_roots(files.ca_file.as_deref())?;
        let mut digest = Sha256::new();
        for anchor in roots.roots.iter() {
            digest.update(anchor.subject.as_ref());
            digest.update(anchor.subject_public_key_info.as_ref());
        }
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .map_err(|e| TlsError::Pem {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        let (mut config, client_cert) = match &files.client_cert {
            Some(pair) => {
                let live = LiveCert::load(format!("pool {pool} client certificate"), pair.clone())?;
                digest.update(pair.cert_file.as_os_str().as_encoded_bytes());
                digest.update(pair.key_file.as_os_str().as_encoded_bytes());
                let config = builder.with_client_cert_resolver(Arc::clone(&live) as _);
                (config, Some(live))
            }
            None => (builder.with_no_client_auth(), None),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            files,
            id: hex::encode(&digest.finalize()[..8]),
            connector: TlsConnector::from(Arc::new(config)),
            client_cert,
        })
    }

    /// The files it was built from.
    pub fn files(&self) -> &PoolTlsFiles {
        &self.files
    }

    /// A short digest of the trust anchors and client certificate files.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The rustls client configuration (for the health probes).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.connector.config().clone()
    }

    /// Whether a client certificate is presented.
    pub fn has_client_cert(&self) -> bool {
        self.client_cert.is_some()
    }

    /// The TLS handshake on `tcp` with `host` (the shard URL's host: the name checked
    /// against its certificate and sent as SNI, unless it is an IP address).
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, String> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?
            .to_owned();
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| tls_cause(&e).unwrap_or_else(|| e.to_string()))
    }
}

/// A TLS failure inside an I/O error, as a person reads it: rustls's reason (unknown
/// issuer, name mismatch, expired, a client certificate the shard requires or refuses)
/// rather than an I/O wrapper. `None` when the error is not TLS's. (With TLS 1.3 a shard
/// that refuses the client certificate says so only after the handshake, when the
/// response is read, so readers ask too.)
pub fn tls_cause(e: &std::io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(c) => {
            format!("the shard's certificate is not trusted: {c:?}")
        }
        rustls::Error::AlertReceived(a @ rustls::AlertDescription::CertificateRequired) => {
            format!("the shard requires a client certificate ({a:?} alert)")
        }
        rustls::Error::AlertReceived(a) => {
            format!("the shard refused the handshake ({a:?} alert; is the client certificate one it trusts?)")
        }
        other => other.to_string(),
    })
}
