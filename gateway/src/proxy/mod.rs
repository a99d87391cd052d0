//! The traffic listener: a Pingora [`HttpServerApp`] that answers every request itself —
//! the gateway's own endpoints directly, the OpenAI endpoints through [`exchange`], which
//! owns the upstream call (see DESIGN.md, "The data path"). Pingora's server runs the
//! listeners, the HTTP/1 sessions and keep-alive; Pingora's proxy layer is not used, as
//! none of its upstream machinery would run.
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
pub mod multipart;
pub mod request;
pub mod retry;
pub mod sse;
pub mod stored;
pub mod trace;
pub mod upstream;
mod worker_tick;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession as Session;
use pingora::server::ShutdownWatch;
use serde_json::json;

use std::sync::atomic::Ordering;

use crate::metrics::Metrics;
use crate::policy::Priority;
use crate::routing::ShardEntry;
use crate::table::{Table, Tables};
use error::GatewayError;
use request::Route;

/// Everything a request needs, shared by all requests.
pub struct State {
    /// The routing table in force (a request loads it once and keeps it).
    pub tables: Arc<Tables>,
    /// The replicas sharing tenant limits, with `[cluster]`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The global budget for buffered request bodies.
    pub body_budget: Arc<budget::BodyBudget>,
    /// The retry budget.
    pub retry_budget: Arc<retry::RetryBudget>,
    /// The queue and the drain rate.
    pub admission: Arc<crate::admission::Admission>,
    /// Serving or stopping, and the requests in flight.
    pub lifecycle: Arc<Lifecycle>,
    /// The fleet's last 15 minutes, for the dashboard.
    pub history: Arc<crate::stats::History>,
    /// The last requests' routing decisions.
    pub decisions: Arc<crate::decisions::Decisions>,
    /// Reloads and drains, for the dashboard's timeline.
    pub journal: Arc<crate::stats::Journal>,
    /// Where finished requests' spans go, when OTLP export is on.
    pub otlp: Option<crate::otlp::Exporter>,
    /// Which shard made each recent stored response (`GET /v1/responses/{id}`).
    pub responses: Arc<stored::ResponseIndex>,
    /// The admin token: a request carrying it in `x-breakwater-admin-token` with
    /// `x-breakwater-explain: 1` gets its routing decision as a response header. Empty:
    /// nobody does.
    pub admin_token: Arc<str>,
}

/// Where the process is in its life: serving, or stopping (`/readyz` answers 503, answers
/// close their connections) and, once the grace period is over, ending the streams left.
#[derive(Default)]
pub struct Lifecycle {
    stopping: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    /// The shutdown's grace period is over. Streams read it at each chunk: one relaxed
    /// load, where a shared wake-up channel would cost every chunk of every stream a lock.
    grace_over: std::sync::atomic::AtomicBool,
}

impl Lifecycle {
    /// Starts stopping: not ready from now, and the streams still running `end_after`
    /// from now are ended.
    pub fn stop(self: &Arc<Self>, end_after: std::time::Duration) {
        self.stopping.store(true, Ordering::Relaxed);
        let me = Arc::clone(self);
        let ender = std::thread::Builder::new()
            .name("grace-end".into())
            .spawn(move || {
                std::thread::sleep(end_after);
                tracing::info!(
                    in_flight = me.in_flight(),
                    "shutdown grace over: ending what is left"
                );
                me.grace_over.store(true, Ordering::Relaxed);
            });
        if let Err(e) = ender {
            tracing::warn!(error = %e, "cannot time the shutdown grace; streams end with the process");
        }
    }

    /// Whether the gateway is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the shutdown's grace period is over: streams still running end now.
    pub fn grace_over(&self) -> bool {
        self.grace_over.load(Ordering::Relaxed)
    }

    fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }
}

/// One request being answered.
struct InFlight<'a>(&'a Lifecycle);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `x-breakwater-shard`: the shard that answered.
pub const SHARD_HEADER: HeaderName = HeaderName::from_static("x-breakwater-shard");
/// `x-breakwater-region`: the region of the shard that answered.
pub const REGION_HEADER: HeaderName = HeaderName::from_static("x-breakwater-region");
/// `x-request-id`: the client's, or one the gateway made.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);
const REQUEST_ID: &str = "x-request-id";
/// `x-breakwater-explain: 1` on a request (with the admin token): the answer carries the
/// routing decision, as JSON, in a header of the same name.
pub const EXPLAIN_HEADER: HeaderName = HeaderName::from_static(EXPLAIN);
const EXPLAIN: &str = "x-breakwater-explain";
/// Where a request carries the admin token to be explained (never forwarded to a shard).
pub const ADMIN_TOKEN_HEADER: HeaderName = HeaderName::from_static(ADMIN_TOKEN);
const ADMIN_TOKEN: &str = "x-breakwater-admin-token";

