//! A connection to a shard: plain TCP or TLS over TCP, read and written the same way.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// One upstream connection.
#[derive(Debug)]
pub enum Conn {
    /// `http://`.
    Plain(TcpStream),
    /// `https://` (boxed: rustls's state is a few kilobytes).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Whether an idle connection can carry a request: nothing to read on it (a shard that
    /// closed it, or sent bytes nobody asked for, makes it unusable). For plain TCP this
    /// costs no system call when the reactor has seen nothing since the last read; through
    /// TLS, records that carry no data (a session ticket, a key update) are consumed and
    /// leave it usable, while a `close_notify` or data do not.
    pub fn still_open(&mut self) -> bool {
        match self {
            Conn::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Conn::Tls(s) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(Waker::noop());
                // Pending: nothing readable, the connection is idle and open.
                matches!(
                    Pin::new(&mut **s).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }

    /// Whether it is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A TLS connection to a loopback server, and the server's end.
    async fn tls_pair() -> (Conn, tokio_rustls::server::TlsStream<TcpStream>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let provider = crate::tls::provider();
        let der = CertificateDer::from_pem_slice(ck.cert.pem().as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(ck.key_pair.serialize_pem().as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap());
        let (tcp, accepted) = tokio::join!(tcp, listener.accept());
        let (tcp, accepted) = (tcp.unwrap(), accepted.unwrap().0);
        // No Nagle: a small write right after another must not wait for a delayed ACK.
        tcp.set_nodelay(true).unwrap();
        accepted.set_nodelay(true).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) =
            tokio::join!(connector.connect(name, tcp), acceptor.accept(accepted));
        (Conn::Tls(Box::new(client.unwrap())), server.unwrap())
    }

    /// One request and answer, so the session tickets TLS 1.3 sends after the handshake
    /// are in flight or read, as on a kept connection.
    async fn round_trip(c: &mut Conn, s: &mut tokio_rustls::server::TlsStream<TcpStream>) {
        c.write_all(b"ping").await.unwrap();
        c.flush().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_tls_connection_is_open_until_the_shard_closes_it_or_sends_data() {
        let (mut c, mut s) = tls_pair().await;
        round_trip(&mut c, &mut s).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(c.still_open(), "idle, with only handshake records read");
        assert!(c.still_open(), "looking does not change it");
        round_trip(&mut c, &mut s).await; // and it still carries requests

        // Bytes nobody asked for make it unusable.
        s.write_all(b"stray").await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!c.still_open());

        // So does a close (close_notify, then FIN).
        let (mut c, mut s) = tls_pair().await;
        round_trip(&mut c, &mut s).await;
        s.shutdown().await.unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!c.still_open());
    }
}
