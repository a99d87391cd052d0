//! What the gateway tells a client when it cannot serve a request, in the OpenAI error
//! format: `{"error":{"message","type","code","param"}}`.

use std::fmt;

use serde_json::json;

/// One failed attempt on one shard, kept for the aggregate error.
#[derive(Debug, Clone)]
pub struct AttemptFailure {
    /// The shard tried.
    pub shard: String,
    /// Its region.
    pub region: String,
    /// What went wrong.
    pub cause: UpstreamFailure,
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.shard, self.region, self.cause)
    }
}

/// Why an attempt on a shard failed before anything reached the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamFailure {
    /// Could not connect or send (refused, reset, DNS, connect timeout).
    #[error("connection failed: {0}")]
    Connect(String),
    /// The TLS handshake with an `https://` shard failed (an untrusted or misnamed
    /// certificate, a client certificate refused, no handshake in time).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No response header (or, for a stream, no first event) within the first-byte timeout.
    #[error("no first byte within {0} ms")]
    FirstByteTimeout(u128),
    /// The shard went silent between two chunks for longer than the idle timeout.
    #[error("idle for more than {0} ms")]
    IdleTimeout(u128),
    /// The connection broke while reading the response.
    #[error("response cut: {0}")]
    Cut(String),
    /// The shard answered with a server error or overload status.
    #[error("status {0}")]
    Status(u16),
    /// The non-streamed response was larger than the policy allows.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The request's total deadline passed.
    #[error("deadline exceeded")]
    Deadline,
}

/// Whether a request may go on to another shard after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Yes, without spending the retry budget: the shard did no work (a refused
    /// connection).
    Free,
    /// Yes, if the retry budget allows.
    Budgeted,
    /// No: answer the client now.
    Never,
}

/// What the request that failed was like, for [`UpstreamFailure::retry`].
#[derive(Debug, Clone, Copy)]
pub struct RetryContext {
    /// Its estimated prompt tokens.
    pub prompt_tokens: u64,
    /// First-byte timeouts it has met so far, this one included.
    pub first_byte_timeouts: u32,
    /// Prompts above this many tokens are not retried after a first-byte timeout.
    pub max_retry_prompt_tokens: u64,
}

impl UpstreamFailure {
    /// Whether the failure was a timeout of some kind.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::FirstByteTimeout(_) | Self::IdleTimeout(_) | Self::Deadline
        )
    }

    /// Whether another shard may be tried. A first-byte timeout is retried at most once,
    /// and not at all for a prompt above the policy's size: a heavy prompt that one shard
    /// could not prefill in time would only cost the next one the same (and amplify an
    /// overload). The request's own deadline is never retried.
    pub fn retry(&self, cx: RetryContext) -> Retry {
        match self {
            Self::Connect(_) | Self::Tls(_) => Retry::Free,
            Self::Deadline => Retry::Never,
            Self::FirstByteTimeout(_)
                if cx.first_byte_timeouts > 1 || cx.prompt_tokens > cx.max_retry_prompt_tokens =>
            {
                Retry::Never
            }
            _ => Retry::Budgeted,
        }
    }

    /// What the failure says about the shard's health. Overload (429) and the request's
    /// own deadline say nothing about it.
    pub fn health_signal(&self) -> Option<breakwater_health::Signal> {
        let local = match self {
            Self::Status(429) | Self::Deadline => return None,
            Self::Connect(_) | Self::Tls(_) | Self::FirstByteTimeout(_) => true,
            Self::IdleTimeout(_) | Self::Cut(_) | Self::Status(_) | Self::TooLarge(_) => false,
        };
        Some(breakwater_health::Signal::Failure {
            local,
            detail: self.to_string(),
        })
    }

    /// The `outcome` label of `breakwater_upstream_attempts_total` for an attempt that
    /// failed this way before the commit point.
    pub fn label(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Status(s) => format!("status_{s}").into(),
            f if f.is_timeout() => "timeout".into(),
            Self::Connect(_) => "connect_error".into(),
            Self::Tls(_) => "tls_error".into(),
            _ => "error".into(),
        }
    }
}

