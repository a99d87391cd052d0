//! `llm-sim`: a simulated OpenAI-compatible inference engine that behaves like a real one
//! under load, for Breakwater's tests, benchmarks and demo.
//!
//! It owns batching (a fixed number of batch slots and a FIFO queue, paced as one of
//! several engine behaviours: continuous batching, fixed-rate slots, decode that slows with
//! the batch, serial prefill, a KV cache that preempts), streamed and whole answers with `usage`, vLLM-named `/metrics`, `/health`,
//! and a fault switch on a separate control listener. It does not tokenize for real: a
//! prompt's size is counted at about 3.6 bytes per token.
//!
//! # Layout
//! - [`engine`]: batching, pacing and counters.
//! - [`fault`]: the fault switch's modes and body.
//! - [`openai`]: request parsing and response shapes.
//! - `server`: the serving and control listeners.
//! - [`tls`]: HTTPS (and mTLS) on the serving port.

pub mod engine;
pub mod fault;
pub mod openai;
mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use engine::{Behaviour, Engine, SimConfig, SimStats};
pub use fault::{Fault, FaultMode};
pub use server::metrics;

/// A running simulated engine. Dropping the handle stops both listeners and cuts every
/// connection.
pub struct SimHandle {
    engine: Engine,
    addr: SocketAddr,
    https: bool,
    control_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl SimHandle {
    /// Starts an engine on already-bound listeners (bind `127.0.0.1:0` in tests). Must be
    /// called inside a Tokio runtime.
    pub fn spawn(
        config: SimConfig,
        listener: TcpListener,
        control: TcpListener,
    ) -> std::io::Result<Self> {
        Self::spawn_with_tls(config, listener, control, None)
    }

    /// [`Self::spawn`], with the serving port speaking HTTPS when `tls` is given (see
    /// [`tls::server_config`]); the control port stays plain.
    pub fn spawn_with_tls(
        config: SimConfig,
        listener: TcpListener,
        control: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let control_addr = control.local_addr()?;
        let engine = Engine::new(config);
        let https = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let tasks = vec![
            tokio::spawn(server::serve(engine.clone(), listener, acceptor)),
            tokio::spawn(server::control(engine.clone(), control)),
        ];
        Ok(Self {
            engine,
            addr,
            https,
            control_addr,
            tasks,
        })
    }

    /// Binds both listeners on the given addresses, then starts (HTTPS with `tls`).
    pub async fn bind(
        config: SimConfig,
        addr: SocketAddr,
        control_addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let control = TcpListener::bind(control_addr).await?;
        Self::spawn_with_tls(config, listener, control, tls)
    }

    /// The serving address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (`https://` when it serves TLS), the base URL of the OpenAI API.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The control listener's address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The engine, to read counters or set a fault directly.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
