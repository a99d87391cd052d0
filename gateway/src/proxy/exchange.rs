//! The exchange the gateway owns for the OpenAI endpoints: read the body whole, route,
//! call a shard, and relay the answer — retrying on another shard while nothing has reached
//! the client, ending a stream with an SSE error event once something has.
//!
//! The commit point is the first write of a response header downstream. Before it, every
//! failure (refused, reset, 5xx, 429, timeout, a stream that dies before its first event)
//! may be retried with the same body. For a stream, the header is held back until the first
//! complete `data:` event has arrived, so a shard that answers 200 and then dies is
//! invisible to the client.

use std::sync::{Arc, LazyLock};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use pingora::protocols::http::ServerSession as Session;
use tokio::time::{timeout_at, Instant};

use breakwater_health::Signal;

use super::budget::Reservation;
use super::error::{
    AttemptFailure, GatewayError, Retry, RetryContext, ShedReason, UpstreamFailure,
};
use super::request::{self, Dialect, Endpoint, InferenceRequest};
use super::trace::TraceContext;
use super::upstream::{framing, UpstreamResponse};
use super::{
    sse, RequestCtx, State, EXPLAIN_HEADER, REGION_HEADER, REQUEST_ID_HEADER, SHARD_HEADER,
};
use crate::admission::queue::Evicted;
use crate::admission::Slot;
use crate::routing::affinity::{self, AffinityKey, AffinityMode, AffinitySettings};
use crate::routing::estimate::TokenCost;
use crate::routing::{ModelRoute, ShardEntry};
use crate::table::Table;

/// Request headers not forwarded to a shard: hop-by-hop ones, those the gateway sets
/// (`traceparent` is rewritten per attempt), and the explanation's admin token.
pub(crate) const SKIPPED_REQUEST_HEADERS: [&str; 15] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
    "x-request-id",
    "x-breakwater-explain",
    "x-breakwater-admin-token",
    "traceparent",
];

/// Bytes a stream may send before its first `data:` event (comments, `event:` lines)
/// before the gateway stops holding the header back.
const MAX_HELD_BACK_BYTES: usize = 256 << 10;

/// How often a queued request has the queue look for room that did not come from a
/// request of this gateway ending.
const RECHECK_QUEUE: std::time::Duration = std::time::Duration::from_millis(25);

/// How one attempt ended.
enum Attempt {
    /// The client got an answer: complete, or (`Some`) cut by a failure after output had
    /// started and ended with an error event.
    Finished(Option<UpstreamFailure>),
    /// The client went away; nothing more to do.
    ClientGone,
    /// Failed before the commit point; another shard may be tried.
    Retryable(UpstreamFailure),
}

impl Attempt {
    /// What the attempt says about the shard's health; a client that left says nothing.
    fn health_signal(&self) -> Option<Signal> {
        match self {
            Attempt::ClientGone => None,
            Attempt::Finished(None) => Some(Signal::Success),
            Attempt::Finished(Some(f)) | Attempt::Retryable(f) => f.health_signal(),
        }
    }

    /// The `outcome` label of `breakwater_upstream_attempts_total`.
    fn label(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Attempt::Finished(None) => "ok".into(),
            Attempt::Finished(Some(_)) => "failed_mid_stream".into(),
            Attempt::ClientGone => "client_gone".into(),
            Attempt::Retryable(f) => f.label(),
        }
    }
}

/// A request once its body is read and understood: what it asks, of which route, at what
/// cost, by when.
struct Resolved<'r> {
    req: InferenceRequest,
    route: &'r ModelRoute,
    /// What cache affinity routes it by, if its model has affinity and it has a key.
    affinity: Option<AffinityKey>,
    cost: TokenCost,
    /// The request's deadline: the client's, the tenant's default or `timeouts.total_ms`.
    deadline: Instant,
}

