//! Responses an engine stored (`store`, the Responses API's default): `GET
//! /v1/responses/{id}`, `DELETE /v1/responses/{id}` and what lies under them
//! (`/input_items`, `/cancel`) must reach the shard that made the response, and carry no
//! model to route by.
//!
//! How the gateway finds that shard: it remembers the id of every response it relays
//! (from the answer's body, or the stream's `response.created` event) beside the shard
//! that made it, in a bounded index (the newest [`INDEX_CAPACITY`]); a call for a known id
//! goes straight there. An id it does not know — made through another gateway replica,
//! before a restart, or evicted — is asked of each shard whose pool serves Responses in
//! turn, until one answers something other than 404; if all say 404, that 404 is the
//! answer. The ids are the engine's own and never rewritten, so a client sees exactly what
//! the engine sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use pingora::protocols::http::ServerSession as Session;

use super::error::GatewayError;
use super::request::Endpoint;
use super::upstream::framing;
use super::RequestCtx;
use crate::routing::ShardEntry;
use crate::table::Table;
use breakwater_health::ShardId;

/// Response ids remembered.
pub const INDEX_CAPACITY: usize = 100_000;

/// Which shard made each recent response.
#[derive(Default)]
pub struct ResponseIndex {
    inner: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<String, ShardId>,
    order: VecDeque<String>,
}

impl ResponseIndex {
    /// Notes that `shard` made response `id`.
    pub fn remember(&self, id: &str, shard: ShardId) {
        let mut ix = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if ix.by_id.insert(id.to_string(), shard).is_none() {
            ix.order.push_back(id.to_string());
            while ix.order.len() > INDEX_CAPACITY {
                if let Some(old) = ix.order.pop_front() {
                    ix.by_id.remove(&old);
                }
            }
        }
    }

    /// The shard that made `id`, if remembered.
    pub fn find(&self, id: &str) -> Option<ShardId> {
        let ix = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        ix.by_id.get(id).copied()
    }

    /// Forgets `id` (it was deleted).
    pub fn forget(&self, id: &str) {
        let mut ix = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        ix.by_id.remove(id);
    }
}

