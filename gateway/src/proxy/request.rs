//! What the gateway reads from a request: which endpoint, and from the body only what
//! routing needs (model, stream, completion limit, prompt size). The body itself is
//! forwarded untouched.

use serde::Deserialize;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use super::error::GatewayError;
use crate::routing::estimate::RequestSize;

/// The OpenAI endpoints the gateway routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses`: OpenAI's Responses API (vLLM and SGLang serve it).
    Responses,
    /// `POST /v1/rerank` or `/rerank` (vLLM, Jina and Cohere style): one query, documents.
    Rerank,
    /// `POST /v1/score` or `/score` (vLLM): similarity of text pairs.
    Score,
    /// `POST /tokenize` (vLLM): a prompt's token ids.
    Tokenize,
    /// `POST /detokenize` (vLLM): token ids back to text.
    Detokenize,
    /// `POST /v1/audio/transcriptions`: speech to text; a `multipart/form-data` body.
    AudioTranscriptions,
    /// `POST /v1/audio/translations`: speech to English text; `multipart/form-data`.
    AudioTranslations,
}

impl Endpoint {
    /// `POST` and the path: the name of the request's span.
    pub fn span_name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "POST /v1/chat/completions",
            Endpoint::Completions => "POST /v1/completions",
            Endpoint::Embeddings => "POST /v1/embeddings",
            Endpoint::Responses => "POST /v1/responses",
            Endpoint::Rerank => "POST /v1/rerank",
            Endpoint::Score => "POST /v1/score",
            Endpoint::Tokenize => "POST /tokenize",
            Endpoint::Detokenize => "POST /detokenize",
            Endpoint::AudioTranscriptions => "POST /v1/audio/transcriptions",
            Endpoint::AudioTranslations => "POST /v1/audio/translations",
        }
    }

    /// Every endpoint, in the order the policy reference lists them.
    pub const ALL: [Endpoint; 10] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Rerank,
        Endpoint::Score,
        Endpoint::Tokenize,
        Endpoint::Detokenize,
        Endpoint::AudioTranscriptions,
        Endpoint::AudioTranslations,
    ];

    /// Its name in a pool's `endpoints` list.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Rerank => "rerank",
            Endpoint::Score => "score",
            Endpoint::Tokenize => "tokenize",
            Endpoint::Detokenize => "detokenize",
            Endpoint::AudioTranscriptions => "audio_transcriptions",
            Endpoint::AudioTranslations => "audio_translations",
        }
    }

    /// The endpoint a pool's `endpoints` list names so.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// A set of endpoints: what a pool (and so a model's route) serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSet(u16);

impl EndpointSet {
    /// Every endpoint (a pool that lists none).
    pub const ALL: EndpointSet = EndpointSet((1 << Endpoint::ALL.len()) - 1);

    /// Whether `e` is in the set.
    pub fn contains(self, e: Endpoint) -> bool {
        self.0 & (1 << e as u16) != 0
    }

    /// The endpoints in the set, in [`Endpoint::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = Endpoint> {
        Endpoint::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

impl FromIterator<Endpoint> for EndpointSet {
    fn from_iter<I: IntoIterator<Item = Endpoint>>(iter: I) -> Self {
        EndpointSet(iter.into_iter().fold(0, |m, e| m | (1 << e as u16)))
    }
}

impl Endpoint {
    /// Whether its body is a `multipart/form-data` form (audio), not JSON.
    pub fn is_form(self) -> bool {
        matches!(
            self,
            Endpoint::AudioTranscriptions | Endpoint::AudioTranslations
        )
    }

    /// How its streams are framed.
    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Responses => Dialect::Responses,
            _ => Dialect::Chat,
        }
    }
}

/// The two ways OpenAI-style streams are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Chat and legacy completions: `data:` chunks, then `data: [DONE]`.
    Chat,
    /// Responses: named events (`event: response.output_text.delta` and its `data:` whose
    /// `type` says the same), opened by lifecycle events and closed by `response.completed`.
    Responses,
}

