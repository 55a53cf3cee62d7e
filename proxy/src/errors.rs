//! Why a request failed inside the proxy, and the response the caller gets for it.

use crate::body::ProxyBody;
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

/// A failure the proxy answers on the caller's behalf. Each kind maps to one status, one JSON
/// body and one `kind` label on `agent_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route to {target:?}")]
    NoRoute { target: String },
    #[error("request names no target (no authority or Host header)")]
    NoAuthority,
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
}

impl ProxyError {
    /// The bounded label used in metrics and access logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::NoAuthority => "no_authority",
            ProxyError::NoEndpoints { .. } => "no_endpoints",
            ProxyError::Unavailable { .. } => "upstream_unavailable",
            ProxyError::UpstreamFailed { .. } => "upstream_failed",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Draining => "draining",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } | ProxyError::NoEndpoints { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::NoAuthority => StatusCode::BAD_REQUEST,
            ProxyError::Unavailable { .. } | ProxyError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded { .. } | ProxyError::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn target(&self) -> Option<&str> {
        match self {
            ProxyError::NoRoute { target }
            | ProxyError::NoEndpoints { target }
            | ProxyError::Unavailable { target, .. }
            | ProxyError::UpstreamFailed { target, .. }
            | ProxyError::Timeout { target, .. }
            | ProxyError::Overloaded { target, .. } => Some(target),
            ProxyError::NoAuthority | ProxyError::Draining => None,
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
        let mut rsp = Response::new(ProxyBody::json(body.to_string()));
        *rsp.status_mut() = self.status();
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let retry_after = match self {
            ProxyError::Overloaded { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            ProxyError::NoEndpoints { .. } | ProxyError::Draining => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            rsp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        rsp
    }
}
