//! HTTPS on a listener: Pingora's rustls acceptor with the listener's [`LiveCert`], TLS 1.2
//! and 1.3 only (Pingora's rustls builder offers no older version), and ALPN offering
//! `h2` before `http/1.1` where HTTP/2 is wanted.

use std::sync::Arc;

use pingora::listeners::tls::TlsSettings;
use pingora::protocols::ALPN;

use super::live::LiveCert;

/// Pingora's settings for a listener that presents `cert`; `h2`: offer HTTP/2 by ALPN.
pub fn settings(cert: &Arc<LiveCert>, h2: bool) -> pingora::Result<TlsSettings> {
    super::provider();
    let mut settings = TlsSettings::intermediate("", "")?;
    settings.set_cert_resolver(Arc::clone(cert) as _);
    settings.set_alpn(if h2 { ALPN::H2H1 } else { ALPN::H1 });
    Ok(settings)
}
