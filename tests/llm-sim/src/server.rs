//! The two HTTP listeners: the serving port (OpenAI API, `/health`, `/metrics`) and the
//! control port (`/fault`, `/stats`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::engine::Engine;
use crate::fault::{Fault, FaultMode};
use crate::openai::{self, Endpoint, InferenceRequest};

/// Largest request body the engine reads.
const MAX_BODY_BYTES: usize = 64 << 20;

/// The response body type: a whole buffer or a channel of SSE chunks.
pub enum SimBody {
    /// A complete body.
    Full(Full<Bytes>),
    /// Chunks produced by a generation task; an `Err` cuts the connection.
    Channel(mpsc::Receiver<Result<Bytes, io::Error>>),
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            SimBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            SimBody::Channel(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|chunk| chunk.map(Frame::data))),
        }
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<SimBody> {
    let mut resp = Response::new(SimBody::Full(Full::new(body.into())));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<SimBody> {
    full(status, "application/json", body.to_string())
}

fn error_response(status: StatusCode, message: &str, kind: &str, code: &str) -> Response<SimBody> {
    full(
        status,
        "application/json",
        openai::error_body(message, kind, code),
    )
}

// === serving port ===

/// Accepts on the serving port until the task is aborted. In `down` mode the port is
/// closed (connections are refused and open ones cut) and re-bound when the mode changes.
pub(crate) async fn serve(engine: Engine, listener: TcpListener, tls: Option<TlsAcceptor>) {
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let mut listener = Some(listener);
    let mut faults = engine.watch_fault();
    // Owning the connection tasks here means aborting this task ends every connection.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let down = faults.borrow_and_update().mode == FaultMode::Down;
        if down {
            listener = None;
            connections.abort_all();
        } else if listener.is_none() {
            listener = rebind(addr).await;
        }
        match &listener {
            Some(l) => {
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((stream, _)) = accepted {
                            engine.note_connection();
                            connections.spawn(connection(engine.clone(), stream, tls.clone()));
                        }
                    }
                    changed = faults.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if faults.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    // The port was ours a moment ago; retry briefly in case the kernel still holds it.
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::error!(%addr, "could not re-bind the serving port");
    None
}

async fn connection(engine: Engine, stream: TcpStream, tls: Option<TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let engine = engine.clone();
        async move { handle(engine, req).await }
    });
    let http = http1::Builder::new();
    match tls {
        None => {
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        }
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => {
                let _ = http.serve_connection(TokioIo::new(stream), service).await;
            }
            Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
        },
    }
}

async fn handle(engine: Engine, req: Request<Incoming>) -> Result<Response<SimBody>, io::Error> {
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => return Ok(health(&engine)),
        (&Method::GET, "/metrics") => {
            return Ok(full(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics(&engine),
            ))
        }
        (&Method::GET, "/v1/models") => {
            let model = &engine.config().model;
            return Ok(json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llm-sim"}]}),
            ));
        }
        (&Method::POST, "/v1/chat/completions") => Endpoint::Chat,
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (&Method::POST, "/v1/responses") => Endpoint::Responses,
        (&Method::POST, "/v1/audio/transcriptions" | "/v1/audio/translations") => {
            return Ok(audio(engine, req).await)
        }
        (method, path) if path.starts_with("/v1/responses/") => {
            return Ok(stored(&engine, method, &path["/v1/responses/".len()..]))
        }
        (&Method::POST, "/v1/rerank" | "/rerank") => Endpoint::Rerank,
        (&Method::POST, "/v1/score" | "/score") => Endpoint::Score,
        (&Method::POST, "/tokenize") => Endpoint::Tokenize,
        (&Method::POST, "/detokenize") => Endpoint::Detokenize,
        _ => {
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                "no such route",
                "invalid_request_error",
                "not_found",
            ))
        }
    };
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or cut",
                "invalid_request_error",
                "body_too_large",
            ))
        }
    };
    engine.note_request(body.len());
    let fault = engine.fault();
    match fault.mode {
        FaultMode::Error => {
            let status =
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(error_response(
                status,
                "simulated engine failure",
                "server_error",
                "engine_error",
            ));
        }
        FaultMode::Hang => std::future::pending::<()>().await,
        FaultMode::Midstream if !wants_stream(&body) => {
            // A crash before any byte: the connection closes with no response.
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "simulated crash",
            ));
        }
        _ => {}
    }
    let request: InferenceRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("invalid request body: {e}"),
                "invalid_request_error",
                "invalid_json",
            ))
        }
    };
    if request.model != engine.config().model {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            &format!("model `{}` is not served here", request.model),
            "invalid_request_error",
            "model_not_found",
        ));
    }
    if request.stream && endpoint.generates() {
        Ok(stream(engine, endpoint, request, fault))
    } else {
        Ok(complete(engine, endpoint, request).await)
    }
}