/// Per-request state, for the access log and metrics.
pub struct RequestCtx {
    /// `x-request-id`: the client's if it sent a sane one, else generated.
    pub request_id: String,
    /// When the request header was read.
    pub started: std::time::Instant,
    /// The model asked for.
    pub model: Option<String>,
    /// Its route in the table (the route's model index), once resolved.
    pub route: Option<usize>,
    /// What cache affinity did for its first attempt, when it had a say.
    pub affinity: Option<crate::routing::affinity::AffinityOutcome>,
    /// The routing table the request runs under, once loaded.
    pub table: Option<Arc<Table>>,
    /// The last shard tried.
    pub shard: Option<Arc<ShardEntry>>,
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
    /// The tenant (index into the admission's tenants), once known.
    pub tenant: Option<usize>,
    /// The tenant's priority.
    pub priority: Priority,
    /// How long the request waited in the gateway's queue, if it queued.
    pub queue_wait: Option<std::time::Duration>,
    /// Why the gateway refused it without trying a shard.
    pub refusal: Option<&'static str>,
    /// The answer's usage block: (prompt, completion) tokens.
    pub usage: Option<(u64, u64)>,
    /// When the first attempt's request went to a shard.
    pub first_sent_at: Option<std::time::Instant>,
    /// What routing saw and did, for the decisions log.
    pub decision: crate::decisions::Draft,
    /// The caller asked for the decision as a response header and holds the admin token.
    pub explain: bool,
    /// The W3C trace the request belongs to (the caller's `traceparent`, or a new one).
    pub trace: trace::TraceContext,
    /// The gateway's own span in it: the parent of every attempt's span.
    pub server_span: u64,
    /// The OpenAI endpoint, for an inference request.
    pub endpoint: Option<request::Endpoint>,
}

/// The traffic listener's Pingora application.
pub struct Gateway {
    state: Arc<State>,
    /// Set when cleartext HTTP/2 (h2c) is accepted beside HTTP/1.1.
    options: Option<HttpServerOptions>,
}

impl Gateway {
    /// A gateway over shared state; `h2c`: a plain connection that opens with the HTTP/2
    /// preface is served as HTTP/2 (TLS connections choose by ALPN either way).
    pub fn new(state: Arc<State>, h2c: bool) -> Self {
        let options = h2c.then(|| {
            let mut o = HttpServerOptions::default();
            o.h2c = true;
            o
        });
        Self { state, options }
    }
}

/// The request headers the gateway itself reads at the start of every request, found in
/// one pass over the header (cheaper than a hashed lookup for each).
#[derive(Debug, Default, Clone, Copy)]
struct OwnHeaders<'a> {
    request_id: Option<&'a HeaderValue>,
    traceparent: Option<&'a HeaderValue>,
    explain: Option<&'a HeaderValue>,
    admin_token: Option<&'a HeaderValue>,
}

impl<'a> OwnHeaders<'a> {
    /// The first value of each (as `HeaderMap::get` would give).
    fn find(headers: &'a http::HeaderMap) -> Self {
        let mut own = Self::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                REQUEST_ID => &mut own.request_id,
                trace::TRACEPARENT => &mut own.traceparent,
                EXPLAIN => &mut own.explain,
                ADMIN_TOKEN => &mut own.admin_token,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        own
    }

    /// `x-request-id`: the client's if it sent a sane one, else generated.
    fn request_id(&self) -> String {
        let sane =
            |v: &str| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
        match self.request_id.and_then(|v| v.to_str().ok()) {
            Some(v) if sane(v) => v.to_string(),
            _ => new_request_id(),
        }
    }

    /// Whether the request asks for its routing decision and holds the admin token.
    fn wants_explanation(&self, admin_token: &str) -> bool {
        self.explain.is_some_and(|v| v == "1")
            && self.admin_token.is_some_and(|t| {
                crate::admin::constant_time_eq(t.as_bytes(), admin_token.as_bytes())
            })
    }
}

/// A model in the OpenAI format (`GET /v1/models`, `GET /v1/models/{model}`).
fn model_object(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "breakwater"})
}

/// A request id for a request that brought none: 128 random bits in hex.
fn new_request_id() -> String {
    trace::hex128(rand::random::<u128>()).as_str().to_owned()
}