/// Serves one inference request end to end: identify the tenant and check what the
/// header alone decides → read the body → resolve (model, cost, deadline) → admit (a shard
/// with room, a short wait in the queue, or a fast refusal) → attempts → respond. Always
/// leaves a response written (or the client gone); never panics on bad input.
pub async fn serve(
    state: &State,
    table: &Table,
    session: &mut Session,
    ctx: &mut RequestCtx,
    endpoint: Endpoint,
) {
    let admission = &state.admission;
    let tenant = match admission.identify(table, &session.req_header().headers) {
        Ok(t) => t,
        Err(e) => return refuse_before_body(session, ctx, &e).await,
    };
    ctx.tenant = Some(tenant);
    ctx.priority = table.tenants.get(tenant).priority;
    if let Err(e) = admission.precheck(table, tenant) {
        return refuse_before_body(session, ctx, &e).await;
    }
    // Held until the exchange ends: the body stays in memory for retries until then.
    let mut reservation = state.body_budget.reservation();
    let body = match read_body(
        session,
        table.policy.limits.max_body_bytes,
        &mut reservation,
    )
    .await
    {
        Ok(Some(b)) => b,
        Ok(None) => return, // the client went away while sending
        Err(e) => {
            respond_refusal(session, ctx, &e).await;
            return discard_unread_body(session).await;
        }
    };
    let resolved = match resolve(table, session, ctx, endpoint, &body) {
        Ok(r) => r,
        Err(e) => return respond_refusal(session, ctx, &e).await,
    };
    if let Err(e) = admission.charge_tokens(table, tenant, resolved.cost.total()) {
        return respond_refusal(session, ctx, &e).await;
    }
    let slot = match admit(state, table, session, ctx, &resolved).await {
        Ok(Some(slot)) => slot,
        Ok(None) => return admission.correct_tokens(table, tenant, resolved.cost.total(), 0),
        Err(e) => {
            admission.correct_tokens(table, tenant, resolved.cost.total(), 0);
            return respond_refusal(session, ctx, &e).await;
        }
    };
    let result = attempts(state, table, session, ctx, &resolved, &body, slot).await;
    // The token budget pays what the answer reported (or the estimate, if it said nothing).
    let used = ctx.usage.map_or(resolved.cost.total(), |(p, c)| p + c);
    admission.correct_tokens(table, tenant, resolved.cost.total(), used);
    if let Err(e) = result {
        super::respond_error(session, ctx, &e).await;
    }
}

/// Answers a refusal the request header decided, then reads and drops the body the client
/// may still be sending (bounded), so the connection can serve its next request. (Pingora
/// would otherwise close a connection answered before its body was read: every refused
/// client would reconnect, which costs both sides more than the refusal.) A body that does
/// not arrive in time closes the connection after all.
async fn refuse_before_body(session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
    session.set_close_on_response_before_downstream_finish(false);
    respond_refusal(session, ctx, e).await;
    discard_unread_body(session).await;
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
}

/// Writes an error the gateway decided without trying a shard, noting its reason.
async fn respond_refusal(session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
    ctx.refusal = e.refusal_reason();
    super::respond_error(session, ctx, e).await;
}

/// Parses the body and works out the route, the token cost and the deadline. Errors: a bad
/// body (400), an unknown model (404), a request over the context window (400).
fn resolve<'t>(
    table: &'t Table,
    session: &Session,
    ctx: &mut RequestCtx,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<Resolved<'t>, GatewayError> {
    // Only a form's boundary is read from the header (the JSON endpoints do not look).
    let content_type = endpoint
        .is_form()
        .then(|| session.req_header().headers.get(http::header::CONTENT_TYPE))
        .flatten()
        .and_then(|v| v.to_str().ok());
    let req = request::parse(endpoint, body, content_type)?;
    ctx.model = Some(req.model.clone());
    let route = table
        .router
        .route(&req.model)
        .ok_or_else(|| GatewayError::ModelNotFound(req.model.clone()))?;
    if !route.endpoints.contains(endpoint) {
        return Err(GatewayError::EndpointNotServed {
            model: req.model.clone(),
            endpoint,
            served: route.endpoints,
        });
    }
    ctx.route = Some(route.model);
    let cost = table.router.estimator().estimate(route.model, &req.size);
    ctx.estimated_tokens = cost.total();
    if let Some(window) = route.context_window {
        // The completion the client asked for, not the learned average: the engine
        // reserves room for all of it.
        let asked = if req.size.generates {
            req.size
                .max_completion_tokens
                .unwrap_or(table.policy.routing.default_completion_tokens)
        } else {
            0
        };
        let tokens = cost.prompt + asked;
        if tokens > window {
            return Err(GatewayError::ContextLength { tokens, window });
        }
    }
    let affinity = route
        .affinity
        .as_deref()
        .and_then(|a| affinity_key(&a.settings, &req, body, &session.req_header().headers));
    let tenant_timeout = ctx.tenant.and_then(|t| table.tenants.get(t).timeout);
    let budget = request::client_timeout(&session.req_header().headers)
        .or(tenant_timeout)
        .unwrap_or(table.policy.timeouts.total)
        .min(table.policy.timeouts.total);
    Ok(Resolved {
        req,
        route,
        affinity,
        cost,
        deadline: Instant::from_std(ctx.started) + budget,
    })
}