/// Speech to text: a `multipart/form-data` body with `model` and `file`; one word for every
/// 4 KiB of audio (at least one), decoded at the engine's pace.
async fn audio(engine: Engine, req: Request<Incoming>) -> Response<SimBody> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or cut",
                "invalid_request_error",
                "body_too_large",
            )
        }
    };
    engine.note_request(body.len());
    let Some(form) = openai::AudioForm::parse(&content_type, &body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "expected multipart/form-data with `model` and `file`",
            "invalid_request_error",
            "invalid_form",
        );
    };
    if form.model != engine.config().model {
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("model `{}` is not served here", form.model),
            "invalid_request_error",
            "model_not_found",
        );
    }
    let words = (form.file_bytes as u64 / 4096).clamp(1, openai::MAX_COMPLETION_TOKENS);
    let mut running = engine.admit(1).await;
    for _ in 0..words {
        running.next_token().await;
    }
    running.finish();
    let text: String = (0..words).map(openai::word).collect();
    json_response(StatusCode::OK, &json!({"text": text.trim_end()}))
}

/// `GET` and `DELETE /v1/responses/{id}`: the responses this engine made and kept.
fn stored(engine: &Engine, method: &Method, id: &str) -> Response<SimBody> {
    engine.note_request(0);
    let missing = || {
        error_response(
            StatusCode::NOT_FOUND,
            &format!("Response with id '{id}' not found."),
            "invalid_request_error",
            "response_not_found",
        )
    };
    match *method {
        Method::GET => engine
            .stored_response(id)
            .map_or_else(missing, |v| json_response(StatusCode::OK, &v)),
        Method::DELETE if engine.delete_response(id) => json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "response", "deleted": true}),
        ),
        Method::DELETE => missing(),
        _ => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET or DELETE",
            "invalid_request_error",
            "method_not_allowed",
        ),
    }
}

