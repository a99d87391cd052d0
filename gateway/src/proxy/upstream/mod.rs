//! The upstream call: one HTTP/1.1 exchange with a shard over a keep-alive, `TCP_NODELAY`
//! connection — plain, or TLS for an `https://` shard ([`conn`]) — driven inside the
//! request's own task.
//!
//! The gateway owns this client instead of using a general-purpose one because the hand-off
//! between a request task and a separate connection task (channels, wake-ups, a shared
//! pool) cost more CPU per request than everything else the gateway does
//! (`bench/RESULTS.md`). Here the request task writes the head and body in one system call,
//! reads the answer itself, and takes and returns connections from a per-thread pool
//! ([`pool`]) without locks. Framing is in [`framing`].
//!
//! A connection goes back to the pool only when its response was read to the end; dropping
//! a response midway closes the connection, which is how a client abort reaches the engine
//! (it sees its socket close and stops generating). A pooled connection the shard had
//! already closed costs nothing: the request is sent again on a new connection, and the
//! shard's health does not hear of it.

mod conn;
pub mod framing;
mod pool;

pub use pool::close_expired;

use std::io::IoSlice;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::UpstreamFailure;
use crate::tls::upstream::UpstreamTls;
use conn::Conn;
use framing::{BodyDecoder, Decoded, FramingError};

/// Where a request goes: [`crate::routing::ShardEntry::endpoint`].
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    /// `host:port`.
    pub authority: &'a str,
    /// The key of its kept connections.
    pub conn_key: &'a str,
    /// For `https://`: the pool's client TLS and the host name to verify.
    pub tls: Option<(&'a UpstreamTls, &'a str)>,
}

/// Idle connections kept per shard and worker thread.
pub const POOL_MAX_IDLE: usize = 512;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 << 10;

/// Sends requests to shards.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    connect_timeout: Duration,
    pool_idle: Duration,
}

/// A response header from a shard, and its body still to read.
#[derive(Debug)]
pub struct UpstreamResponse<'a> {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, when the shard sent one.
    pub content_type: Option<HeaderValue>,
    body: Body<'a>,
}

#[derive(Debug)]
struct Body<'a> {
    conn_key: &'a str,
    /// `None` once the body has ended (and the connection went back to the pool or closed).
    stream: Option<Conn>,
    buf: BytesMut,
    decoder: BodyDecoder,
    keep_alive: bool,
}

/// Why sending on a connection failed.
struct SendError {
    cause: UpstreamFailure,
    /// Nothing of an answer arrived: on a reused connection, the shard had closed it, and
    /// sending again on a new one is safe.
    before_answer: bool,
}

impl SendError {
    fn before_answer(what: String) -> Self {
        Self {
            cause: UpstreamFailure::Cut(what),
            before_answer: true,
        }
    }

    fn during_answer(cause: UpstreamFailure) -> Self {
        Self {
            cause,
            before_answer: false,
        }
    }
}

impl UpstreamClient {
    /// A client that gives up connecting after `connect_timeout` and keeps idle connections
    /// for `pool_idle` (the policy's `timeouts.connect_ms` and `timeouts.pool_idle_ms`; each routing
    /// table has its own, so a reload changes them).
    pub fn new(connect_timeout: Duration, pool_idle: Duration) -> Self {
        Self {
            connect_timeout,
            pool_idle,
        }
    }

    /// How long idle connections are kept.
    pub fn pool_idle(&self) -> Duration {
        self.pool_idle
    }