/// Finds the request a shard with room, or queues it until one has room, its queue
/// deadline passes or the client leaves. `Ok(None)`: the client left while queued.
async fn admit(
    state: &State,
    table: &Table,
    session: &mut Session,
    ctx: &mut RequestCtx,
    r: &Resolved<'_>,
) -> Result<Option<Slot>, GatewayError> {
    let admission = &state.admission;
    let cost = r.cost.total();
    ctx.decision.candidates = Some(table.router.explain(
        r.route,
        cost,
        &[],
        table.policy.admission.enabled.then_some(ctx.priority),
    ));
    if !admission.must_queue(table, ctx.priority) {
        if let Some((slot, outcome)) =
            admission.place_new(table, r.route, ctx.priority, cost, r.affinity.as_ref())
        {
            ctx.affinity = outcome;
            remember_prefix(r, &slot.shard);
            return Ok(Some(slot));
        }
    }
    // Nothing at all to serve it (no shard, room or not): 503, not an overload.
    if !table.policy.admission.enabled || !admission.can_serve(table, r.route) {
        return Err(GatewayError::NoShard(r.req.model.clone()));
    }
    let (mut ticket, queue_deadline) =
        admission.enqueue(table, r.route, ctx.priority, cost, r.deadline.into_std())?;
    let until = Instant::from_std(queue_deadline);
    let outcome = loop {
        tokio::select! {
            biased;
            g = timeout_at(until, ticket.granted()) => break g,
            _ = client_gone(session) => return Ok(None),
            // Room can also come from outside the gateway's own ledger (an engine's queue
            // draining, a shard coming back): look again now and then.
            _ = tokio::time::sleep(RECHECK_QUEUE) => admission.dispatch(),
        }
    };
    ctx.queue_wait = Some(ticket.enqueued.elapsed());
    match outcome {
        Ok(Some(Ok(slot))) => {
            remember_prefix(r, &slot.shard);
            Ok(Some(slot))
        }
        Ok(Some(Err(Evicted))) => Err(admission.shed(ShedReason::Evicted, cost)),
        // The deadline passed in the queue; the request never reaches a shard.
        Ok(None) | Err(_) => Err(admission.shed(ShedReason::QueueTimeout, cost)),
    }
}

/// What a request's cache affinity routes by: an explicit session key (the policy's
/// header, else the body's `prompt_cache_key` or `user`) in either mode, else for
/// `prefix` the hashes of its prompt's leading blocks (none for a prompt shorter than one).
fn affinity_key(
    settings: &AffinitySettings,
    req: &InferenceRequest,
    body: &[u8],
    headers: &http::HeaderMap,
) -> Option<AffinityKey> {
    let header = settings
        .header
        .as_ref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    if let Some(key) = header.or(req.session.as_deref()) {
        return Some(AffinityKey::Session(affinity::session_hash(key)));
    }
    if settings.mode != AffinityMode::Prefix {
        return None;
    }
    let blocks = match req.prompt_spans.as_slice() {
        [one] => affinity::block_hashes(
            &body[one.clone()],
            settings.block_bytes,
            settings.max_prefix_bytes,
        ),
        spans => {
            let text: Vec<u8> = spans
                .iter()
                .flat_map(|s| body[s.clone()].iter().copied())
                .collect();
            affinity::block_hashes(&text, settings.block_bytes, settings.max_prefix_bytes)
        }
    };
    (!blocks.is_empty()).then_some(AffinityKey::Prefix(blocks))
}

/// Notes in the model's prefix index that `shard` now holds the request's prefix.
fn remember_prefix(r: &Resolved<'_>, shard: &ShardEntry) {
    if let (Some(AffinityKey::Prefix(blocks)), Some(a)) = (&r.affinity, r.route.affinity.as_deref())
    {
        a.index.record(blocks, shard.key, std::time::Instant::now());
    }
}