/// What a request asks of the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Forward to a shard.
    Inference(Endpoint),
    /// `GET /v1/models`, answered from the policy.
    Models,
    /// `GET /v1/models/{model}`, answered from the policy (the id percent-decoded; it may
    /// hold `/`, as in `meta-llama/Llama-3.1-8B-Instruct`).
    Model(String),
    /// `GET` or `DELETE /v1/responses/{id}` (and `…/input_items`, `POST …/cancel`): a
    /// response an engine stored, on the shard that made it (see [`super::stored`]).
    StoredResponse(String),
    /// `GET /healthz`: the process is up.
    Healthz,
    /// `GET /readyz`: some shard can take traffic.
    Readyz,
}

const MODEL_PREFIX: &str = "/v1/models/";

/// What the gateway serves, as a 404 for any other path lists it.
pub const SERVED: &str = "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, \
POST /v1/responses, POST /v1/rerank (or /rerank), POST /v1/score (or /score), POST /tokenize, POST /detokenize, \
POST /v1/audio/transcriptions, POST /v1/audio/translations, GET /v1/models, GET /v1/models/{model}, GET /v1/responses/{id}, DELETE /v1/responses/{id}, \
GET /healthz, GET /readyz";

const RESPONSES_PREFIX: &str = "/v1/responses/";

/// Maps method and path to a route, or the error to answer.
pub fn classify(method: &str, path: &str) -> Result<Route, GatewayError> {
    let (want, route) = match path {
        "/v1/chat/completions" => ("POST", Route::Inference(Endpoint::ChatCompletions)),
        "/v1/completions" => ("POST", Route::Inference(Endpoint::Completions)),
        "/v1/embeddings" => ("POST", Route::Inference(Endpoint::Embeddings)),
        "/v1/responses" => ("POST", Route::Inference(Endpoint::Responses)),
        "/v1/rerank" | "/rerank" => ("POST", Route::Inference(Endpoint::Rerank)),
        "/v1/score" | "/score" => ("POST", Route::Inference(Endpoint::Score)),
        "/tokenize" => ("POST", Route::Inference(Endpoint::Tokenize)),
        "/detokenize" => ("POST", Route::Inference(Endpoint::Detokenize)),
        "/v1/audio/transcriptions" => ("POST", Route::Inference(Endpoint::AudioTranscriptions)),
        "/v1/audio/translations" => ("POST", Route::Inference(Endpoint::AudioTranslations)),
        "/v1/models" => ("GET", Route::Models),
        "/healthz" => ("GET", Route::Healthz),
        "/readyz" => ("GET", Route::Readyz),
        _ if path.len() > RESPONSES_PREFIX.len() && path.starts_with(RESPONSES_PREFIX) => {
            let rest = &path[RESPONSES_PREFIX.len()..];
            let (id, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let want = match sub {
                "" if method == "DELETE" => "DELETE",
                "" | "input_items" => "GET",
                "cancel" => "POST",
                _ => {
                    return Err(GatewayError::NotFound {
                        method: method.into(),
                        path: path.into(),
                    })
                }
            };
            if id.is_empty() || id.len() > 256 {
                return Err(GatewayError::BadRequest(
                    "the response id is 1-256 characters".into(),
                ));
            }
            (want, Route::StoredResponse(id.to_string()))
        }
        _ if path.len() > MODEL_PREFIX.len() && path.starts_with(MODEL_PREFIX) => {
            let id = percent_encoding::percent_decode_str(&path[MODEL_PREFIX.len()..])
                .decode_utf8()
                .map_err(|_| GatewayError::BadRequest("the model id is not UTF-8".into()))?;
            ("GET", Route::Model(id.into_owned()))
        }
        _ => {
            return Err(GatewayError::NotFound {
                method: method.into(),
                path: path.into(),
            })
        }
    };
    if method == want || (want == "GET" && method == "HEAD") {
        Ok(route)
    } else {
        Err(GatewayError::MethodNotAllowed {
            method: method.into(),
            path: path.into(),
        })
    }
}

/// `x-breakwater-timeout-ms`: the time the client gives the whole request, in
/// milliseconds from when the gateway reads its header. It bounds queueing and every
/// attempt; work still waiting when it passes is dropped, never started.
pub const TIMEOUT_HEADER: &str = "x-breakwater-timeout-ms";

/// The deadline a client sent, if it sent a sane one (1 ms to a day).
pub fn client_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    let ms: u64 = headers
        .get(TIMEOUT_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (1..=86_400_000)
        .contains(&ms)
        .then(|| std::time::Duration::from_millis(ms))
}

/// The parts of an inference body routing reads.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    /// The requested model.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Size for the token estimate.
    pub size: RequestSize,
    /// Whether the answer's usage teaches the estimator this model's bytes per token (not
    /// for an engine endpoint's body, whose documents and pairs are tokenized their own way).
    pub calibrates: bool,
    /// How a stream of it is framed.
    pub dialect: Dialect,
    /// An explicit session key: the body's `prompt_cache_key`, else its `user`.
    pub session: Option<String>,
    /// Where the prompt's JSON lies in the body (`instructions` then `input` for Responses,
    /// else `messages`, `prompt` or `input`): what prefix affinity hashes.
    pub prompt_spans: SmallVec<[std::ops::Range<usize>; 2]>,
}