    /// Sends one request to `to`: `head` is the complete request head
    /// ([`framing::request_head`]), `body` the whole body. Returns once the response head
    /// has arrived; the caller bounds the wait with its first-byte timeout.
    pub async fn send<'a>(
        &self,
        to: Endpoint<'a>,
        head: &[u8],
        body: &[u8],
    ) -> Result<UpstreamResponse<'a>, UpstreamFailure> {
        if let Some(stream) = pool::take(to.conn_key, self.pool_idle) {
            match exchange(to.conn_key, stream, head, body).await {
                Ok(r) => return Ok(r),
                Err(e) if e.before_answer => {} // the shard had closed it: once more, on a new one
                Err(e) => return Err(e.cause),
            }
        }
        let stream = self.connect(to).await?;
        exchange(to.conn_key, stream, head, body)
            .await
            .map_err(|e| e.cause)
    }

    /// A new connection, with its TLS handshake for `https://`, all within the connect
    /// timeout.
    async fn connect(&self, to: Endpoint<'_>) -> Result<Conn, UpstreamFailure> {
        let tcp = self.connect_tcp(to.authority);
        let Some((tls, host)) = to.tls else {
            return tcp.await.map(Conn::Plain);
        };
        let handshake = async {
            let tcp = tcp.await?;
            tls.connect(host, tcp)
                .await
                .map(|s| Conn::Tls(Box::new(s)))
                .map_err(|e| UpstreamFailure::Tls(format!("{}: {e}", to.authority)))
        };
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamFailure::Tls(format!(
                "{}: no TLS handshake within {} ms",
                to.authority,
                self.connect_timeout.as_millis()
            ))),
        }
    }

    async fn connect_tcp(&self, authority: &str) -> Result<TcpStream, UpstreamFailure> {
        let connect = TcpStream::connect(authority);
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamFailure::Connect(format!("{authority}: {e}"))),
            Err(_) => {
                return Err(UpstreamFailure::Connect(format!(
                    "{authority}: no connection within {} ms",
                    self.connect_timeout.as_millis()
                )))
            }
        };
        stream
            .set_nodelay(true)
            .map_err(|e| UpstreamFailure::Connect(format!("{authority}: {e}")))?;
        Ok(stream)
    }
}

/// Writes the request and reads the response head.
async fn exchange<'a>(
    conn_key: &'a str,
    mut stream: Conn,
    head: &[u8],
    body: &[u8],
) -> Result<UpstreamResponse<'a>, SendError> {
    if let Err(e) = write_request(&mut stream, head, body).await {
        return Err(SendError::before_answer(format!(
            "writing the request: {e}"
        )));
    }
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let parsed = loop {
        match framing::parse_head(&mut buf) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(SendError::during_answer(malformed(e))),
        }
        buf.reserve(READ_SIZE);
        match stream.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(SendError::before_answer(
                    "connection closed before the response".into(),
                ))
            }
            Ok(0) => {
                return Err(SendError::during_answer(UpstreamFailure::Cut(
                    "connection closed inside the response head".into(),
                )))
            }
            Ok(_) => {}
            Err(e) if buf.is_empty() => {
                if let Some(cause) = crate::tls::upstream::tls_cause(&e) {
                    return Err(SendError::during_answer(UpstreamFailure::Tls(cause)));
                }
                return Err(SendError::before_answer(format!(
                    "reading the response: {e}"
                )));
            }
            Err(e) => {
                return Err(SendError::during_answer(UpstreamFailure::Cut(
                    e.to_string(),
                )))
            }
        }
    };
    Ok(UpstreamResponse {
        status: parsed.status,
        content_type: parsed.content_type,
        body: Body {
            conn_key,
            stream: Some(stream),
            buf,
            decoder: BodyDecoder::new(parsed.body),
            keep_alive: parsed.keep_alive,
        },
    })
}

/// Writes head and body with as few system calls as the socket allows (one, usually;
/// through TLS, the records are pushed out by the flush).
async fn write_request(stream: &mut Conn, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() || !body.is_empty() {
        let n = stream
            .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    if stream.is_tls() {
        stream.flush().await?;
    }
    Ok(())
}

fn malformed(e: FramingError) -> UpstreamFailure {
    UpstreamFailure::Cut(e.to_string())
}

impl UpstreamResponse<'_> {
    /// The next piece of the body as it arrives; `None` at its end. The caller bounds the
    /// wait with its idle timeout.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamFailure> {
        let b = &mut self.body;
        loop {
            match b.decoder.decode(&mut b.buf).map_err(malformed)? {
                Decoded::Data(bytes) => return Ok(Some(bytes)),
                Decoded::Done => {
                    b.release();
                    return Ok(None);
                }
                Decoded::NeedMore => {}
            }
            let Some(stream) = b.stream.as_mut() else {
                return Ok(None);
            };
            b.buf.reserve(READ_SIZE);
            match stream.read_buf(&mut b.buf).await {
                Ok(0) => {
                    b.stream = None;
                    b.decoder.at_eof().map_err(malformed)?;
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) => {
                    b.stream = None;
                    return Err(UpstreamFailure::Cut(e.to_string()));
                }
            }
        }
    }
}

impl Body<'_> {
    /// The body ended: keep the connection if it can carry another request.
    fn release(&mut self) {
        if let Some(stream) = self.stream.take() {
            // Bytes past the body's end mean the shard and the gateway disagree on framing.
            if self.keep_alive && self.buf.is_empty() {
                pool::put(self.conn_key, stream, POOL_MAX_IDLE);
            }
        }
    }
}