/// The attempt loop: the first on the admitted shard, then retries on others while the
/// failure allows it, the retry budget has room and the deadline is not near. `Err`: the
/// error to answer.
async fn attempts(
    state: &State,
    table: &Table,
    session: &mut Session,
    ctx: &mut RequestCtx,
    r: &Resolved<'_>,
    body: &Bytes,
    first: Slot,
) -> Result<(), GatewayError> {
    // Shards not to pick again: those tried, and the rest of a saturated pool after a 429.
    let mut tried = Vec::with_capacity(2);
    let mut failures: Vec<AttemptFailure> = Vec::new();
    let mut in_flight = state.retry_budget.request();
    let mut next = Some(first);
    let mut first_byte_timeouts = 0;
    let max_attempts = table.policy.routing.max_attempts as usize;
    while let Some(slot) = next.take() {
        let shard = Arc::clone(&slot.shard);
        tried.push(shard.key);
        ctx.shard = Some(Arc::clone(&shard));
        ctx.attempts += 1;
        let started = std::time::Instant::now();
        ctx.decision.attempt_started(
            &shard,
            started.saturating_duration_since(ctx.started),
            TraceContext::new_span_id(),
        );
        let call = Call {
            state,
            table,
            shard: &shard,
            req: &r.req,
            route_model: r.route.model,
            route_name: &r.route.name,
            prefill: table.prefill_time(&shard, r.cost.prompt),
            deadline: r.deadline,
        };
        let outcome = call.attempt(session, ctx, body).await;
        drop(slot);
        let label = outcome.label();
        state.metrics.attempt(&shard.id, &label);
        ctx.decision.attempt_ended(label, started.elapsed());
        if let Some(signal) = outcome.health_signal() {
            if signal == Signal::Success {
                state.retry_budget.deposit();
            }
            shard.reporter.report(signal);
        }
        let cause = match outcome {
            Attempt::Finished(_) | Attempt::ClientGone => return Ok(()),
            Attempt::Retryable(cause) => cause,
        };
        tracing::debug!(request_id = %ctx.request_id, shard = %shard.id, %cause, "attempt failed");
        if matches!(cause, UpstreamFailure::Status(429)) {
            // An overloaded answer: the shard took more than it can start. Trying the rest
            // of a pool that is saturated everywhere would only add load; the retry goes to
            // another region, or the client gets a fast 429.
            state.admission.shard_overloaded(&shard);
            tried.extend(table.router.saturated_peers(r.route, shard.key));
        }
        if matches!(cause, UpstreamFailure::FirstByteTimeout(_)) {
            first_byte_timeouts += 1;
        }
        let rule = cause.retry(RetryContext {
            prompt_tokens: r.cost.prompt,
            first_byte_timeouts,
            max_retry_prompt_tokens: table.policy.routing.max_retry_prompt_tokens,
        });
        failures.push(AttemptFailure {
            shard: shard.id.clone(),
            region: shard.region.clone(),
            cause,
        });
        if rule == Retry::Never || failures.len() >= max_attempts || Instant::now() >= r.deadline {
            break;
        }
        if rule == Retry::Budgeted {
            if !in_flight.try_retry() {
                tracing::debug!(request_id = %ctx.request_id, "retry budget spent");
                break;
            }
            let pause = state.retry_budget.backoff(failures.len() as u32);
            if Instant::now() + pause >= r.deadline {
                break;
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(pause) => {}
                _ = client_gone(session) => return Ok(()),
            }
        }
        ctx.decision.next_candidates =
            Some(table.router.explain(r.route, r.cost.total(), &tried, None));
        next = state
            .admission
            .place_retry(table, r.route, r.cost.total(), &tried);
    }
    Err(if failures.is_empty() {
        GatewayError::NoShard(r.req.model.clone())
    } else if failures
        .iter()
        .all(|f| matches!(f.cause, UpstreamFailure::Status(429)))
    {
        GatewayError::Overloaded(failures)
    } else {
        GatewayError::Upstream(failures)
    })
}

/// The most a routing explanation header may take; a larger one (a very large route)
/// points to the decisions log instead.
const MAX_EXPLANATION_BYTES: usize = 16 << 10;

/// The routing decision so far as an `x-breakwater-explain` value: the first pick's
/// candidates, the attempts (the one answering last), the estimate and the queue wait.
fn explanation(ctx: &RequestCtx) -> HeaderValue {
    let json = serde_json::json!({
        "estimated_tokens": ctx.estimated_tokens,
        "queue_wait_ms": ctx.queue_wait.map(crate::decisions::millis),
        "affinity": ctx.affinity.map(|a| a.as_str()),
        "candidates": crate::decisions::OrEmpty(&ctx.decision.candidates),
        "attempts": &ctx.decision.attempts,
    })
    .to_string();
    // Policy ids are ASCII, so the JSON is a valid header value.
    match HeaderValue::from_str(&json) {
        Ok(v) if json.len() <= MAX_EXPLANATION_BYTES => v,
        _ => HeaderValue::from_static("too large for a header: see GET /admin/decisions"),
    }
}

