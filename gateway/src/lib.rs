//! Breakwater: a gateway for self-hosted LLM inference that routes by token-weighted load
//! across regional pools and keeps serving through surges and failures.
//!
//! A request's path, in modules:
//! 1. [`proxy`] — Pingora's server accepts and reads the request header; the gateway's
//!    `HttpServerApp` answers it and owns the exchange ([`proxy::exchange`]): read and
//!    bound the body, parse, route, call a shard, relay.
//! 2. [`admission`] — API keys and tenants, rate limits, each shard's limit in tokens,
//!    the priority queue and load shedding.
//! 3. [`routing`] — estimate the token cost, pick a shard (home region first,
//!    power-of-two-choices on in-flight tokens per capacity), account the load.
//! 4. [`policy`] — the TOML policy set everything above is built from.
//! 5. [`admin`], [`metrics`], [`stats`] and [`decisions`] — the admin listener and its
//!    dashboard, Prometheus, the in-memory history, the routing decisions log.
//! 6. [`cluster`] — replicas sharing tenant limits through a store (`[cluster]`).
//! 7. [`server`] — assembling it all on Pingora; [`cli`], [`check_health`] and [`demo`] —
//!    the commands.

pub mod admin;
pub mod admission;
pub mod check_health;
pub mod cli;
pub mod cluster;
pub mod decisions;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod listeners;
pub mod metrics;
pub mod otlp;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod stats;
pub mod table;
pub mod tls;
