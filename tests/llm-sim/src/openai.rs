//! The OpenAI-compatible request and response shapes the simulator speaks.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

/// The endpoints the engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses` (OpenAI's Responses API, as vLLM serves it).
    Responses,
    /// `POST /v1/rerank`, `/rerank` (vLLM's shape: a query and documents).
    Rerank,
    /// `POST /v1/score`, `/score` (vLLM's shape: `text_1` against `text_2`).
    Score,
    /// `POST /tokenize` (vLLM).
    Tokenize,
    /// `POST /detokenize` (vLLM).
    Detokenize,
}

impl Endpoint {
    /// Whether it generates tokens (and so may stream).
    pub fn generates(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses
        )
    }
}

/// What the engine needs from a request body.
#[derive(Debug, Deserialize)]
pub struct InferenceRequest {
    /// The model asked for.
    pub model: String,
    /// Whether to stream Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// Completion length limit (legacy name).
    pub max_tokens: Option<u64>,
    /// Completion length limit (current name, takes precedence).
    pub max_completion_tokens: Option<u64>,
    /// Completion length limit of a Responses request.
    pub max_output_tokens: Option<u64>,
    /// A Responses request's system prompt.
    pub instructions: Option<Value>,
    /// Whether a Responses answer is kept for `GET /v1/responses/{id}` (default true).
    pub store: Option<bool>,
    /// `include_usage` asks for a final usage chunk.
    pub stream_options: Option<StreamOptions>,
    /// Chat messages.
    pub messages: Option<Value>,
    /// Completion prompt.
    pub prompt: Option<Value>,
    /// Embedding input.
    pub input: Option<Value>,
    /// Rerank query.
    pub query: Option<Value>,
    /// Rerank documents.
    pub documents: Option<Value>,
    /// Score: the first text(s).
    pub text_1: Option<Value>,
    /// Score: the second text(s).
    pub text_2: Option<Value>,
    /// Detokenize: token ids.
    pub tokens: Option<Vec<u64>>,
}

/// `stream_options` of a streamed request.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a final chunk with the `usage` block.
    #[serde(default)]
    pub include_usage: bool,
}

/// Completion length when the request sets none.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 32;
/// Upper bound on a simulated completion.
pub const MAX_COMPLETION_TOKENS: u64 = 8192;

impl InferenceRequest {
    /// The prompt's size in this engine's "tokenizer": about 3.6 bytes of text per token,
    /// plus 4 tokens of framing per chat message — deliberately not the gateway's estimate,
    /// so the gateway's calibration has something to learn.
    pub fn prompt_tokens(&self) -> u64 {
        let mut bytes = 0usize;
        let mut messages = 0u64;
        for v in [
            &self.messages,
            &self.prompt,
            &self.input,
            &self.query,
            &self.documents,
            &self.text_1,
            &self.text_2,
            &self.instructions,
        ]
        .into_iter()
        .flatten()
        {
            text_bytes(v, &mut bytes);
            if let Value::Array(items) = v {
                messages += items.len() as u64;
            }
        }
        let framing = if self.messages.is_some() {
            messages * 4
        } else {
            0
        };
        ((bytes as f64 / 3.6).ceil() as u64 + framing).max(1)
    }

    /// The hashes of the prompt's blocks of [`crate::engine::PREFIX_BLOCK_BYTES`], each
    /// chained to those before it: the text is the prompt's JSON (instructions first, then
    /// messages, prompt or input), so a longer conversation's first blocks are the shorter
    /// one's. A partial last block is left out.
    pub fn prefix_blocks(&self) -> Vec<u64> {
        use std::hash::{Hash, Hasher};
        let mut text = String::new();
        for v in [
            &self.instructions,
            &self.messages,
            &self.prompt,
            &self.input,
        ]
        .into_iter()
        .flatten()
        {
            text.push_str(&v.to_string());
        }
        let mut prev = 0u64;
        text.as_bytes()
            .chunks_exact(crate::engine::PREFIX_BLOCK_BYTES)
            .map(|block| {
                let mut h = std::hash::DefaultHasher::new();
                prev.hash(&mut h);
                block.hash(&mut h);
                prev = h.finish();
                prev
            })
            .collect()
    }