/// Reads the request body whole, bounded by `limit`. `Ok(None)`: the client went away.
async fn read_body(
    session: &mut Session,
    limit: usize,
    reservation: &mut Reservation,
) -> Result<Option<Bytes>, GatewayError> {
    let too_large = GatewayError::BodyTooLarge { limit };
    let full = |r: &Reservation| GatewayError::BufferFull {
        limit: r.budget_limit(),
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // Not reading the body means the connection cannot be reused.
        session.set_keepalive(None);
        return Err(too_large);
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && session.write_continue_response().await.is_err() {
        return Ok(None);
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    session.set_keepalive(None);
                    return Err(too_large);
                }
                if !reservation.grow(chunk.len()) {
                    session.set_keepalive(None);
                    return Err(full(reservation));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Some(buf.freeze())),
            Err(_) => return Ok(None),
        }
    }
}

/// How long, in all, the gateway keeps reading a refused body after answering.
const LINGER_TOTAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the gateway waits for the next chunk of a refused body.
const LINGER_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

/// After refusing a body the client is still sending, reads and drops what follows for a
/// bounded time before the connection closes. Closing a socket with unread input resets it,
/// and the reset can destroy the answer before the client reads it: the client would see a
/// broken pipe instead of the 413 (nginx's "lingering close" solves the same problem).
async fn discard_unread_body(session: &mut Session) {
    let deadline = Instant::now() + LINGER_TOTAL;
    loop {
        let idle = (Instant::now() + LINGER_IDLE).min(deadline);
        match timeout_at(idle, session.read_request_body()).await {
            Ok(Ok(Some(_))) => continue,
            _ => return,
        }
    }
}

/// Resolves when the client closes its connection; never otherwise.
async fn client_gone(session: &mut Session) {
    if session.read_body_or_idle(true).await.is_err() {
        return;
    }
    std::future::pending::<()>().await
}

/// One attempt's fixed inputs.
struct Call<'a> {
    state: &'a State,
    table: &'a Table,
    shard: &'a ShardEntry,
    req: &'a InferenceRequest,
    route_model: usize,
    /// The model's name, for metrics.
    route_name: &'a str,
    /// The estimated prefill time on this shard: the first-byte deadline grows by it.
    prefill: std::time::Duration,
    deadline: Instant,
}

