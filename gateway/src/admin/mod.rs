//! The admin listener, separate from traffic. With the bearer token: `GET /admin/status`,
//! `GET /admin/events`, `GET /admin/history`, `GET /admin/decisions`, `POST /admin/reload`,
//! `POST /admin/shards/{id}/drain` and `/undrain`, and (demo mode only)
//! `POST /admin/shards/{id}/fault`. Open: `GET /metrics` (Prometheus) and the dashboard's
//! static files at `/` (they hold no data; the page asks for the token and calls the API
//! with it).
//!
//! The token comes from `BREAKWATER_ADMIN_TOKEN`; it is compared in constant time and
//! never logged. `/metrics` carries no secrets and is left open for scrapers, as Envoy's
//! admin `/stats` is; bind the admin listener to a private address.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use breakwater_health::ShardState;

mod dashboard;
#[cfg(feature = "demo")]
mod fault;
#[cfg(feature = "demo")]
pub use fault::FaultControls;

/// Where the fault switch sends faults: nothing in a build without the demo.
#[cfg(not(feature = "demo"))]
#[derive(Debug, Clone, Default)]
pub struct FaultControls;
use crate::decisions::CAPACITY;
use crate::policy::Priority;
use crate::proxy::error::{error_json, GatewayError};
use crate::proxy::State;
use crate::reload::{ReloadError, Reloader, Trigger};
use crate::stats::history::POINTS;
use crate::table::Table;

/// The admin application.
pub struct Admin {
    state: Arc<State>,
    reloader: Arc<Reloader>,
    discovery: Arc<crate::discovery::Discovery>,
    /// Demo mode: where each simulated shard and probe takes faults.
    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    fault_controls: FaultControls,
}

/// An operator action on one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShardAction {
    Drain,
    Undrain,
    Fault,
}

/// `/admin/shards/{id}/{action}` → the id and the action.
fn shard_action(path: &str) -> Option<(&str, ShardAction)> {
    let (id, action) = path.strip_prefix("/admin/shards/")?.rsplit_once('/')?;
    let action = match action {
        "drain" => ShardAction::Drain,
        "undrain" => ShardAction::Undrain,
        "fault" => ShardAction::Fault,
        _ => return None,
    };
    (!id.is_empty() && !id.contains('/')).then_some((id, action))
}