    /// Tokens to generate.
    pub fn completion_tokens(&self) -> u64 {
        self.max_output_tokens
            .or(self.max_completion_tokens)
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_COMPLETION_TOKENS)
            .min(MAX_COMPLETION_TOKENS)
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

fn text_bytes(v: &Value, total: &mut usize) {
    match v {
        Value::String(s) => *total += s.len(),
        Value::Array(items) => items.iter().for_each(|i| text_bytes(i, total)),
        Value::Object(map) => map.values().for_each(|i| text_bytes(i, total)),
        _ => {}
    }
}

/// The parts of an audio request's form the engine reads.
#[derive(Debug, PartialEq, Eq)]
pub struct AudioForm {
    /// The `model` field.
    pub model: String,
    /// Bytes of the `file` part.
    pub file_bytes: usize,
}

impl AudioForm {
    /// Reads `model` and the file's size from a `multipart/form-data` body; `None` when
    /// either is missing or the body is not such a form.
    pub fn parse(content_type: &str, body: &[u8]) -> Option<AudioForm> {
        let boundary = content_type
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()?
            .trim_matches('"');
        let delimiter = format!("\r\n--{boundary}");
        let mut model = None;
        let mut file_bytes = None;
        // Each part: its headers, a blank line, its content up to the next delimiter.
        let text = body;
        let mut at = find(text, format!("--{boundary}").as_bytes())?;
        loop {
            let part = &text[at..];
            let head_end = find(part, b"\r\n\r\n")?;
            let head = String::from_utf8_lossy(&part[..head_end]).to_ascii_lowercase();
            let content = &part[head_end + 4..];
            let len = find(content, delimiter.as_bytes())?;
            if head.contains("name=\"model\"") {
                model = Some(String::from_utf8_lossy(&content[..len]).trim().to_string());
            } else if head.contains("filename=") {
                file_bytes = Some(len);
            }
            let next = at + head_end + 4 + len + delimiter.len();
            if text[next..].starts_with(b"--") {
                break;
            }
            at = next;
        }
        Some(AudioForm {
            model: model?,
            file_bytes: file_bytes?,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The word generated at position `i`.
pub fn word(i: u64) -> &'static str {
    const WORDS: [&str; 8] = [
        "breakwater ",
        "keeps ",
        "the ",
        "fleet ",
        "serving ",
        "through ",
        "every ",
        "surge ",
    ];
    WORDS[(i % WORDS.len() as u64) as usize]
}

/// The `usage` block.
pub fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A complete (non-streamed) answer.
pub fn full_response(
    endpoint: Endpoint,
    id: &str,
    model: &str,
    req: &InferenceRequest,
    prompt: u64,
    completion: u64,
) -> Value {
    let created = created();
    match endpoint {
        Endpoint::Chat => {
            let text: String = (0..completion).map(word).collect();
            json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "length"}],
                "usage": usage(prompt, completion)})
        }
        Endpoint::Completions => {
            let text: String = (0..completion).map(word).collect();
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": null}],
                "usage": usage(prompt, completion)})
        }
        Endpoint::Responses => response_object(
            id,
            model,
            "completed",
            &(0..completion).map(word).collect::<String>(),
            Some((prompt, completion)),
        ),
        Endpoint::Embeddings => {
            let inputs = match &req.input {
                Some(Value::Array(items)) => items.len().max(1),
                _ => 1,
            };
            let data: Vec<Value> = (0..inputs)
                .map(|i| {
                    let v: Vec<f64> = (0..8).map(|d| ((i * 8 + d) as f64).sin()).collect();
                    json!({"object": "embedding", "index": i, "embedding": v})
                })
                .collect();
            json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
        }
        Endpoint::Rerank => {
            let documents = match &req.documents {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            let mut results: Vec<Value> = documents
                .into_iter()
                .enumerate()
                .map(|(i, d)| {
                    let text = d.as_str().map_or(d.clone(), |t| json!(t));
                    json!({"index": i, "relevance_score": 1.0 / (i as f64 + 1.0),
                           "document": {"text": text}})
                })
                .collect();
            results.truncate(MAX_COMPLETION_TOKENS as usize);
            json!({"id": id, "model": model, "results": results,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
        }
        Endpoint::Score => json!({"id": id, "object": "list", "created": created, "model": model,
            "data": [{"index": 0, "object": "score", "score": 0.5}],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
        Endpoint::Tokenize => {
            let tokens: Vec<u64> = (0..prompt).collect();
            json!({"count": prompt, "max_model_len": 65536, "tokens": tokens})
        }
        Endpoint::Detokenize => {
            let n = req.tokens.as_ref().map_or(0, Vec::len) as u64;
            json!({"prompt": (0..n).map(word).collect::<String>()})
        }
    }
}

/// One SSE event carrying token `i` (the first also carries the assistant role).
pub fn token_event(endpoint: Endpoint, id: &str, model: &str, i: u64, last: bool) -> Bytes {
    let finish = if last { json!("length") } else { Value::Null };
    let chunk = match endpoint {
        Endpoint::Completions => json!({"id": id, "object": "text_completion",
            "created": created(), "model": model,
            "choices": [{"index": 0, "text": word(i), "finish_reason": finish}]}),
        _ => {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": word(i)})
            } else {
                json!({"content": word(i)})
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": created(),
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        }
    };
    sse(&chunk)
}

/// A Responses `response` object with one message of `text`; `usage` once completed.
pub fn response_object(
    id: &str,
    model: &str,
    status: &str,
    text: &str,
    usage: Option<(u64, u64)>,
) -> Value {
    let output = if status == "completed" {
        json!([message_item(id, "completed", text)])
    } else {
        json!([])
    };
    json!({"id": id, "object": "response", "created_at": created(), "status": status,
        "model": model, "output": output, "parallel_tool_calls": true, "tool_choice": "auto",
        "tools": [], "text": {"format": {"type": "text"}},
        "usage": usage.map(|(p, c)| json!({
            "input_tokens": p, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c})),
    })
}

fn message_item(id: &str, status: &str, text: &str) -> Value {
    let content = if status == "completed" {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    } else {
        json!([])
    };
    json!({"type": "message", "id": format!("msg_{id}"), "status": status, "role": "assistant",
        "content": content})
}

/// A named Responses event (`event:` line and `data:` with the same `type`).
fn named(kind: &str, mut data: Value, sequence: u64) -> Bytes {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(sequence);
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The events a Responses stream opens with, before any output (sequence 0 to 3).
pub fn responses_preamble(id: &str, model: &str) -> Vec<Bytes> {
    let opening = response_object(id, model, "in_progress", "", None);
    vec![
        named("response.created", json!({"response": opening}), 0),
        named("response.in_progress", json!({"response": opening}), 1),
        named(
            "response.output_item.added",
            json!({"output_index": 0, "item": message_item(id, "in_progress", "")}),
            2,
        ),
        named(
            "response.content_part.added",
            json!({"item_id": format!("msg_{id}"), "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
            3,
        ),
    ]
}

/// Token `i` of a Responses stream.
pub fn responses_delta(id: &str, i: u64) -> Bytes {
    named(
        "response.output_text.delta",
        json!({"item_id": format!("msg_{id}"), "output_index": 0, "content_index": 0,
               "delta": word(i)}),
        4 + i,
    )
}

/// The events that close a Responses stream of `completion` tokens, `response.completed`
/// (with the usage) last.
pub fn responses_close(id: &str, model: &str, prompt: u64, completion: u64) -> Vec<Bytes> {
    let text: String = (0..completion).map(word).collect();
    let seq = 4 + completion;
    let item = format!("msg_{id}");
    vec![
        named(
            "response.output_text.done",
            json!({"item_id": item, "output_index": 0, "content_index": 0, "text": text}),
            seq,
        ),
        named(
            "response.content_part.done",
            json!({"item_id": item, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": text, "annotations": []}}),
            seq + 1,
        ),
        named(
            "response.output_item.done",
            json!({"output_index": 0, "item": message_item(id, "completed", &text)}),
            seq + 2,
        ),
        named(
            "response.completed",
            json!({"response": response_object(id, model, "completed", &text,
                                               Some((prompt, completion)))}),
            seq + 3,
        ),
    ]
}

/// The final usage chunk of a streamed answer (`stream_options.include_usage`).
pub fn usage_event(id: &str, model: &str, prompt: u64, completion: u64) -> Bytes {
    sse(
        &json!({"id": id, "object": "chat.completion.chunk", "created": created(),
        "model": model, "choices": [], "usage": usage(prompt, completion)}),
    )
}

/// The stream terminator.
pub fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// An error body in the OpenAI format.
pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    Bytes::from(
        json!({"error": {"message": message, "type": kind, "code": code, "param": null}})
            .to_string(),
    )
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_prompt_and_completion() {
        let r: InferenceRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hello world, how are you"}],"max_tokens":7}"#,
        )
        .unwrap();
        // "user" (4) + content (24) = 28 bytes -> 8 tokens, + 4 framing.
        assert_eq!(r.prompt_tokens(), 12);
        assert_eq!(r.completion_tokens(), 7);
        let r: InferenceRequest = serde_json::from_str(
            r#"{"model":"m","prompt":"x","max_completion_tokens":3,"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(r.completion_tokens(), 3);
        assert_eq!(r.prompt_tokens(), 1);
    }
}