impl RequestCtx {
    fn new() -> Self {
        RequestCtx {
            request_id: String::new(),
            started: std::time::Instant::now(),
            model: None,
            route: None,
            affinity: None,
            table: None,
            shard: None,
            attempts: 0,
            status: 0,
            first_byte_at: None,
            estimated_tokens: 0,
            stream_error: None,
            tenant: None,
            priority: Priority::Standard,
            queue_wait: None,
            refusal: None,
            usage: None,
            first_sent_at: None,
            decision: Default::default(),
            explain: false,
            trace: trace::TraceContext {
                trace_id: 0,
                parent_id: None,
                flags: 0,
            },
            server_span: 0,
            endpoint: None,
        }
    }
}

impl Gateway {
    /// Answers one request whose header has been read: the gateway's own endpoints
    /// directly, the OpenAI endpoints through [`exchange`]. Always leaves a response
    /// written, or the client gone.
    async fn answer(&self, session: &mut Session, ctx: &mut RequestCtx) {
        ctx.started = std::time::Instant::now();
        let head = session.req_header();
        let own = OwnHeaders::find(&head.headers);
        ctx.request_id = own.request_id();
        ctx.trace = trace::TraceContext::from_header(own.traceparent.map(HeaderValue::as_bytes));
        ctx.server_span = trace::TraceContext::new_span_id();
        let route = request::classify(head.method.as_str(), head.uri.path());
        match route {
            Err(e) => respond_error(session, ctx, &e).await,
            Ok(Route::Healthz) => {
                respond_json(session, ctx, 200, json!({"status": "ok"}).to_string()).await
            }
            Ok(Route::Readyz) => {
                let stopping = self.state.lifecycle.is_stopping();
                let ready = !stopping && self.state.tables.peek().router.ready();
                let body = json!({"ready": ready}).to_string();
                respond_json(session, ctx, if ready { 200 } else { 503 }, body).await
            }
            Ok(Route::Models) => {
                let table = self.state.tables.peek();
                let data: Vec<_> = table
                    .router
                    .model_names()
                    .iter()
                    .map(|m| model_object(m))
                    .collect();
                let body = json!({"object": "list", "data": data}).to_string();
                respond_json(session, ctx, 200, body).await
            }
            Ok(Route::Model(id)) => {
                let served = self.state.tables.peek().router.route(&id).is_some();
                if served {
                    respond_json(session, ctx, 200, model_object(&id).to_string()).await
                } else {
                    respond_error(session, ctx, &GatewayError::ModelNotFound(id)).await
                }
            }
            Ok(Route::StoredResponse(id)) => {
                let table = self.state.tables.load();
                worker_tick::ensure(table.upstream.pool_idle());
                stored::serve(&self.state, &table, session, ctx, &id).await
            }
            Ok(Route::Inference(endpoint)) => {
                ctx.endpoint = Some(endpoint);
                ctx.explain = own.wants_explanation(&self.state.admin_token);
                let table = self.state.tables.load();
                worker_tick::ensure(table.upstream.pool_idle());
                ctx.table = Some(Arc::clone(&table));
                exchange::serve(&self.state, &table, session, ctx, endpoint).await
            }
        }
    }

    /// An inference request's traces in memory: the fleet's history, its shard's last
    /// minute, and its routing decision.
    fn remember(&self, ctx: &mut RequestCtx, tenant: Option<Arc<str>>, total: std::time::Duration) {
        use crate::stats::history::Outcome;
        let ttft = ctx.first_byte_at.map(|t| t - ctx.started);
        let served = (200..300).contains(&ctx.status) && ctx.stream_error.is_none();
        let outcome = if served {
            Outcome::Served {
                good: ttft.is_some_and(|t| t <= crate::stats::GOOD_TTFT),
            }
        } else if ctx.status == 429 || (ctx.status == 503 && ctx.refusal.is_some()) {
            Outcome::Refused
        } else {
            Outcome::Failed
        };
        let ttft = ttft.filter(|_| served);
        self.state.history.record(outcome, ttft);
        // The request's end, from the clock read the caller already made.
        let ended = ctx.started + total;
        if let (Some(shard), true) = (&ctx.shard, ctx.attempts > 0) {
            shard.window.record(crate::stats::seconds_at(ended), ttft);
        }
        let d = std::mem::take(&mut ctx.decision);
        // A caller that marked its trace unsampled gets no spans exported.
        if let (Some(exporter), true) = (&self.state.otlp, ctx.trace.flags & 1 == 1) {
            exporter.export(spans(ctx, &d, tenant.as_deref(), total));
        }
        // The request is over: what the log keeps is moved, not copied.
        self.state.decisions.record(crate::decisions::Decision {
            id: std::mem::take(&mut ctx.request_id),
            trace_id: crate::proxy::trace::TraceId(ctx.trace.trace_id),
            at_unix_ms: crate::stats::unix_ms_at(ended),
            tenant,
            priority: ctx.priority.as_str(),
            model: ctx.model.take(),
            estimated_tokens: ctx.estimated_tokens,
            queue_wait_ms: ctx.queue_wait.map(crate::decisions::millis),
            status: ctx.status,
            refusal: ctx.refusal,
            affinity: ctx.affinity.map(|a| a.as_str()),
            region: d
                .attempts
                .first()
                .map(|a| crate::decisions::RegionOf(Arc::clone(&a.shard))),
            candidates: d.candidates,
            attempts: d.attempts,
            total_ms: crate::decisions::millis(total),
        });
    }

