//! The upstream call: one HTTP/1.1 request to a shard over a pooled, `TCP_NODELAY`
//! connection. Behind the [`Upstream`] trait so the exchange logic does not depend on the
//! client library.
//!
//! A connection goes back to the pool only when its response body was read to the end;
//! dropping a response midway closes the connection, which is how a client abort reaches
//! the engine (it sees its socket close and stops generating).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::error::UpstreamFailure;

/// Sends one request to a shard and returns its response header and body stream.
#[async_trait]
pub trait Upstream: Send + Sync {
    /// Sends `request` (absolute URI, complete body). Errors are failures to connect or
    /// to get a response header; the caller applies the first-byte timeout around this.
    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, UpstreamFailure>;
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

thread_local! {
    // One client, and so one connection pool, per worker thread. The gateway runs Pingora's
    // no-steal runtimes (one single-threaded runtime per worker), so a request, its
    // upstream connection's task and the wake-ups between them all stay on one thread:
    // no cross-thread hand-off per request.
    static CLIENT: std::cell::OnceCell<HttpClient> = const { std::cell::OnceCell::new() };
}

/// The production upstream: hyper's pooled HTTP/1.1 client, one pool per worker thread.
pub struct HttpUpstream {
    connect_timeout: Duration,
}

impl HttpUpstream {
    /// A client with the given connect timeout.
    pub fn new(connect_timeout: Duration) -> Self {
        Self { connect_timeout }
    }

    fn client(&self) -> HttpClient {
        CLIENT.with(|c| c.get_or_init(|| build_client(self.connect_timeout)).clone())
    }
}

fn build_client(connect_timeout: Duration) -> HttpClient {
    {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        client
    }
}

#[async_trait]
impl Upstream for HttpUpstream {
    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, UpstreamFailure> {
        self.client().request(request).await.map_err(|e| {
            use std::error::Error as _;
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            if e.is_connect() {
                UpstreamFailure::Connect(msg)
            } else {
                UpstreamFailure::Cut(msg)
            }
        })
    }
}