#[derive(Deserialize)]
struct Body<'a> {
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
    max_output_tokens: Option<serde_json::Value>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    prompt_cache_key: Option<serde_json::Value>,
    user: Option<serde_json::Value>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

/// Audio bytes assumed per generated token: about 10 KiB of 16 kHz WAV per second of
/// speech and three tokens a second, rounded down for compressed formats. A rough cost for
/// admission; an audio answer does not calibrate the estimator.
const AUDIO_BYTES_PER_TOKEN: usize = 4096;

/// Parses an inference body (`content_type`: the request's, which an audio form needs for
/// its boundary). Errors are 400s that say what is wrong.
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<InferenceRequest, GatewayError> {
    let bad = |m: String| GatewayError::BadRequest(m);
    if endpoint.is_form() {
        return audio(body, content_type.unwrap_or_default());
    }
    let b: Body<'_> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the request body is not a JSON object: {e}")))?;
    let model = match b.model {
        Some(serde_json::Value::String(m)) if !m.is_empty() => m,
        Some(serde_json::Value::String(_)) | None => {
            return Err(bad("the `model` field is required".into()))
        }
        Some(_) => return Err(bad("`model` must be a string".into())),
    };
    let stream = match b.stream {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(s)) => s,
        Some(_) => return Err(bad("`stream` must be a boolean".into())),
    };
    let limit = |name: &str, v: Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("`{name}` must be a non-negative integer"))),
        Some(_) => Err(bad(format!("`{name}` must be an integer"))),
    };
    let max_completion = limit("max_completion_tokens", b.max_completion_tokens)?;
    let max_tokens = limit("max_tokens", b.max_tokens)?;
    let max_output = limit("max_output_tokens", b.max_output_tokens)?;
    let (text, required) = match endpoint {
        Endpoint::ChatCompletions => (b.messages, "messages"),
        Endpoint::Completions => (b.prompt, "prompt"),
        Endpoint::Embeddings | Endpoint::Responses => (b.input, "input"),
        Endpoint::Rerank | Endpoint::Score | Endpoint::Tokenize | Endpoint::Detokenize => {
            return Ok(engine_extra(model, body))
        }
        // Read as a form above.
        Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => {
            return Err(bad("an audio request is a multipart form".into()))
        }
    };
    let Some(text) = text else {
        return Err(bad(format!("the `{required}` field is required")));
    };
    // A Responses request's `instructions` are its system prompt: input too.
    let instructions = match endpoint {
        Endpoint::Responses => b.instructions.map_or(0, |i| text_bytes(i.get())),
        _ => 0,
    };
    let prompt_bytes = text_bytes(text.get()) + instructions;
    let span = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
        start..start + raw.get().len()
    };
    let mut prompt_spans = SmallVec::new();
    if endpoint == Endpoint::Responses {
        prompt_spans.extend(b.instructions.map(span));
    }
    prompt_spans.push(span(text));
    let session = [b.prompt_cache_key, b.user]
        .into_iter()
        .find_map(|v| match v {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
            _ => None,
        });
    let max_completion_tokens = match endpoint {
        Endpoint::Responses => max_output,
        _ => max_completion.or(max_tokens),
    };
    Ok(InferenceRequest {
        model,
        stream: stream && endpoint != Endpoint::Embeddings,
        size: RequestSize {
            prompt_bytes,
            max_completion_tokens,
            generates: endpoint != Endpoint::Embeddings,
        },
        calibrates: true,
        dialect: endpoint.dialect(),
        session,
        prompt_spans,
    })
}

