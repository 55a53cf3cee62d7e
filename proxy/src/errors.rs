//! Why a request failed inside the proxy, and the response the caller gets for it.

use crate::body::ProxyBody;
use crate::grpc;
use http::{header, HeaderValue, Response, StatusCode};
use mesh_config::Phase;
use std::time::Duration;

/// A failure the proxy answers on the caller's behalf. Each kind maps to one status, one JSON
/// body and one `kind` label on `agent_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route to {target:?}")]
    NoRoute { target: String },
    #[error("request names no target (no authority or Host header)")]
    NoAuthority,
    #[error("malformed request: {reason}")]
    Malformed { reason: &'static str },
    #[error("not implemented: {reason}")]
    NotImplemented { reason: &'static str },
    #[error("{target} has no endpoints")]
    NoEndpoints { target: String },
    #[error("upstream {target} unavailable: {reason}")]
    Unavailable { target: String, reason: String },
    #[error("upstream {target} failed: {reason}")]
    UpstreamFailed { target: String, reason: String },
    #[error("{target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("{target} is over its concurrency limit ({reason})")]
    Overloaded {
        target: String,
        reason: &'static str,
        retry_after: Duration,
    },
    #[error("proxy is draining")]
    Draining,
    #[error("circuit breaker for {target} is open")]
    BreakerOpen {
        target: String,
        retry_after: Duration,
    },
    #[error("request body for {target} could not be read: {reason}")]
    RequestBody { target: String, reason: String },
    /// The caller sent its body too slowly (`upload.rs`): its fault, 408.
    #[error("request body for {target} arrived too slowly: {reason}")]
    BodyTimeout { target: String, reason: String },
    #[error("{target} refused the request: {reason}")]
    BadRequest { target: String, reason: String },
    #[error("request body for {target} is larger than {limit} bytes")]
    TooLarge { target: String, limit: usize },
    #[error("calls to {target} are over this agent's rate limit")]
    RateLimited {
        target: String,
        retry_after: Duration,
    },
    /// The Ollama gateway did not admit the request; `over_quota` answers 429, else 503.
    #[error("{target} queue refused the request ({reason})")]
    Queue {
        target: String,
        reason: &'static str,
        over_quota: bool,
        phase: Phase,
        position: usize,
        waited: Duration,
        retry_after: Duration,
    },
}

impl ProxyError {
    /// The bounded label used in metrics and access logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::NoAuthority => "no_authority",
            ProxyError::Malformed { .. } | ProxyError::NotImplemented { .. } => "bad_request",
            ProxyError::NoEndpoints { .. } => "no_endpoints",
            ProxyError::Unavailable { .. } => "upstream_unavailable",
            ProxyError::UpstreamFailed { .. } => "upstream_failed",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Draining => "draining",
            ProxyError::BreakerOpen { .. } => "breaker_open",
            ProxyError::RequestBody { .. } => "request_body",
            ProxyError::BodyTimeout { .. } => "request_body_timeout",
            ProxyError::BadRequest { .. } | ProxyError::TooLarge { .. } => "bad_request",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::Queue {
                over_quota: true, ..
            } => "rate_limited",
            ProxyError::Queue { .. } => "overloaded",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } | ProxyError::NoEndpoints { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::NoAuthority
            | ProxyError::Malformed { .. }
            | ProxyError::RequestBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::BreakerOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unavailable { .. } | ProxyError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded { .. } | ProxyError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited { .. }
            | ProxyError::Queue {
                over_quota: true, ..
            } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Queue { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn target(&self) -> Option<&str> {
        match self {
            ProxyError::NoRoute { target }
            | ProxyError::NoEndpoints { target }
            | ProxyError::Unavailable { target, .. }
            | ProxyError::UpstreamFailed { target, .. }
            | ProxyError::Timeout { target, .. }
            | ProxyError::Overloaded { target, .. }
            | ProxyError::BreakerOpen { target, .. }
            | ProxyError::RequestBody { target, .. }
            | ProxyError::BodyTimeout { target, .. } => Some(target),
            ProxyError::BadRequest { target, .. }
            | ProxyError::TooLarge { target, .. }
            | ProxyError::RateLimited { target, .. }
            | ProxyError::Queue { target, .. } => Some(target),
            ProxyError::NoAuthority
            | ProxyError::Malformed { .. }
            | ProxyError::NotImplemented { .. }
            | ProxyError::Draining => None,
        }
    }

    /// Answers the mesh makes to shed load, not failures of the target: the reason carried in
    /// `x-mesh-refused` (see `refusal.rs`). `None` for every other error.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            ProxyError::Overloaded { .. } => Some("overloaded"),
            ProxyError::RateLimited { .. } => Some("rate_limited"),
            ProxyError::Draining => Some("draining"),
            // A gateway whose dispatcher is gone is failing, not shedding load.
            ProxyError::Queue { reason, .. } if *reason != "ollama_unavailable" => Some(reason),
            _ => None,
        }
    }

    /// The gRPC status a gRPC caller gets for this error.
    pub fn grpc_code(&self) -> grpc::Code {
        match self {
            ProxyError::Timeout { .. } => grpc::Code::DeadlineExceeded,
            ProxyError::RateLimited { .. }
            | ProxyError::TooLarge { .. }
            | ProxyError::Queue {
                over_quota: true, ..
            } => grpc::Code::ResourceExhausted,
            ProxyError::NoAuthority
            | ProxyError::Malformed { .. }
            | ProxyError::NotImplemented { .. }
            | ProxyError::RequestBody { .. }
            | ProxyError::BodyTimeout { .. }
            | ProxyError::BadRequest { .. } => grpc::Code::Internal,
            ProxyError::NoRoute { .. }
            | ProxyError::NoEndpoints { .. }
            | ProxyError::Unavailable { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::Draining
            | ProxyError::BreakerOpen { .. }
            | ProxyError::Queue { .. } => grpc::Code::Unavailable,
        }
    }

    /// The response for a caller: a gRPC status for a gRPC call, else [`Self::to_response`].
    /// The `x-mesh-refused` marker is set by the inbound side (`access_log`), never here.
    pub fn respond(&self, grpc: bool) -> Response<ProxyBody> {
        if !grpc {
            return self.to_response();
        }
        let mut rsp = grpc::error_response(self.grpc_code(), &self.to_string());
        if let Some(secs) = self.retry_after() {
            rsp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        rsp
    }

    /// Whole seconds a caller should wait before trying again, when the error says.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::Overloaded { retry_after, .. }
            | ProxyError::BreakerOpen { retry_after, .. }
            | ProxyError::RateLimited { retry_after, .. }
            | ProxyError::Queue { retry_after, .. } => Some(ceil_secs(*retry_after)),
            ProxyError::NoEndpoints { .. } | ProxyError::Draining => Some(1),
            _ => None,
        }
    }

    /// The response the caller receives: JSON naming the error and the target.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": self.kind(),
            "message": self.to_string(),
        });
        if let Some(target) = self.target() {
            body["target"] = target.into();
        }
        if let ProxyError::Timeout { timeout, .. } = self {
            body["timeout_ms"] = (timeout.as_millis() as u64).into();
        }
        if let ProxyError::BreakerOpen { target, .. } = self {
            body["breaker"] = serde_json::json!({ "target": target, "state": "open" });
        }
        if let ProxyError::Queue {
            reason,
            phase,
            position,
            waited,
            retry_after,
            ..
        } = self
        {
            body["reason"] = (*reason).into();
            body["phase"] = phase.as_str().into();
            body["queue_position"] = (*position).into();
            body["waited_ms"] = (waited.as_millis() as u64).into();
            body["retry_after_s"] = ceil_secs(*retry_after).into();
        }
        let mut rsp = Response::new(ProxyBody::json(body.to_string()));
        *rsp.status_mut() = self.status();
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            rsp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        rsp
    }
}

/// Whole seconds for `Retry-After`, rounded up and at least one.
fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