impl Call<'_> {
    /// The request head for the shard: the client's fields less hop-by-hop ones and those
    /// the gateway sets itself.
    fn upstream_head(&self, session: &Session, ctx: &RequestCtx, body_len: usize) -> Vec<u8> {
        let head = session.req_header();
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let fields = head
            .headers
            .iter()
            .filter(|(name, _)| !SKIPPED_REQUEST_HEADERS.contains(&name.as_str()));
        // Each attempt is a span of the request's trace.
        let traceparent = ctx.trace.header_for(ctx.decision.current_span());
        framing::request_head(
            "POST",
            path,
            &self.shard.authority,
            fields,
            &ctx.request_id,
            &traceparent.to_bytes(),
            body_len,
        )
    }

    /// How long the shard has for its first byte: the policy's first-byte timeout plus
    /// the request's estimated prefill, so a long prompt is not abandoned (and prefilled
    /// again elsewhere) while it is being read.
    fn first_byte_timeout(&self) -> std::time::Duration {
        self.table.policy.timeouts.first_byte + self.prefill
    }

    fn first_byte_deadline(&self) -> Instant {
        (Instant::now() + self.first_byte_timeout()).min(self.deadline)
    }

    fn first_byte_failure(&self) -> UpstreamFailure {
        if Instant::now() >= self.deadline {
            UpstreamFailure::Deadline
        } else {
            UpstreamFailure::FirstByteTimeout(self.first_byte_timeout().as_millis())
        }
    }

    async fn attempt(&self, session: &mut Session, ctx: &mut RequestCtx, body: &Bytes) -> Attempt {
        let head = self.upstream_head(session, ctx, body.len());
        let sent = std::time::Instant::now();
        ctx.first_sent_at.get_or_insert(sent);
        let first_byte = self.first_byte_deadline();
        let send = self.table.upstream.send(self.shard.endpoint(), &head, body);
        // `biased`: the exchange is polled first, so while it is ready the check for a
        // departed client is not even polled (that check may cost a read system call).
        let response = tokio::select! {
            biased;
            r = timeout_at(first_byte, send) => match r {
                Ok(Ok(resp)) => resp,
                Ok(Err(f)) => return Attempt::Retryable(f),
                Err(_) => return Attempt::Retryable(self.first_byte_failure()),
            },
            _ = client_gone(session) => return Attempt::ClientGone,
        };
        let status = response.status;
        if status == 429 || status >= 500 {
            return Attempt::Retryable(UpstreamFailure::Status(status));
        }
        let is_sse = response
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if self.req.stream && is_sse && (200..300).contains(&status) {
            self.stream(session, ctx, response, first_byte, sent).await
        } else {
            self.whole(session, ctx, response).await
        }
    }

    fn idle_deadline(&self) -> Instant {
        (Instant::now() + self.table.policy.timeouts.idle).min(self.deadline)
    }

    fn idle_failure(&self) -> UpstreamFailure {
        if Instant::now() >= self.deadline {
            UpstreamFailure::Deadline
        } else {
            UpstreamFailure::IdleTimeout(self.table.policy.timeouts.idle.as_millis())
        }
    }

    /// Relays a non-streamed answer: read it whole (still retryable if that fails), then
    /// write it.
    async fn whole(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut response: UpstreamResponse<'_>,
    ) -> Attempt {
        let limit = self.table.policy.limits.max_response_bytes;
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        loop {
            let chunk = tokio::select! {
                biased;
                c = timeout_at(self.idle_deadline(), response.chunk()) => c,
                _ = client_gone(session) => return Attempt::ClientGone,
            };
            match chunk {
                Err(_) => return Attempt::Retryable(self.idle_failure()),
                Ok(Ok(None)) => break,
                Ok(Err(f)) => return Attempt::Retryable(f),
                Ok(Ok(Some(data))) => {
                    let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
                    if held + data.len() > limit {
                        return Attempt::Retryable(UpstreamFailure::TooLarge(limit));
                    }
                    if held == 0 {
                        first = Some(data); // a body in one piece, the usual case: no copy
                    } else {
                        if let Some(f) = first.take() {
                            buf.extend_from_slice(&f);
                        }
                        buf.extend_from_slice(&data);
                    }
                }
            }
        }
        let body = first.unwrap_or_else(|| buf.freeze());
        let status = response.status;
        if (200..300).contains(&status) {
            self.learn_from_whole(ctx, &body);
            self.remember_response(super::stored::response_id, &body);
        }
        let mut headers = self.routing_headers(ctx, 2);
        if let Some(ct) = response.content_type.take() {
            headers.insert(http::header::CONTENT_TYPE, ct);
        }
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let Some(header) = super::response_head(status, headers) else {
            return Attempt::Retryable(UpstreamFailure::Status(status));
        };
        ctx.status = status;
        ctx.first_byte_at = Some(std::time::Instant::now());
        if session
            .write_response_header(Box::new(header))
            .await
            .is_err()
            || session.write_response_body(body, true).await.is_err()
        {
            return Attempt::ClientGone;
        }
        Attempt::Finished(None)
    }

    /// For a Responses answer, notes that this shard made the response whose id `id_in`
    /// finds in `bytes` (the body, or a stream's first events), for `GET /v1/responses/{id}`.
    fn remember_response(&self, id_in: fn(&[u8]) -> Option<String>, bytes: &[u8]) {
        if self.req.dialect == Dialect::Responses {
            if let Some(id) = id_in(bytes) {
                self.state.responses.remember(&id, self.shard.key);
            }
        }
    }

    fn learn_from_whole(&self, ctx: &mut RequestCtx, body: &[u8]) {
        if let Some(u) = usage_of(body) {
            self.learn(ctx, u);
        }
    }

    fn learn(&self, ctx: &mut RequestCtx, u: Usage) {
        // A usage block with neither count (an audio answer's `{"seconds": …}`) says nothing.
        if u.prompt_tokens.is_none() && u.completion_tokens.is_none() {
            return;
        }
        ctx.usage = Some((
            u.prompt_tokens.unwrap_or(0),
            u.completion_tokens.unwrap_or(0),
        ));
        // An answer without a prompt count teaches nothing (a zero would read as "no
        // tokens in all those bytes").
        let Some(prompt_tokens) = u.prompt_tokens.filter(|_| self.req.calibrates) else {
            return;
        };
        let completion = self
            .req
            .size
            .generates
            .then_some(u.completion_tokens.unwrap_or(0));
        self.table.router.estimator().observe(
            self.route_model,
            self.req.size.prompt_bytes,
            prompt_tokens,
            completion,
        );
    }

    /// The routing headers every answer from a shard carries, with room for `more`.
    fn routing_headers(&self, ctx: &RequestCtx, more: usize) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(3 + more);
        h.insert(SHARD_HEADER, self.shard.tags.shard.clone());
        h.insert(REGION_HEADER, self.shard.tags.region.clone());
        if let Ok(id) = HeaderValue::from_str(&ctx.request_id) {
            h.insert(REQUEST_ID_HEADER, id);
        }
        if ctx.explain {
            h.insert(EXPLAIN_HEADER, explanation(ctx));
        }
        h
    }

    /// Relays a stream: hold the header back until the first complete output event (a
    /// `data:` event for chat; for Responses, the first past the lifecycle preamble), then
    /// forward every complete event as it arrives.
    async fn stream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut response: UpstreamResponse<'_>,
        first_byte: Instant,
        sent: std::time::Instant,
    ) -> Attempt {
        let mut pending = BytesMut::new();
        // Before the commit point: collect until the first data event.
        let ready = loop {
            let chunk = tokio::select! {
                biased;
                c = timeout_at(first_byte, response.chunk()) => c,
                _ = client_gone(session) => return Attempt::ClientGone,
            };
            match chunk {
                Err(_) => return Attempt::Retryable(self.first_byte_failure()),
                Ok(Ok(None)) => {
                    return Attempt::Retryable(UpstreamFailure::Cut(
                        "stream ended before its first event".into(),
                    ))
                }
                Ok(Err(f)) => return Attempt::Retryable(f),
                Ok(Ok(Some(data))) => {
                    pending.extend_from_slice(&data);
                    if let Some(end) = sse::last_event_end(&pending) {
                        if sse::has_output_event(&pending[..end], self.req.dialect)
                            || pending.len() > MAX_HELD_BACK_BYTES
                        {
                            break end;
                        }
                    }
                }
            }
        };
        // The commit point. Its time to first token teaches the shard's admission limit
        // what the shard can start promptly.
        self.state
            .admission
            .observe_ttft(self.shard, sent.elapsed(), self.prefill);
        let mut headers = self.routing_headers(ctx, 3);
        let fixed = [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::header::CACHE_CONTROL, "no-cache"),
            (http::header::TRANSFER_ENCODING, "chunked"),
        ];
        for (name, value) in fixed {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let Some(header) = super::response_head(200, headers) else {
            return Attempt::Retryable(UpstreamFailure::Status(200));
        };
        ctx.status = 200;
        ctx.first_byte_at = Some(std::time::Instant::now());
        let mut tally = StreamTally::new(self.req.dialect);
        let first = pending.split_to(ready).freeze();
        tally.see(&first);
        self.remember_response(super::stored::created_id, &first);
        if session
            .write_response_header(Box::new(header))
            .await
            .is_err()
            || session.write_response_body(first, false).await.is_err()
        {
            return Attempt::ClientGone;
        }
        // After it: forward complete events; a failure ends the stream with an error event,
        // and so does the end of a shutdown's grace period (seen at the next chunk).
        let mut shutting_down = false;
        let first_event_at = std::time::Instant::now();
        let failure = loop {
            let next = tokio::select! {
                biased;
                c = timeout_at(self.idle_deadline(), response.chunk()) => c,
                _ = client_gone(session) => return Attempt::ClientGone,
            };
            if self.state.lifecycle.grace_over() {
                shutting_down = true;
                break None;
            }
            let chunk = match next {
                Err(_) => break Some(self.idle_failure()),
                Ok(Ok(None)) => break None,
                Ok(Err(f)) => break Some(f),
                Ok(Ok(Some(d))) => d,
            };
            let out = if pending.is_empty() && chunk.ends_with(b"\n\n") {
                chunk // the usual case: whole events per read, forwarded without a copy
            } else {
                pending.extend_from_slice(&chunk);
                match sse::last_event_end(&pending) {
                    Some(end) => pending.split_to(end).freeze(),
                    None => continue,
                }
            };
            tally.see(&out);
            if session.write_response_body(out, false).await.is_err() {
                return Attempt::ClientGone;
            }
        };
        let tail = match &failure {
            None if shutting_down => {
                ctx.stream_error = Some("the gateway is shutting down".into());
                sse::error_event(
                    self.req.dialect,
                    "the gateway is shutting down; retry the request",
                    "shutting_down",
                    tally.events,
                )
            }
            // A clean end: pass on whatever the shard sent last, complete or not.
            None => pending.freeze(),
            // A partial event is dropped so the error event starts at an event boundary.
            Some(cause) => {
                tracing::warn!(request_id = %ctx.request_id, shard = %self.shard.id, %cause, "stream failed after output started");
                ctx.stream_error = Some(cause.to_string());
                sse::error_event(
                    self.req.dialect,
                    &format!("the shard failed mid-stream: {cause}"),
                    if cause.is_timeout() {
                        "upstream_timeout"
                    } else {
                        "upstream_error"
                    },
                    tally.events,
                )
            }
        };
        self.learn_from_stream(ctx, &tally);
        if failure.is_none() && !shutting_down && tally.data_events > 1 {
            // One figure per stream (not a clock read per chunk): its mean time per token
            // after the first event.
            let per = first_event_at.elapsed() / (tally.data_events - 1) as u32;
            self.state
                .metrics
                .time_per_output_token(self.route_name, per);
        }
        if session.write_response_body(tail, true).await.is_err() {
            return Attempt::ClientGone;
        }
        Attempt::Finished(failure)
    }

    fn learn_from_stream(&self, ctx: &mut RequestCtx, tally: &StreamTally) {
        match tally.usage {
            Some(u) => self.learn(ctx, u),
            None if tally.data_events > 0 => self.table.router.estimator().observe(
                self.route_model,
                self.req.size.prompt_bytes,
                0,
                Some(tally.data_events),
            ),
            None => {}
        }
    }
}