/// A request the gateway answers itself with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// No such route (404); the message lists what is served.
    #[error(
        "no route for {method} {path}; this gateway serves {}",
        super::request::SERVED
    )]
    NotFound {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// Right path, wrong method (405).
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// The body is not what the endpoint takes (400).
    #[error("{0}")]
    BadRequest(String),
    /// No pool serves the model (404).
    #[error("the model `{0}` does not exist or is not served here")]
    ModelNotFound(String),
    /// The model's pools do not serve this endpoint (404; the policy's `endpoints`).
    #[error(
        "the model `{model}` is not served on {} here; it is served on: {}",
        endpoint.span_name(),
        served.iter().map(super::request::Endpoint::span_name).collect::<Vec<_>>().join(", ")
    )]
    EndpointNotServed {
        /// The model asked for.
        model: String,
        /// The endpoint asked for.
        endpoint: super::request::Endpoint,
        /// What its pools serve.
        served: super::request::EndpointSet,
    },
    /// The body is over the policy's limit (413).
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Nothing can take the request now (503 + Retry-After).
    #[error("no shard can serve model `{0}` right now")]
    NoShard(String),
    /// Every attempt failed (502).
    #[error("all {} attempt(s) failed: {}", .0.len(), join(.0))]
    Upstream(Vec<AttemptFailure>),
    /// Every attempt met an overloaded shard (429 + Retry-After).
    #[error("the shards for this model are overloaded: {}", join(.0))]
    Overloaded(Vec<AttemptFailure>),
    /// The gateway holds as many request bodies as its budget allows (503 + Retry-After).
    #[error("the gateway is buffering {limit} bytes of request bodies, its limit; retry shortly")]
    BufferFull {
        /// The budget.
        limit: usize,
    },
    /// Missing or wrong admin token (401).
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// Keys are required and the request's is missing or unknown (401).
    #[error("{}", if *missing { "an API key is required: send Authorization: Bearer KEY" } else { "the API key is not valid" })]
    InvalidApiKey {
        /// No key at all (else: an unknown one).
        missing: bool,
    },
    /// Over the tenant's requests or tokens per minute (429 + Retry-After).
    #[error("rate limit reached for {}: retry after {} ms", if .0.by_tokens { "tokens per minute" } else { "requests per minute" }, .0.reset().as_millis())]
    RateLimited(Box<RateLimited>),
    /// Refused by admission control: the fleet cannot start it in time (429 +
    /// Retry-After).
    #[error("{}", .reason.message())]
    Shed {
        /// Why.
        reason: ShedReason,
        /// When to come back, seconds.
        retry_after_s: u32,
    },
    /// The prompt and completion do not fit the model's context window (400).
    #[error("this request needs about {tokens} tokens (prompt and completion), over the model's context window of {window} tokens")]
    ContextLength {
        /// Estimated prompt + asked completion tokens.
        tokens: u64,
        /// The window.
        window: u64,
    },
}

/// A tenant's rate-limit state when a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    /// Refused for tokens (else for requests).
    pub by_tokens: bool,
    /// The requests-per-minute quota, when the tenant has one.
    pub requests: Option<crate::admission::rate::Quota>,
    /// The tokens-per-minute quota, when the tenant has one.
    pub tokens: Option<crate::admission::rate::Quota>,
}

impl RateLimited {
    /// Until the refused budget admits the request.
    pub fn reset(&self) -> std::time::Duration {
        let q = if self.by_tokens {
            self.tokens
        } else {
            self.requests
        };
        q.map_or(std::time::Duration::ZERO, |q| q.reset)
    }
}

/// Why admission refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The queue holds as many requests as it may.
    QueueFull,
    /// The predicted wait exceeds what the request may wait.
    Overloaded,
    /// Its queue deadline passed while it waited.
    QueueTimeout,
    /// More important requests pushed it past its deadline.
    Evicted,
}