    /// Metrics and the access log line for a finished request.
    fn log(&self, ctx: &mut RequestCtx) {
        let shard = ctx.shard.as_deref();
        let ttft_ms = ctx
            .first_byte_at
            .map(|t| (t - ctx.started).as_secs_f64() * 1e3);
        let total = ctx.started.elapsed();
        let tenant_id = match (&ctx.table, ctx.tenant) {
            (Some(table), Some(t)) => Some(Arc::clone(&table.tenants.get(t).id)),
            _ => None,
        };
        let tenant = tenant_id.as_deref();
        // Labels from the policy only (a model no pool serves is "unknown"), so a client
        // cannot grow the series.
        let model = match (&ctx.table, ctx.route, &ctx.model) {
            (Some(table), Some(i), _) => table
                .router
                .route_by_index(i)
                .map_or("unknown", |r| &*r.name),
            (_, None, Some(_)) => "unknown",
            _ => "",
        };
        self.state.metrics.request(&crate::metrics::Finished {
            model,
            tenant: tenant.unwrap_or(""),
            region: shard.map_or("", |s| s.region.as_str()),
            shard: shard.map_or("", |s| s.id.as_str()),
            status: ctx.status,
            total,
            first_byte: ctx.first_byte_at.map(|t| t - ctx.started),
            overhead: ctx
                .first_sent_at
                .map(|t| (t - ctx.started).saturating_sub(ctx.queue_wait.unwrap_or_default())),
            retries: ctx.attempts.saturating_sub(1),
            usage: ctx.usage,
            affinity: ctx.affinity.map(|a| a.as_str()),
        });
        match (tenant, ctx.refusal) {
            // Refused before a tenant was known: a missing or unknown key.
            (None, Some(reason)) => self.state.metrics.refused("unknown", "none", reason),
            (Some(tenant), refusal) => {
                let priority = ctx.priority.as_str();
                match refusal {
                    Some(reason) => self.state.metrics.refused(tenant, priority, reason),
                    None if ctx.attempts > 0 => self.state.metrics.admitted(tenant, priority),
                    None => {}
                }
                if let Some(w) = ctx.queue_wait {
                    self.state.metrics.queue_wait(priority, w);
                }
            }
            (None, None) => {}
        }
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            trace_id = trace::hex128(ctx.trace.trace_id).as_str(),
            tenant = tenant.unwrap_or(""),
            priority = ctx.tenant.map(|_| ctx.priority.as_str()),
            queue_wait_ms = ctx.queue_wait.map(|w| w.as_secs_f64() * 1e3),
            refusal = ctx.refusal,
            affinity = ctx.affinity.map(|a| a.as_str()),
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
        if ctx.table.is_some() {
            self.remember(ctx, tenant_id, total);
        }
    }
}

