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

impl UpstreamFailure {
    /// Whether the failure was a timeout of some kind.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::FirstByteTimeout(_) | Self::IdleTimeout(_) | Self::Deadline
        )
    }
}

/// A request the gateway answers itself with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// No such route (404).
    #[error("no route for {method} {path}")]
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
}

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
            Self::NotFound { .. } | Self::ModelNotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::BadRequest(_) => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::NoShard(_) | Self::BufferFull { .. } => 503,
            Self::Upstream(_) => 502,
            Self::Overloaded(_) => 429,
            Self::Unauthorized => 401,
        }
    }

    /// The OpenAI error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. }
            | Self::MethodNotAllowed { .. }
            | Self::BadRequest(_)
            | Self::ModelNotFound(_)
            | Self::BodyTooLarge { .. } => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::Overloaded(_) => "rate_limit_error",
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
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::NoShard(_) => "no_shard_available",
            Self::BufferFull { .. } => "gateway_overloaded",
            Self::Upstream(a) if a.last().is_some_and(|f| f.cause.is_timeout()) => {
                "upstream_timeout"
            }
            Self::Upstream(_) => "upstream_error",
            Self::Overloaded(_) => "overloaded",
            Self::Unauthorized => "invalid_admin_token",
        }
    }

    /// Seconds a client should wait before retrying, for statuses that say "later".
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            Self::NoShard(_) | Self::Overloaded(_) | Self::BufferFull { .. } => Some(1),
            _ => None,
        }
    }

    /// The response body.
    pub fn body(&self) -> String {
        error_json(&self.to_string(), self.kind(), self.code())
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
}