impl ShedReason {
    /// The metric label and access-log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Overloaded => "overloaded",
            Self::QueueTimeout => "queue_timeout",
            Self::Evicted => "evicted",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::QueueFull => "the gateway's queue is full; retry after the time in Retry-After",
            Self::Overloaded => {
                "the fleet cannot start this request in time; retry after the time in Retry-After"
            }
            Self::QueueTimeout => {
                "the request waited in the gateway's queue until its deadline; retry after the time in Retry-After"
            }
            Self::Evicted => {
                "more important traffic took the room this request waited for; retry after the time in Retry-After"
            }
        }
    }
}

/// `x-breakwater-overloaded: true` on a refusal that says the fleet is full: layers in
/// front must not retry it elsewhere at once (Envoy's `x-envoy-overloaded`).
pub const OVERLOADED_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-breakwater-overloaded");

fn join(attempts: &[AttemptFailure]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound { .. } | Self::ModelNotFound(_) | Self::EndpointNotServed { .. } => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::BadRequest(_) => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::NoShard(_) | Self::BufferFull { .. } => 503,
            Self::Upstream(_) => 502,
            Self::Overloaded(_) | Self::RateLimited(_) | Self::Shed { .. } => 429,
            Self::Unauthorized | Self::InvalidApiKey { .. } => 401,
            Self::ContextLength { .. } => 400,
        }
    }

    /// The OpenAI error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. }
            | Self::MethodNotAllowed { .. }
            | Self::BadRequest(_)
            | Self::ModelNotFound(_)
            | Self::EndpointNotServed { .. }
            | Self::BodyTooLarge { .. }
            | Self::ContextLength { .. } => "invalid_request_error",
            Self::Unauthorized | Self::InvalidApiKey { .. } => "authentication_error",
            Self::Overloaded(_) | Self::RateLimited(_) | Self::Shed { .. } => "rate_limit_error",
            Self::NoShard(_) | Self::Upstream(_) | Self::BufferFull { .. } => "server_error",
        }
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::BadRequest(_) => "invalid_request",
            Self::ModelNotFound(_) => "model_not_found",
            Self::EndpointNotServed { .. } => "endpoint_not_served",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::NoShard(_) => "no_shard_available",
            Self::BufferFull { .. } => "gateway_overloaded",
            Self::Upstream(a) if a.last().is_some_and(|f| f.cause.is_timeout()) => {
                "upstream_timeout"
            }
            Self::Upstream(_) => "upstream_error",
            Self::Overloaded(_) => "overloaded",
            Self::Unauthorized => "invalid_admin_token",
            Self::InvalidApiKey { .. } => "invalid_api_key",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::Shed { .. } => "server_overloaded",
            Self::ContextLength { .. } => "context_length_exceeded",
        }
    }

    /// Why the gateway refused the request without trying a shard, for metrics and the
    /// access log; `None` for other errors.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::InvalidApiKey { .. } => "invalid_api_key",
            Self::RateLimited(r) if r.by_tokens => "rate_limit_tokens",
            Self::RateLimited(_) => "rate_limit_requests",
            Self::Shed { reason, .. } => reason.as_str(),
            Self::ContextLength { .. } => "context_length",
            Self::NoShard(_) => "no_shard",
            Self::BufferFull { .. } => "buffer_full",
            _ => return None,
        })
    }

    /// Headers a refusal carries beyond `Retry-After`: OpenAI's `x-ratelimit-*` for a
    /// rate limit, and [`OVERLOADED_HEADER`] where the fleet is full.
    pub fn extra_headers(&self, h: &mut http::HeaderMap) {
        match self {
            Self::RateLimited(r) => {
                for (kind, q) in [("requests", r.requests), ("tokens", r.tokens)] {
                    let Some(q) = q else { continue };
                    let name = |what: &str| {
                        http::HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")).ok()
                    };
                    let values = [
                        ("limit", q.limit.to_string()),
                        ("remaining", q.remaining.to_string()),
                        ("reset", go_duration(q.reset)),
                    ];
                    for (what, v) in values {
                        if let (Some(n), Ok(v)) = (name(what), http::HeaderValue::try_from(v)) {
                            h.insert(n, v);
                        }
                    }
                }
            }
            Self::Shed { .. } | Self::Overloaded(_) | Self::NoShard(_) => {
                h.insert(OVERLOADED_HEADER, http::HeaderValue::from_static("true"));
            }
            _ => {}
        }
    }

    /// Seconds a client should wait before retrying, for statuses that say "later".
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            Self::NoShard(_) | Self::Overloaded(_) | Self::BufferFull { .. } => Some(1),
            Self::Shed { retry_after_s, .. } => Some(*retry_after_s),
            Self::RateLimited(r) => Some((r.reset().as_secs_f64().ceil() as u32).max(1)),
            _ => None,
        }
    }

    /// The response body.
    pub fn body(&self) -> String {
        error_json(&self.to_string(), self.kind(), self.code())
    }
}

