//! The traffic listener: a thin Pingora [`ProxyHttp`] whose `request_filter` answers
//! every request itself — the gateway's own endpoints directly, the OpenAI endpoints
//! through [`exchange`], which owns the upstream call (see DESIGN.md, "The data path").
//!
//! # Layout
//! - [`request`]: endpoint classification and body parsing.
//! - [`exchange`]: routing, attempts, hold-back and streaming relay.
//! - [`upstream`]: the pooled HTTP client behind a trait.
//! - [`sse`]: event framing.
//! - [`error`]: OpenAI-format errors.

pub mod budget;
pub mod error;
pub mod exchange;
pub mod request;
pub mod retry;
pub mod sse;
pub mod upstream;
mod worker_tick;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use serde_json::json;

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::routing::Router;
use error::GatewayError;
use request::Route;
use upstream::UpstreamClient;

/// Everything a request needs, shared by all requests.
pub struct State {
    /// The policy in force.
    pub policy: Arc<Policy>,
    /// Routing table, loads and health.
    pub router: Arc<Router>,
    /// The upstream client.
    pub upstream: UpstreamClient,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The global budget for buffered request bodies.
    pub body_budget: Arc<budget::BodyBudget>,
    /// The retry budget.
    pub retry_budget: Arc<retry::RetryBudget>,
    /// Where attempt outcomes are reported.
    pub health: breakwater_health::HealthMonitor,
}

/// Per-request state, for the access log and metrics.
pub struct RequestCtx {
    /// `x-request-id`: the client's if it sent a sane one, else generated.
    pub request_id: String,
    /// When the request header was read.
    pub started: std::time::Instant,
    /// The model asked for.
    pub model: Option<String>,
    /// The last shard tried (index).
    pub shard: Option<usize>,
    /// Attempts made.
    pub attempts: u32,
    /// Status sent to the client (0: none).
    pub status: u16,
    /// When the response header went out.
    pub first_byte_at: Option<std::time::Instant>,
    /// The estimated token cost.
    pub estimated_tokens: u64,
    /// Why a stream was ended with an error event.
    pub stream_error: Option<String>,
}

/// The Pingora proxy application.
pub struct Gateway {
    state: Arc<State>,
}

impl Gateway {
    /// A gateway over shared state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn request_id(session: &Session) -> String {
    let sane = |v: &str| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
    match session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) if sane(v) => v.to_string(),
        _ => format!("{:032x}", rand::random::<u128>()),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // None: Pingora's default adds a (disabled) compression module whose context is
        // built for every request. Engines' JSON and SSE answers pass through as they are.
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: String::new(),
            started: std::time::Instant::now(),
            model: None,
            shard: None,
            attempts: 0,
            status: 0,
            first_byte_at: None,
            estimated_tokens: 0,
            stream_error: None,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session);
        ctx.started = std::time::Instant::now();
        let head = session.req_header();
        let route = request::classify(head.method.as_str(), head.uri.path());
        match route {
            Err(e) => respond_error(session, ctx, &e).await,
            Ok(Route::Healthz) => {
                respond_json(session, ctx, 200, json!({"status": "ok"}).to_string()).await
            }
            Ok(Route::Readyz) => {
                let ready = self.state.router.ready();
                let body = json!({"ready": ready}).to_string();
                respond_json(session, ctx, if ready { 200 } else { 503 }, body).await
            }
            Ok(Route::Models) => {
                let data: Vec<_> = self
                    .state
                    .router
                    .model_names()
                    .iter()
                    .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "breakwater"}))
                    .collect();
                let body = json!({"object": "list", "data": data}).to_string();
                respond_json(session, ctx, 200, body).await
            }
            Ok(Route::Inference(endpoint)) => {
                worker_tick::ensure(self.state.upstream.pool_idle());
                exchange::serve(&self.state, session, ctx, endpoint).await
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // `request_filter` answers every request, so Pingora never asks for a peer.
        Err(pingora::Error::new_str(
            "breakwater answers every request in request_filter",
        ))
    }

    async fn logging(
        &self,
        _session: &mut Session,
        _e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        let shard = ctx.shard.map(|i| &self.state.router.shards()[i]);
        let ttft_ms = ctx
            .first_byte_at
            .map(|t| (t - ctx.started).as_secs_f64() * 1e3);
        let total = ctx.started.elapsed();
        self.state.metrics.request(
            ctx.status,
            total,
            ctx.first_byte_at.map(|t| t - ctx.started),
        );
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            model = ctx.model.as_deref().unwrap_or(""),
            region = shard.map_or("", |s| s.region.as_str()),
            shard = shard.map_or("", |s| s.id.as_str()),
            status = ctx.status,
            attempts = ctx.attempts,
            estimated_tokens = ctx.estimated_tokens,
            ttft_ms,
            total_ms = total.as_secs_f64() * 1e3,
            stream_error = ctx.stream_error.as_deref(),
        );
    }
}

/// Writes a complete JSON response with the request id.
pub(crate) async fn respond_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: String,
) {
    respond(session, ctx, status, body, None).await
}

/// Writes an OpenAI-format error.
pub(crate) async fn respond_error(session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
    respond(session, ctx, e.status(), e.body(), e.retry_after_s()).await
}

async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: String,
    retry_after_s: Option<u32>,
) {
    let Ok(mut h) = ResponseHeader::build_no_case(status, Some(4)) else {
        return;
    };
    let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
    let _ = h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
    let _ = h.insert_header("x-request-id", &ctx.request_id);
    if let Some(s) = retry_after_s {
        let _ = h.insert_header(http::header::RETRY_AFTER, s.to_string());
    }
    ctx.status = status;
    let head_only = session.req_header().method == http::Method::HEAD;
    if session
        .write_response_header(Box::new(h), head_only)
        .await
        .is_ok()
        && !head_only
    {
        let _ = session
            .write_response_body(Some(Bytes::from(body)), true)
            .await;
    }
}
