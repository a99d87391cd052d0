//! Optional span export over OTLP/HTTP (JSON encoding), off unless an endpoint is given
//! (`--otlp-endpoint`, or `OTEL_EXPORTER_OTLP_ENDPOINT`): one server span per request,
//! a client child span per attempt (the span id each attempt's `traceparent` named), in
//! the caller's trace. Requests hand finished spans to a bounded channel (never waiting:
//! when it is full the span is dropped and counted); one task batches them — up to
//! [`BATCH`] spans or [`FLUSH_EVERY`] — and posts them to `{endpoint}/v1/traces`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Spans queued for export at most; more are dropped (and counted).
pub const QUEUE: usize = 8192;
/// Spans per export request at most.
pub const BATCH: usize = 512;
/// A partial batch is sent after this long.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// An export request that takes longer is abandoned (its spans are lost).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// OpenTelemetry span kinds (OTLP's enum values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The gateway serving a client.
    Server = 2,
    /// The gateway calling a shard.
    Client = 3,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    /// The trace.
    pub trace_id: u128,
    /// This span.
    pub span_id: u64,
    /// Its parent (the caller's span, or the request's server span).
    pub parent_id: Option<u64>,
    /// A low-cardinality name (`POST /v1/chat/completions`, `attempt`).
    pub name: &'static str,
    /// Server or client.
    pub kind: Kind,
    /// Start and end, Unix nanoseconds.
    pub start_unix_ns: u64,
    /// End, Unix nanoseconds.
    pub end_unix_ns: u64,
    /// Whether it ended in error.
    pub error: bool,
    /// Attributes: string values.
    pub attributes: Vec<(&'static str, String)>,
    /// Attributes: integer values.
    pub int_attributes: Vec<(&'static str, i64)>,
}

/// Where requests hand their spans.
#[derive(Debug, Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Vec<Span>>,
    dropped: Arc<AtomicU64>,
}

impl Exporter {
    /// Starts the export task on `runtime`, posting to `endpoint` (the collector's base
    /// URL, e.g. `http://127.0.0.1:4318`).
    pub fn start(runtime: &tokio::runtime::Handle, endpoint: &url::Url) -> Exporter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let url = traces_url(endpoint);
        runtime.spawn(run(rx, url));
        Exporter { tx, dropped }
    }

    /// Queues a request's spans; drops them when the queue is full.
    pub fn export(&self, spans: Vec<Span>) {
        if self.tx.try_send(spans).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests whose spans were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// `{endpoint}/v1/traces`, as OTLP/HTTP names it.
fn traces_url(endpoint: &url::Url) -> String {
    format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'))
}

/// Now, Unix nanoseconds.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn run(mut rx: mpsc::Receiver<Vec<Span>>, url: String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                got = rx.recv() => match got {
                    Some(spans) => {
                        batch.extend(spans);
                        if batch.len() >= BATCH {
                            break;
                        }
                    }
                    None => {
                        send(&client, &url, std::mem::take(&mut batch)).await;
                        return;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            send(&client, &url, std::mem::take(&mut batch)).await;
        }
    }
}

async fn send<C>(client: &Client<C, Full<Bytes>>, url: &str, spans: Vec<Span>)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    if spans.is_empty() {
        return;
    }
    let body = encode(&spans).to_string();
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)));
    let Ok(request) = request else { return };
    match tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await {
        Ok(Ok(r)) if r.status().is_success() => {}
        Ok(Ok(r)) => {
            tracing::warn!(target: "otlp", status = %r.status(), spans = spans.len(), "span export refused")
        }
        Ok(Err(e)) => {
            tracing::warn!(target: "otlp", error = %e, spans = spans.len(), "span export failed")
        }
        Err(_) => tracing::warn!(target: "otlp", spans = spans.len(), "span export timed out"),
    }
}

/// The OTLP/JSON `ExportTraceServiceRequest` for `spans` (ids in hex, times as decimal
/// strings, as the OTLP JSON mapping has them).
pub fn encode(spans: &[Span]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut attributes: Vec<Value> = s
                .attributes
                .iter()
                .map(|(k, v)| json!({"key": k, "value": {"stringValue": v}}))
                .collect();
            attributes.extend(
                s.int_attributes
                    .iter()
                    .map(|(k, v)| json!({"key": k, "value": {"intValue": v.to_string()}})),
            );
            let mut span = json!({
                "traceId": format!("{:032x}", s.trace_id),
                "spanId": format!("{:016x}", s.span_id),
                "name": s.name,
                "kind": s.kind as i32,
                "startTimeUnixNano": s.start_unix_ns.to_string(),
                "endTimeUnixNano": s.end_unix_ns.to_string(),
                "attributes": attributes,
                "status": {"code": if s.error { 2 } else { 1 }},
            });
            if let Some(p) = s.parent_id {
                span["parentSpanId"] = json!(format!("{p:016x}"));
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "breakwater"}},
                {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
            ]},
            "scopeSpans": [{
                "scope": {"name": "breakwater", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp_json() {
        let s = Span {
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            span_id: 0xabc,
            parent_id: Some(0x00f0_67aa_0ba9_02b7),
            name: "attempt",
            kind: Kind::Client,
            start_unix_ns: 1,
            end_unix_ns: 2,
            error: true,
            attributes: vec![("breakwater.shard", "a".into())],
            int_attributes: vec![("http.response.status_code", 500)],
        };
        let v = encode(&[s]);
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["spanId"], "0000000000000abc");
        assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(span["kind"], 3);
        assert_eq!(span["startTimeUnixNano"], "1");
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(span["attributes"][0]["value"]["stringValue"], "a");
        assert_eq!(span["attributes"][1]["value"]["intValue"], "500");
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "breakwater"
        );
    }

    #[test]
    fn the_traces_path_is_appended_once() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(traces_url(&u("http://c:4318")), "http://c:4318/v1/traces");
        assert_eq!(traces_url(&u("http://c:4318/")), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url(&u("http://c:4318/otlp")),
            "http://c:4318/otlp/v1/traces"
        );
    }
}