/// A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1s`, `6m0s`.
pub fn go_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64();
    let whole = s as u64;
    if whole < 60 {
        let text = format!("{s:.3}");
        return format!("{}s", text.trim_end_matches('0').trim_end_matches('.'));
    }
    let (h, m, sec) = (whole / 3600, whole / 60 % 60, whole % 60);
    if h > 0 {
        format!("{h}h{m}m{sec}s")
    } else {
        format!("{m}m{sec}s")
    }
}

/// An OpenAI error body.
pub fn error_json(message: &str, kind: &str, code: &str) -> String {
    json!({"error": {"message": message, "type": kind, "code": code, "param": null}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let e = GatewayError::ModelNotFound("x".into());
        assert_eq!((e.status(), e.code()), (404, "model_not_found"));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("`x`"));
        assert_eq!(GatewayError::NoShard("m".into()).retry_after_s(), Some(1));
        let fail = |cause| AttemptFailure {
            shard: "a".into(),
            region: "r".into(),
            cause,
        };
        let e = GatewayError::Upstream(vec![
            fail(UpstreamFailure::Status(500)),
            fail(UpstreamFailure::FirstByteTimeout(100)),
        ]);
        assert_eq!((e.status(), e.code()), (502, "upstream_timeout"));
        assert!(e
            .to_string()
            .contains("a (r): status 500; a (r): no first byte within 100 ms"));
    }

    #[test]
    fn refusals_name_their_reason_and_say_when_to_come_back() {
        let e = GatewayError::Shed {
            reason: ShedReason::Overloaded,
            retry_after_s: 3,
        };
        assert_eq!(
            (e.status(), e.code(), e.kind()),
            (429, "server_overloaded", "rate_limit_error")
        );
        assert_eq!(e.retry_after_s(), Some(3));
        assert_eq!(e.refusal_reason(), Some("overloaded"));
        let mut h = http::HeaderMap::new();
        e.extra_headers(&mut h);
        assert_eq!(h[OVERLOADED_HEADER], "true");
        let quota = |remaining, ms| crate::admission::rate::Quota {
            limit: 60,
            remaining,
            reset: std::time::Duration::from_millis(ms),
        };
        let e = GatewayError::RateLimited(Box::new(RateLimited {
            by_tokens: false,
            requests: Some(quota(0, 1500)),
            tokens: Some(quota(40, 200)),
        }));
        assert_eq!((e.status(), e.code()), (429, "rate_limit_exceeded"));
        assert_eq!(e.retry_after_s(), Some(2));
        assert_eq!(e.refusal_reason(), Some("rate_limit_requests"));
        let mut h = http::HeaderMap::new();
        e.extra_headers(&mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.5s");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "40");
        assert_eq!(h["x-ratelimit-reset-tokens"], "200ms");
        assert!(!h.contains_key(OVERLOADED_HEADER));
        let e = GatewayError::InvalidApiKey { missing: true };
        assert_eq!((e.status(), e.code()), (401, "invalid_api_key"));
        let e = GatewayError::ContextLength {
            tokens: 9000,
            window: 8192,
        };
        assert_eq!((e.status(), e.code()), (400, "context_length_exceeded"));
        assert!(e.to_string().contains("8192"));
    }

    #[test]
    fn durations_read_as_openai_writes_them() {
        use std::time::Duration;
        assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_millis(1250)), "1.25s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(3725)), "1h2m5s");
    }
}