/// A `usage` block: chat's names, or the Responses API's (`input_tokens`, `output_tokens`).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct Usage {
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

/// What a relayed stream said about its size.
struct StreamTally {
    dialect: Dialect,
    /// Events that carried generated tokens.
    data_events: u64,
    /// Every `data:` event relayed (a Responses error event is numbered after them).
    events: u64,
    usage: Option<Usage>,
}

impl StreamTally {
    fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            data_events: 0,
            events: 0,
            usage: None,
        }
    }

    fn see(&mut self, events: &[u8]) {
        self.data_events += sse::count_output_events(events, self.dialect);
        if self.dialect == Dialect::Responses {
            self.events += sse::count_data_events(events);
        }
        // Only the (rare) event that carries usage is parsed.
        if USAGE_FINDER.find(events).is_some() {
            for line in sse::lines(events) {
                let Some(json) = line.strip_prefix(b"data:") else {
                    continue;
                };
                if let Some(u) = usage_of(json) {
                    self.usage = Some(u);
                }
            }
        }
    }
}

/// The top-level `usage` block of a JSON response, if it has one. Parses only that block
/// when it can: a `"usage"` key with unescaped quotes cannot occur inside a JSON string, and
/// engines put it last. Falls back to parsing the whole document.
fn usage_of(json: &[u8]) -> Option<Usage> {
    let at = memchr::memmem::rfind(json, USAGE_KEY)?;
    let rest = json[at + USAGE_KEY.len()..].trim_ascii_start();
    if let Some(value) = rest.strip_prefix(b":") {
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Option<Usage>>();
        if let Some(Ok(usage)) = values.next() {
            return usage;
        }
    }
    #[derive(serde::Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<WithUsage>(json).ok()?.usage
}

/// The key of a usage block, quotes included.
const USAGE_KEY: &[u8] = b"\"usage\"";

/// A searcher for [`USAGE_KEY`], built once: every streamed chunk is searched.
static USAGE_FINDER: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(USAGE_KEY));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_wherever_engines_put_it() {
        let last = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {}"}}],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
        let u = usage_of(last).unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(7), Some(3)));
        let first = br#"{"usage" : {"prompt_tokens":1,"completion_tokens":2},"choices":[]}"#;
        assert_eq!(usage_of(first).unwrap().prompt_tokens, Some(1));
        // A later nested "usage" that is not a usage block: the whole document decides.
        let nested = br#"{"usage":{"prompt_tokens":4},"meta":{"usage":5}}"#;
        assert_eq!(usage_of(nested).unwrap().prompt_tokens, Some(4));
        assert!(usage_of(br#"{"usage":null}"#).is_none());
        assert!(usage_of(br#"{"choices":[]}"#).is_none());
        assert!(usage_of(b"not json \"usage\": {").is_none());
    }
}