/// A request to one of the engine's own endpoints (rerank, score, tokenize, detokenize):
/// routed by `model` like the rest, its body the engine's business. All of the body's
/// string content is input (a query and documents, text pairs, a prompt); nothing is
/// generated or streamed.
fn engine_extra(model: String, body: &[u8]) -> InferenceRequest {
    InferenceRequest {
        model,
        stream: false,
        size: RequestSize {
            prompt_bytes: std::str::from_utf8(body).map_or(body.len(), text_bytes),
            max_completion_tokens: Some(0),
            generates: false,
        },
        calibrates: false,
        dialect: Dialect::Chat,
        session: None,
        prompt_spans: SmallVec::new(),
    }
}

/// An audio request: a `multipart/form-data` body whose `model` field routes it; its cost
/// is the text the file's length suggests.
fn audio(body: &[u8], content_type: &str) -> Result<InferenceRequest, GatewayError> {
    let bad = |e: super::multipart::FormError| GatewayError::BadRequest(e.to_string());
    let boundary = super::multipart::boundary(content_type).map_err(bad)?;
    let form = super::multipart::read(body, boundary).map_err(bad)?;
    let model = match form.model {
        Some(m) if !m.trim().is_empty() => m.trim().to_string(),
        _ => {
            return Err(GatewayError::BadRequest(
                "the `model` form field is required".into(),
            ))
        }
    };
    let stream = match form.stream.as_deref().map(str::trim) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(GatewayError::BadRequest(
                "`stream` must be true or false".into(),
            ))
        }
    };
    Ok(InferenceRequest {
        model,
        stream,
        size: RequestSize {
            prompt_bytes: 0,
            max_completion_tokens: Some((form.file_bytes / AUDIO_BYTES_PER_TOKEN).max(1) as u64),
            generates: true,
        },
        calibrates: false,
        dialect: Dialect::Chat,
        session: None,
        prompt_spans: SmallVec::new(),
    })
}