/// The `id` of a Responses answer: the body's, or the `response.created` event's.
pub fn response_id(json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Inner {
        id: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Outer {
        id: Option<String>,
        response: Option<Inner>,
    }
    let o: Outer = serde_json::from_slice(json).ok()?;
    o.response.and_then(|r| r.id).or(o.id)
}

/// The `response.created` event's id in the first events of a stream.
pub fn created_id(events: &[u8]) -> Option<String> {
    super::sse::lines(events)
        .filter_map(|l| l.strip_prefix(b"data:"))
        .find_map(|data| response_id(data.trim_ascii()))
}

/// Answers a call on stored response `id` (`path` as the client sent it, query included).
pub async fn serve(
    state: &super::State,
    table: &Table,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: &str,
) {
    // The same keys as inference: a stored response is a tenant's.
    match state
        .admission
        .identify(table, &session.req_header().headers)
    {
        Ok(tenant) => ctx.tenant = Some(tenant),
        Err(e) => return super::respond_error(session, ctx, &e).await,
    }
    let shards = table.router.shards();
    let serves = |s: &ShardEntry| {
        table
            .policy
            .pools
            .iter()
            .any(|p| p.id == s.pool && p.endpoints.contains(Endpoint::Responses))
    };
    // The shard that made it first, then every other shard that serves Responses.
    let known = state.responses.find(id);
    let order: Vec<&ShardEntry> = known
        .and_then(|k| shards.iter().find(|s| s.key == k))
        .map(|s| &**s)
        .into_iter()
        .chain(
            shards
                .iter()
                .map(|s| &**s)
                .filter(|s| Some(s.key) != known && serves(s)),
        )
        .collect();
    let mut last: Option<(u16, Option<HeaderValue>, Bytes, &ShardEntry)> = None;
    let mut failures = Vec::new();
    for shard in order {
        match forward(table, session, ctx, shard).await {
            Ok((status, ct, body)) => {
                let found = status != 404;
                last = Some((status, ct, body, shard));
                if found {
                    break;
                }
            }
            Err(cause) => failures.push(super::error::AttemptFailure {
                shard: shard.id.clone(),
                region: shard.region.clone(),
                cause,
            }),
        }
    }
    let Some((status, ct, body, shard)) = last else {
        let e = if failures.is_empty() {
            GatewayError::NotFound {
                method: session.req_header().method.to_string(),
                path: session.req_header().uri.path().to_string(),
            }
        } else {
            GatewayError::Upstream(failures)
        };
        return super::respond_error(session, ctx, &e).await;
    };
    if status == 200 && session.req_header().method == http::Method::DELETE {
        state.responses.forget(id);
    } else if status == 200 && known.is_none() {
        state.responses.remember(id, shard.key);
    }
    let mut h = http::HeaderMap::with_capacity(4);
    h.insert(super::SHARD_HEADER, shard.tags.shard.clone());
    h.insert(super::REGION_HEADER, shard.tags.region.clone());
    if let Some(ct) = ct {
        h.insert(http::header::CONTENT_TYPE, ct);
    }
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let Some(head) = super::response_head(status, h) else {
        return;
    };
    ctx.status = status;
    if session.write_response_header(Box::new(head)).await.is_ok() {
        let _ = session.write_response_body(body, true).await;
    }
}

/// Sends the client's call to `shard` and reads the answer whole (bounded by the
/// policy's response limit and timeouts).
async fn forward(
    table: &Table,
    session: &Session,
    ctx: &RequestCtx,
    shard: &ShardEntry,
) -> Result<(u16, Option<HeaderValue>, Bytes), super::error::UpstreamFailure> {
    use super::error::UpstreamFailure;
    let req = session.req_header();
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let fields = req
        .headers
        .iter()
        .filter(|(name, _)| !super::exchange::SKIPPED_REQUEST_HEADERS.contains(&name.as_str()));
    let traceparent = ctx.trace.header_for(ctx.server_span);
    let head = framing::request_head(
        req.method.as_str(),
        path,
        &shard.authority,
        fields,
        &ctx.request_id,
        &traceparent.to_bytes(),
        0,
    );
    let timeouts = &table.policy.timeouts;
    let call = async {
        let mut response = table.upstream.send(shard.endpoint(), &head, &[]).await?;
        let limit = table.policy.limits.max_response_bytes;
        let mut body = BytesMut::new();
        loop {
            let chunk = tokio::time::timeout(timeouts.idle, response.chunk())
                .await
                .map_err(|_| UpstreamFailure::IdleTimeout(timeouts.idle.as_millis()))??;
            let Some(data) = chunk else { break };
            if body.len() + data.len() > limit {
                return Err(UpstreamFailure::TooLarge(limit));
            }
            body.extend_from_slice(&data);
        }
        Ok((response.status, response.content_type.take(), body.freeze()))
    };
    tokio::time::timeout(timeouts.first_byte, call)
        .await
        .map_err(|_| UpstreamFailure::FirstByteTimeout(timeouts.first_byte.as_millis()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_bodies_and_created_events_and_the_index_is_bounded() {
        assert_eq!(
            response_id(br#"{"id":"resp_1","object":"response","output":[{"id":"msg_1"}]}"#)
                .as_deref(),
            Some("resp_1")
        );
        let events = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_2\"}}\n\n";
        assert_eq!(created_id(events).as_deref(), Some("resp_2"));
        assert_eq!(created_id(b"data: not json\n\n"), None);

        let ix = ResponseIndex::default();
        let mut keys = slotmap::SlotMap::<ShardId, ()>::with_key();
        let (a, b) = (keys.insert(()), keys.insert(()));
        ix.remember("resp_a", a);
        assert_eq!(ix.find("resp_a"), Some(a));
        for i in 0..INDEX_CAPACITY {
            ix.remember(&format!("r{i}"), b);
        }
        assert_eq!(ix.find("resp_a"), None, "the oldest is evicted");
        assert_eq!(ix.find("r5"), Some(b));
        ix.forget("r5");
        assert_eq!(ix.find("r5"), None);
        assert!(ix.inner.lock().unwrap().by_id.len() <= INDEX_CAPACITY);
    }
}