impl Admin {
    /// An admin API over the gateway's state, guarded by its admin token.
    /// `fault_controls` is empty outside demo mode, which turns the fault endpoint off.
    pub fn new(
        state: Arc<State>,
        reloader: Arc<Reloader>,
        discovery: Arc<crate::discovery::Discovery>,
        fault_controls: FaultControls,
    ) -> Self {
        Self {
            state,
            reloader,
            discovery,
            fault_controls,
        }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), self.state.admin_token.as_bytes())
    }

    fn status(&self) -> serde_json::Value {
        let table = self.state.tables.load();
        let router = &table.router;
        let health = router.health();
        let now_s = crate::stats::now_s();
        let shards: Vec<_> = router
            .shards()
            .iter()
            .map(|s| {
                let h = health.get(s.key);
                let state = if s.is_drained() {
                    ShardState::Draining
                } else {
                    h.state
                };
                json!({
                    "id": s.id,
                    "region": s.region,
                    "pool": s.pool,
                    "url": s.url.as_str(),
                    "state": state.as_str(),
                    "reason": if s.is_drained() { "drained by an operator" } else { h.reason.as_str() },
                    "drained": s.is_drained(),
                    "health_state": h.state.as_str(),
                    "ejection_count": h.ejection_count,
                    "weight_factor": h.weight_factor,
                    "gpu": h.gpu,
                    "queue_depth": h.engine.and_then(|e| e.queue_depth),
                    "running": h.engine.and_then(|e| e.running),
                    "kv_usage": h.engine.and_then(|e| e.kv_usage),
                    "prefix_cache_hit_rate": h.engine.and_then(|e| e.prefix_cache_hit_rate),
                    "last_transition": h.last_transition,
                    "inflight_tokens": s.load.inflight_tokens(),
                    "inflight_requests": s.load.inflight_requests(),
                    "capacity_tps": s.capacity_tps,
                    "admission_limit_tokens": s.limit.tokens(),
                    "declared_slots": s.max_requests,
                    "learned_slots": s.slots.learned(),
                    "allotted_slots": s.slots.allotment(),
                    "limit_share": s.limit.share(),
                    "effective_limit_tokens": s.limit.effective_tokens(h.weight_factor).round(),
                    "last_minute": s.window.summary(now_s, now_s),
                    "dispatched_requests_total": s.load.dispatched_requests_total(),
                    "dispatched_tokens_total": s.load.dispatched_tokens_total(),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "demo": self.demo(),
            "home_region": table.policy.home_region,
            "ready": !self.state.lifecycle.is_stopping() && router.ready(),
            "stopping": self.state.lifecycle.is_stopping(),
            "in_flight": self.state.lifecycle.in_flight(),
            "policy": self.reloader.status(),
            "shards": shards,
            "admission": self.admission_status(&table),
            "cluster": self.state.cluster.as_ref().map(|c| c.view()),
            "discovery": self.discovery.status(),
        })
    }

    /// Admission's state: settings, queue depths, tenants (ids, priorities, limits and
    /// what is left of them; never keys).
    fn admission_status(&self, table: &Table) -> serde_json::Value {
        let a = &self.state.admission;
        let settings = &table.policy.admission;
        let depths = a.queue_depths();
        let queue: serde_json::Map<String, serde_json::Value> = Priority::ALL
            .iter()
            .zip(depths)
            .map(|(p, d)| (p.as_str().to_string(), json!(d)))
            .collect();
        let tenants: Vec<_> = table
            .tenants
            .all()
            .iter()
            .map(|t| {
                json!({
                    "id": t.id,
                    "priority": t.priority.as_str(),
                    "rpm": t.rpm.as_ref().map(|b| b.peek().limit),
                    "rpm_remaining": t.rpm.as_ref().map(|b| b.peek().remaining),
                    "tpm": t.tpm.as_ref().map(|b| b.peek().limit),
                    "tpm_remaining": t.tpm.as_ref().map(|b| b.peek().remaining),
                    "limits_from": t.rpm.as_ref().or(t.tpm.as_ref()).map(|b| b.source().as_str()),
                    "rpm_held": t.rpm.as_ref().map(|b| b.held().floor()),
                    "tpm_held": t.tpm.as_ref().map(|b| b.held().floor()),
                })
            })
            .collect();
        json!({
            "enabled": settings.enabled,
            "require_api_key": settings.require_api_key,
            "queue_depth": queue,
            "drain_tokens_per_s": a.drain_tps().round(),
            "queue_target_ms": a.queue_target(settings).as_secs_f64() * 1e3,
            "queue_target_from": if settings.queue_target.is_some() { "policy" } else { "fleet" },
            "base_ttft_ms": a.base_ttft().map(|d| d.as_secs_f64() * 1e3),
            "arrivals_per_finish": a.arrivals_per_finish().map(|r| (r * 100.0).round() / 100.0),
            "tenants": tenants,
        })
    }

    /// `GET /admin/decisions?limit=N` (newest first, default 50) or `?id=REQUEST_ID`.
    fn decisions(&self, session: &ServerSession) -> Response<Vec<u8>> {
        let log = &self.state.decisions;
        let list = match query(session, "id") {
            Some(id) => match log.find(&id) {
                Some(d) => vec![d],
                None => {
                    return error(
                        StatusCode::NOT_FOUND,
                        &format!("no decision kept for request {id:?} (the last {CAPACITY} are)"),
                        "not_found",
                    )
                }
            },
            None => log.last(query_usize(session, "limit").unwrap_or(50).min(CAPACITY)),
        };
        reply(
            StatusCode::OK,
            json!({"decisions": list, "kept": CAPACITY})
                .to_string()
                .into_bytes(),
        )
    }

    /// `POST /admin/reload`: the policy directory read again now.
    async fn reload(&self) -> Response<Vec<u8>> {
        let reloader = Arc::clone(&self.reloader);
        let done = tokio::task::spawn_blocking(move || reloader.reload(Trigger::Admin)).await;
        match done {
            Ok(Ok(applied)) => reply(StatusCode::OK, json!(applied).to_string().into_bytes()),
            Ok(Err(ReloadError::NoDirectory)) => error(
                StatusCode::CONFLICT,
                &ReloadError::NoDirectory.to_string(),
                "no_policy_directory",
            ),
            Ok(Err(e)) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("the policy set was not applied (the running one stays): {e}"),
                "invalid_policy",
            ),
            Err(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the reload did not finish",
                "internal",
            ),
        }
    }

    /// `POST /admin/shards/{id}/drain` and `/undrain`: no new requests for the shard (in
    /// flight ones finish), or back to normal. Kept across reloads until undone.
    fn drain(&self, id: &str, drain: bool) -> Response<Vec<u8>> {
        let table = self.state.tables.load();
        let Some(shard) = table.router.shard(id) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no shard {id:?} in the policy in force"),
                "not_found",
            );
        };
        let was = shard.load.set_drained(drain);
        tracing::info!(
            target: "admin",
            shard = %shard.id,
            action = if drain { "drain" } else { "undrain" },
            drained_before = was,
            drained_after = drain,
            inflight_requests = shard.load.inflight_requests(),
            "operator action"
        );
        if was != drain {
            let (kind, detail) = if drain {
                ("drain", "drained by an operator: no new requests")
            } else {
                ("undrain", "undrained by an operator: back in service")
            };
            self.state.journal.note(kind, shard.id.clone(), detail);
        }
        if !drain {
            // Room for the queue, if anyone waits.
            self.state.admission.dispatch();
        }
        let body = json!({
            "id": shard.id,
            "drained": drain,
            "changed": was != drain,
            "inflight_requests": shard.load.inflight_requests(),
        });
        reply(StatusCode::OK, body.to_string().into_bytes())
    }
}