/// Bytes of string content in a JSON value (keys and punctuation excluded). Walks the raw
/// text once instead of building a tree: a 1 MiB prompt costs one linear scan.
fn text_bytes(json: &str) -> usize {
    let bytes = json.as_bytes();
    let mut total = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'"' {
            let start = i + 1;
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            let is_key = bytes[i.min(bytes.len())..]
                .iter()
                .skip(1)
                .find(|b| !b.is_ascii_whitespace())
                == Some(&b':');
            if !is_key {
                total += i.min(bytes.len()) - start;
            }
        }
        i += 1;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(
            classify("POST", "/v1/chat/completions").unwrap(),
            Route::Inference(Endpoint::ChatCompletions)
        );
        assert_eq!(classify("GET", "/v1/models").unwrap(), Route::Models);
        assert_eq!(
            classify("GET", "/v1/chat/completions")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(classify("POST", "/v2/anything").unwrap_err().status(), 404);
        assert_eq!(
            classify("GET", "/v1/models/meta-llama/Llama-3.1-8B-Instruct").unwrap(),
            Route::Model("meta-llama/Llama-3.1-8B-Instruct".into())
        );
        assert_eq!(
            classify("HEAD", "/v1/models/org%2Fmodel%20x").unwrap(),
            Route::Model("org/model x".into())
        );
        assert_eq!(classify("GET", "/v1/models/%FF").unwrap_err().status(), 400);
        assert_eq!(
            classify("DELETE", "/v1/models/m").unwrap_err().status(),
            405
        );
        // Everything the 404 message lists is served.
        for entry in SERVED.split(", ") {
            let (method, rest) = entry.split_once(' ').unwrap();
            for path in rest.split(" (or ").map(|p| p.trim_end_matches(')')) {
                let path = path.replace("{model}", "m").replace("{id}", "resp_1");
                assert!(classify(method, &path).is_ok(), "{method} {path}");
            }
        }
        let unknown = classify("POST", "/v1/assistants").unwrap_err().to_string();
        assert!(unknown.contains("POST /v1/chat/completions"), "{unknown}");
        assert!(unknown.contains("GET /v1/models/{model}"), "{unknown}");
    }

    #[test]
    fn reads_what_routing_needs() {
        let r = parse(Endpoint::ChatCompletions, br#"{"model":"m","stream":true,"max_tokens":9,"messages":[{"role":"user","content":"hello"}]}"#, None)
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream);
        assert_eq!(r.size.max_completion_tokens, Some(9));
        assert_eq!(r.size.prompt_bytes, "user".len() + "hello".len());
        assert_eq!(r.session, None);
        let body = br#"{"model":"m","user":"u-1","prompt_cache_key":"conv-9","messages":[{"role":"user","content":"hello"}]}"#;
        let r = parse(Endpoint::ChatCompletions, body, None).unwrap();
        assert_eq!(
            r.session.as_deref(),
            Some("conv-9"),
            "prompt_cache_key before user"
        );
        assert_eq!(
            &body[r.prompt_spans[0].clone()],
            br#"[{"role":"user","content":"hello"}]"#
        );
        let r = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"abc","max_tokens":4,"max_completion_tokens":2}"#,
            None,
        )
        .unwrap();
        assert_eq!(r.size.max_completion_tokens, Some(2));
        let r = parse(
            Endpoint::Embeddings,
            br#"{"model":"m","input":["ab","cd"],"stream":true}"#,
            None,
        )
        .unwrap();
        assert!(!r.stream && !r.size.generates);
        assert_eq!(r.size.prompt_bytes, 4);
        // Responses: `input` (a string or items) and `instructions` are the prompt,
        // `max_output_tokens` the limit (the chat names are not Responses fields).
        let r = parse(Endpoint::Responses, br#"{"model":"m","stream":true,"instructions":"be brief","input":"hi","max_output_tokens":12,"max_tokens":99}"#, None)
        .unwrap();
        assert!(r.stream && r.size.generates);
        assert_eq!(r.dialect, Dialect::Responses);
        assert_eq!(r.size.prompt_bytes, "be brief".len() + "hi".len());
        assert_eq!(r.size.max_completion_tokens, Some(12));
        let r = parse(Endpoint::Responses, br#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"abc"}]}]}"#, None)
        .unwrap();
        assert_eq!(
            r.size.prompt_bytes,
            "user".len() + "input_text".len() + "abc".len()
        );
        assert_eq!(r.size.max_completion_tokens, None);
        let e = parse(Endpoint::Responses, br#"{"model":"m"}"#, None).unwrap_err();
        assert!(e.to_string().contains("`input` field is required"), "{e}");
        let e = parse(
            Endpoint::Responses,
            br#"{"model":"m","input":"x","max_output_tokens":"9"}"#,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_output_tokens"), "{e}");
    }

    #[test]
    fn bad_bodies_are_clear_400s() {
        for (body, needle) in [
            (&b"not json"[..], "not a JSON object"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"messages":[]}"#, "`model` field is required"),
            (
                br#"{"model":"","messages":[]}"#,
                "`model` field is required",
            ),
            (br#"{"model":7,"messages":[]}"#, "`model` must be a string"),
            (br#"{"model":"m"}"#, "`messages` field is required"),
            (
                br#"{"model":"m","messages":[],"stream":"yes"}"#,
                "`stream` must be a boolean",
            ),
            (
                br#"{"model":"m","messages":[],"max_tokens":-1}"#,
                "non-negative integer",
            ),
        ] {
            let e = parse(Endpoint::ChatCompletions, body, None).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(needle), "{e} / {needle}");
        }
    }

    #[test]
    fn text_bytes_skips_keys_and_handles_escapes() {
        assert_eq!(text_bytes(r#"[{"role":"user","content":"a\"b"}]"#), 4 + 4);
        assert_eq!(text_bytes(r#""plain""#), 5);
        assert_eq!(text_bytes(r#"[1, 2]"#), 0);
    }
}