/// A finished request's spans: the gateway's server span, and a client span per attempt
/// (with the span id its `traceparent` named).
fn spans(
    ctx: &RequestCtx,
    d: &crate::decisions::Draft,
    tenant: Option<&str>,
    total: std::time::Duration,
) -> Vec<crate::otlp::Span> {
    use crate::otlp::{Kind, Span};
    let end = crate::otlp::now_unix_ns();
    let start = end.saturating_sub(total.as_nanos() as u64);
    let mut out = Vec::with_capacity(1 + d.attempts.len());
    let mut attributes = vec![
        ("http.request.method", "POST".to_string()),
        ("breakwater.request_id", ctx.request_id.clone()),
    ];
    if let Some(m) = &ctx.model {
        attributes.push(("breakwater.model", m.clone()));
    }
    if let Some(t) = tenant {
        attributes.push(("breakwater.tenant", t.to_string()));
    }
    if let Some(r) = ctx.refusal {
        attributes.push(("breakwater.refusal", r.to_string()));
    }
    out.push(Span {
        trace_id: ctx.trace.trace_id,
        span_id: ctx.server_span,
        parent_id: ctx.trace.parent_id,
        name: ctx.endpoint.map_or("POST", request::Endpoint::span_name),
        kind: Kind::Server,
        start_unix_ns: start,
        end_unix_ns: end,
        error: ctx.status >= 500 || ctx.status == 0 || ctx.stream_error.is_some(),
        attributes,
        int_attributes: vec![
            ("http.response.status_code", i64::from(ctx.status)),
            ("breakwater.attempts", i64::from(ctx.attempts)),
        ],
    });
    for a in &d.attempts {
        let a_start = start + a.started.as_nanos() as u64;
        let outcome = a.outcome.as_deref().unwrap_or("unfinished");
        out.push(Span {
            trace_id: ctx.trace.trace_id,
            span_id: a.span_id,
            parent_id: Some(ctx.server_span),
            name: "attempt",
            kind: Kind::Client,
            start_unix_ns: a_start,
            end_unix_ns: a_start + a.took.as_nanos() as u64,
            error: outcome != "ok",
            attributes: vec![
                ("breakwater.shard", a.shard.id.clone()),
                ("breakwater.region", a.shard.region.clone()),
                ("breakwater.outcome", outcome.to_string()),
                ("server.address", a.shard.authority.clone()),
            ],
            int_attributes: Vec::new(),
        });
    }
    out
}

/// Resolves when the server starts shutting down.
async fn stopping(shutdown: &ShutdownWatch) {
    let mut watch = shutdown.clone();
    if *watch.borrow_and_update() {
        return;
    }
    while watch.changed().await.is_ok() {
        if *watch.borrow() {
            return;
        }
    }
    // The server is gone without saying so: treat it as stopping.
}

#[async_trait]
impl HttpServerApp for Gateway {
    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.options.as_ref()
    }

    /// One request on a downstream connection: read its header, answer it, log it, and
    /// hand the connection back for the next request when it can be reused.
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // `biased`: a request already buffered is served even while shutting down starts.
        let read = tokio::select! {
            biased;
            r = session.read_request() => r,
            _ = stopping(shutdown) => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None, // the client closed an idle connection
            Err(e) => {
                // Not HTTP: answer 400 when a client could read it, then close.
                if e.etype == pingora::ErrorType::InvalidHTTPHeader {
                    let err = GatewayError::BadRequest("malformed HTTP request".into());
                    let body = err.body();
                    let id = new_request_id();
                    if let Some(h) = json_header(err.status(), body.len(), &id, Some(&err)) {
                        let _ = session.write_error_response(h, Bytes::from(body)).await;
                    }
                }
                session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() || self.state.lifecycle.is_stopping() {
            session.set_keepalive(None);
        }
        let _counted = self.state.lifecycle.enter();
        let mut ctx = RequestCtx::new();
        self.answer(&mut session, &mut ctx).await;
        self.log(&mut ctx);
        let settings = HttpPersistentSettings::for_session(&session);
        session
            .finish()
            .await
            .ok()
            .flatten()
            .map(|s| ReusedHttpStream::from_reusable_stream(s, settings))
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
    respond(session, ctx, e.status(), e.body(), Some(e)).await
}

async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: String,
    error: Option<&GatewayError>,
) {
    let Some(h) = json_header(status, body.len(), &ctx.request_id, error) else {
        return;
    };
    ctx.status = status;
    if session.write_response_header(Box::new(h)).await.is_ok() {
        // (Nothing is sent after the header when the request was a HEAD.)
        let _ = session.write_response_body(Bytes::from(body), true).await;
    }
}

/// The header of a JSON answer the gateway writes itself.
fn json_header(
    status: u16,
    len: usize,
    request_id: &str,
    error: Option<&GatewayError>,
) -> Option<ResponseHeader> {
    let mut h = HeaderMap::with_capacity(4);
    let retry_after_s = error.and_then(GatewayError::retry_after_s);
    if let Some(e) = error {
        e.extra_headers(&mut h);
    }
    let json = HeaderValue::from_static("application/json");
    h.insert(http::header::CONTENT_TYPE, json);
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(id) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID_HEADER, id);
    }
    if let Some(s) = retry_after_s {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    response_head(status, h)
}

/// A response header made of a status and a ready header map. Pingora's `insert_header`
/// parses every name again and keeps a map of their spelling; names made once, in a plain
/// map, are written lowercase, as HTTP/1.1 allows. `None` for a status outside 100..=999.
pub(crate) fn response_head(status: u16, headers: HeaderMap) -> Option<ResponseHeader> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status).ok()?;
    parts.headers = headers;
    Some(ResponseHeader::from(parts))
}