impl Admin {
    /// Whether the fault switch is on (a demo fleet).
    #[cfg(feature = "demo")]
    fn demo(&self) -> bool {
        !self.fault_controls.is_empty()
    }

    #[cfg(not(feature = "demo"))]
    fn demo(&self) -> bool {
        false
    }

    #[cfg(feature = "demo")]
    async fn fault(&self, shard: &str, session: &mut ServerSession) -> Response<Vec<u8>> {
        fault::inject(&self.fault_controls, shard, session).await
    }

    #[cfg(not(feature = "demo"))]
    async fn fault(&self, _shard: &str, _session: &mut ServerSession) -> Response<Vec<u8>> {
        error(
            StatusCode::NOT_FOUND,
            "fault injection is only available in demo builds",
            "not_found",
        )
    }
}

/// Whether two secrets are equal, in time that does not depend on where they differ; an
/// empty secret equals nothing.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first value of query parameter `name`.
fn query(session: &ServerSession, name: &str) -> Option<String> {
    let q = session.req_header().uri.query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn query_usize(session: &ServerSession, name: &str) -> Option<usize> {
    query(session, name)?.parse().ok()
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

fn error(status: StatusCode, message: &str, code: &str) -> Response<Vec<u8>> {
    reply(
        status,
        error_json(message, "invalid_request_error", code).into_bytes(),
    )
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if method == http::Method::GET && path == "/metrics" {
            let table = self.state.tables.load();
            let text = self.state.metrics.render(&table, &self.state.admission);
            let mut r = reply(StatusCode::OK, text.into_bytes());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return r;
        }
        if method == http::Method::GET || method == http::Method::HEAD {
            if let Some(asset) = dashboard::asset(&path) {
                return dashboard::serve(asset);
            }
        }
        if !path.starts_with("/admin/") {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no route for {method} {path}"),
                "not_found",
            );
        }
        if !self.authorized(session) {
            let e = GatewayError::Unauthorized;
            let mut r = reply(StatusCode::UNAUTHORIZED, e.body().into_bytes());
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
        let monitor = self.state.tables.fleet().monitor();
        match (&method, path.as_str(), shard_action(&path)) {
            (&http::Method::GET, "/admin/status", _) => {
                reply(StatusCode::OK, self.status().to_string().into_bytes())
            }
            (&http::Method::GET, "/admin/events", _) => {
                let events = json!({
                    "events": monitor.events(),
                    "operations": self.state.journal.entries(),
                    "dropped_signals": monitor.dropped_signals(),
                });
                reply(StatusCode::OK, events.to_string().into_bytes())
            }
            (&http::Method::GET, "/admin/history", _) => {
                let points = query_usize(session, "points").unwrap_or(POINTS);
                let series = self.state.history.series(points.min(POINTS));
                // Serialised directly, so the points print as the f32s they are.
                let body = serde_json::to_vec(&series).unwrap_or_default();
                reply(StatusCode::OK, body)
            }
            (&http::Method::GET, "/admin/decisions", _) => self.decisions(session),
            (&http::Method::POST, "/admin/reload", _) => self.reload().await,
            (&http::Method::POST, _, Some((id, ShardAction::Drain))) => self.drain(id, true),
            (&http::Method::POST, _, Some((id, ShardAction::Undrain))) => self.drain(id, false),
            (&http::Method::POST, _, Some((id, ShardAction::Fault))) => {
                let id = id.to_string();
                self.fault(&id, session).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no route for {method} {path}"),
                "not_found",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, shard_action, ShardAction};

    #[test]
    fn shard_action_paths() {
        assert_eq!(
            shard_action("/admin/shards/w-1/drain"),
            Some(("w-1", ShardAction::Drain))
        );
        assert_eq!(
            shard_action("/admin/shards/w-1/undrain"),
            Some(("w-1", ShardAction::Undrain))
        );
        assert_eq!(
            shard_action("/admin/shards/w-1/fault"),
            Some(("w-1", ShardAction::Fault))
        );
        assert_eq!(shard_action("/admin/shards//drain"), None);
        assert_eq!(shard_action("/admin/shards/a/b/drain"), None);
        assert_eq!(shard_action("/admin/shards/w-1/explode"), None);
        assert_eq!(shard_action("/admin/shards/w-1"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"sec", b"secret"));
    }
}