fn wants_stream(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        stream: bool,
    }
    serde_json::from_slice::<Probe>(body).is_ok_and(|p| p.stream)
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("cmpl-sim-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn response_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("resp_sim{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn complete(engine: Engine, endpoint: Endpoint, req: InferenceRequest) -> Response<SimBody> {
    let prompt = req.prompt_tokens();
    let completion = if endpoint.generates() {
        req.completion_tokens()
    } else {
        0
    };
    let mut running = engine.admit_with_prefix(prompt, &req.prefix_blocks()).await;
    for _ in 0..completion {
        running.next_token().await;
    }
    running.finish();
    let model = &engine.config().model;
    let id = if endpoint == Endpoint::Responses {
        response_id()
    } else {
        request_id()
    };
    let body = openai::full_response(endpoint, &id, model, &req, prompt, completion);
    if endpoint == Endpoint::Responses && req.store != Some(false) {
        engine.store_response(&id, body.clone());
    }
    json_response(StatusCode::OK, &body)
}

/// Streams: the header goes out at once (as vLLM does), the first event after the TTFT.
fn stream(
    engine: Engine,
    endpoint: Endpoint,
    req: InferenceRequest,
    fault: Fault,
) -> Response<SimBody> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let prompt = req.prompt_tokens();
        let completion = req.completion_tokens();
        let blocks = req.prefix_blocks();
        let responses = endpoint == Endpoint::Responses;
        let id = if responses {
            response_id()
        } else {
            request_id()
        };
        let model = engine.config().model.clone();
        let die_after = (fault.mode == FaultMode::Midstream).then_some(fault.after_tokens);
        // A Responses stream opens (as vLLM's does) before the first token is computed;
        // a crash "after 0 tokens" comes after that preamble.
        if responses {
            for event in openai::responses_preamble(&id, &model) {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
        if die_after == Some(0) {
            if responses {
                // Let the preamble leave first (hyper drops unwritten output when a body
                // fails): the client side sees an opened response, then the cut.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let _ = tx.send(Err(simulated_crash())).await;
            return;
        }
        let mut running = tokio::select! {
            r = engine.admit_with_prefix(prompt, &blocks) => r,
            _ = tx.closed() => return,
        };
        for i in 0..completion {
            running.next_token().await;
            let event = if responses {
                openai::responses_delta(&id, i)
            } else {
                openai::token_event(endpoint, &id, &model, i, i + 1 == completion)
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
            if die_after == Some(i + 1) {
                // Let the last token leave before the crash: hyper drops unwritten
                // output when a body fails.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let _ = tx.send(Err(simulated_crash())).await;
                return;
            }
        }
        if responses {
            // No `[DONE]`: `response.completed` ends a Responses stream.
            if req.store != Some(false) {
                let text: String = (0..completion).map(openai::word).collect();
                let done = openai::response_object(
                    &id,
                    &model,
                    "completed",
                    &text,
                    Some((prompt, completion)),
                );
                engine.store_response(&id, done);
            }
            for event in openai::responses_close(&id, &model, prompt, completion) {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            running.finish();
            return;
        }
        if req.include_usage() {
            let _ = tx
                .send(Ok(openai::usage_event(&id, &model, prompt, completion)))
                .await;
        }
        if tx.send(Ok(openai::done_event())).await.is_ok() {
            running.finish();
        }
    });
    let mut resp = Response::new(SimBody::Channel(rx));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    resp
}

fn simulated_crash() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "simulated crash mid-stream",
    )
}

fn health(engine: &Engine) -> Response<SimBody> {
    let fault = engine.fault();
    if fault.mode == FaultMode::Error {
        let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return full(status, "text/plain", "engine failed");
    }
    full(StatusCode::OK, "text/plain", "")
}

/// The engine's `/metrics`, with vLLM's metric names (and its older KV-cache name).
pub fn metrics(engine: &Engine) -> String {
    let s = engine.stats();
    let m = &engine.config().model;
    let kv = engine.kv_usage();
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{m}\"}} {running}\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{m}\"}} {waiting}\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"{m}\"}} {kv}\n\
         # HELP vllm:gpu_cache_usage_perc GPU KV-cache usage (older name).\n\
         # TYPE vllm:gpu_cache_usage_perc gauge\n\
         vllm:gpu_cache_usage_perc{{model_name=\"{m}\"}} {kv}\n\
         # HELP vllm:num_preemptions_total Cumulative number of preemptions.\n\
         # TYPE vllm:num_preemptions_total counter\n\
         vllm:num_preemptions_total{{model_name=\"{m}\"}} {preempted}\n\
         # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE vllm:prompt_tokens_total counter\n\
         vllm:prompt_tokens_total{{model_name=\"{m}\"}} {prompt}\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{model_name=\"{m}\"}} {generated}\n\
         # HELP vllm:prefix_cache_queries_total Prompt tokens looked up in the prefix cache.\n\
         # TYPE vllm:prefix_cache_queries_total counter\n\
         vllm:prefix_cache_queries_total{{model_name=\"{m}\"}} {queries}\n\
         # HELP vllm:prefix_cache_hits_total Prompt tokens found in the prefix cache.\n\
         # TYPE vllm:prefix_cache_hits_total counter\n\
         vllm:prefix_cache_hits_total{{model_name=\"{m}\"}} {hits}\n",
        queries = s.prefix_cache_queries_total,
        hits = s.prefix_cache_hits_total,
        running = s.running,
        waiting = s.waiting,
        preempted = s.preemptions_total,
        prompt = s.prompt_tokens_total,
        generated = s.generation_tokens_total,
    )
}

// === control port ===

/// Serves `POST /fault`, `GET /fault` and `GET /stats` until the task is aborted.
pub(crate) async fn control(engine: Engine, listener: TcpListener) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let engine = engine.clone();
                async move { Ok::<_, Infallible>(control_request(engine, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn control_request(engine: Engine, req: Request<Incoming>) -> Response<SimBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/stats") => json_response(StatusCode::OK, &json!(engine.stats())),
        (&Method::GET, "/fault") => json_response(StatusCode::OK, &json!(engine.fault())),
        (&Method::POST, "/fault") => {
            let body = match Limited::new(req.into_body(), 64 << 10).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "fault body too large",
                        "invalid_request_error",
                        "body_too_large",
                    )
                }
            };
            let fault: Fault = match serde_json::from_slice(&body) {
                Ok(f) => f,
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        &format!("invalid fault: {e}"),
                        "invalid_request_error",
                        "invalid_fault",
                    )
                }
            };
            if let Err(reason) = fault.validate() {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &reason,
                    "invalid_request_error",
                    "invalid_fault",
                );
            }
            engine.set_fault(fault.clone());
            json_response(StatusCode::OK, &json!(fault))
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "no such route",
            "invalid_request_error",
            "not_found",
        ),
    }
}
