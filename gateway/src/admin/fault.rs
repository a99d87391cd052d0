//! The demo's fault switch: `POST /admin/shards/{id}/fault` breaks a simulated shard (or
//! its simulated GPU) on purpose. Compiled only with the `demo` feature; a production
//! build has no such route.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use super::{error, reply};

/// Largest fault request body, bytes.
const MAX_ADMIN_BODY_BYTES: usize = 64 << 10;

/// Where the admin API's fault endpoint sends a shard's faults.
#[derive(Debug, Clone, Default)]
pub struct FaultControls {
    /// Each simulated engine's control listener, by shard id.
    pub engines: HashMap<String, SocketAddr>,
    /// Each simulated gpu-probe, by shard id.
    pub probes: HashMap<String, SocketAddr>,
}

impl FaultControls {
    /// Whether fault injection is on (demo mode).
    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }
}

/// `POST /admin/shards/{shard}/fault`: relays llm-sim's fault body to the shard's
/// simulated engine, and the `gpu_*` modes to its simulated gpu-probe.
pub(super) async fn inject(
    controls: &FaultControls,
    shard: &str,
    session: &mut ServerSession,
) -> Response<Vec<u8>> {
    let Some(control) = controls.engines.get(shard) else {
        let msg = if controls.is_empty() {
            "fault injection is only available in demo mode".to_string()
        } else {
            format!("no simulated shard {shard:?}")
        };
        return error(StatusCode::NOT_FOUND, &msg, "not_found");
    };
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_ADMIN_BODY_BYTES => {
                body.extend_from_slice(&chunk)
            }
            Ok(Some(_)) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body too large",
                    "request_too_large",
                )
            }
            Ok(None) => break,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "could not read the body",
                    "invalid_request",
                )
            }
        }
    }
    // GPU faults go to the shard's simulated probe; the rest to its simulated engine,
    // which validates the body (its answer, or its error, is relayed).
    let mode = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("mode").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_default();
    let gpu_change = match mode.as_str() {
        "gpu_degraded" => Some(json!({"reset": true, "throttle": ["hw_slowdown"]})),
        "gpu_failing" => Some(json!({"reset": true, "ecc_uncorrected": 1})),
        "gpu_hung" => Some(json!({"reset": true, "hung": true})),
        "gpu_ok" | "ok" => Some(json!({"reset": true})),
        _ => None,
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let probe = controls.probes.get(shard);
    if let (Some(change), Some(probe)) = (&gpu_change, probe) {
        let request = http::Request::post(format!("http://{probe}/v1/simulate"))
            .body(Full::new(Bytes::from(change.to_string())));
        let Ok(request) = request else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not build the request",
                "internal",
            );
        };
        if let Err(e) = client.request(request).await {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("probe unreachable: {e}"),
                "upstream_error",
            );
        }
    }
    if mode.starts_with("gpu_") {
        return match (gpu_change, probe) {
            (Some(_), Some(_)) => reply(
                StatusCode::OK,
                json!({"mode": mode}).to_string().into_bytes(),
            ),
            (Some(_), None) => error(
                StatusCode::NOT_FOUND,
                &format!("shard {shard:?} has no simulated gpu-probe"),
                "not_found",
            ),
            (None, _) => error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "unknown GPU fault {mode:?}: gpu_degraded, gpu_failing, gpu_hung or gpu_ok"
                ),
                "invalid_fault",
            ),
        };
    }
    let request = http::Request::post(format!("http://{control}/fault"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)));
    let Ok(request) = request else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not build the request",
            "internal",
        );
    };
    match client.request(request).await {
        Ok(resp) => {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            reply(status, bytes.to_vec())
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            &format!("simulator unreachable: {e}"),
            "upstream_error",
        ),
    }
}
