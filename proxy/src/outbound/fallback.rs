//! What a caller gets while a target's breaker is open, per policy: a configured static answer,
//! the same request sent to a fallback target, or by default 503 with `Retry-After` and a JSON
//! body naming the open breaker. No connect is attempted.

use crate::body::ProxyBody;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use mesh_config::resilience as cfg;
use std::sync::Arc;

/// A compiled fallback policy.
#[derive(Clone, Debug, Default)]
pub enum Fallback {
    #[default]
    Unavailable,
    Static(Arc<StaticResponse>),
    /// The name of another service; resolved in the route table in force when used.
    Target(Arc<str>),
}

/// A fixed answer, built once per snapshot.
#[derive(Debug)]
pub struct StaticResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Fallback {
    /// Compiles a validated policy (validation guarantees the status and headers are legal).
    pub fn compile(policy: &cfg::Fallback) -> Self {
        match policy {
            cfg::Fallback::Unavailable {} => Fallback::Unavailable,
            cfg::Fallback::Target { service } => Fallback::Target(service.as_str().into()),
            cfg::Fallback::Static {
                status,
                headers,
                body,
            } => {
                let mut map = HeaderMap::with_capacity(headers.len() + 1);
                if body.is_some() {
                    map.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        map.insert(k, v);
                    }
                }
                Fallback::Static(Arc::new(StaticResponse {
                    status: StatusCode::from_u16(*status)
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    headers: map,
                    body: body
                        .as_ref()
                        .map(|b| Bytes::from(b.to_string()))
                        .unwrap_or_default(),
                }))
            }
        }
    }
}

impl StaticResponse {
    pub fn respond(&self) -> Response<ProxyBody> {
        let mut rsp = Response::new(ProxyBody::bytes(self.body.clone()));
        *rsp.status_mut() = self.status;
        *rsp.headers_mut() = self.headers.clone();
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_answer_carries_its_headers_and_json() {
        let policy: cfg::Fallback = toml::from_str(
            "kind = \"static\"\nstatus = 200\nheaders = { x-cached = \"1\" }\nbody = { answer = \"cached\" }\n",
        )
        .unwrap();
        let Fallback::Static(r) = Fallback::compile(&policy) else {
            panic!("static policy")
        };
        let rsp = r.respond();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["x-cached"], "1");
        assert_eq!(rsp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.body, Bytes::from_static(br#"{"answer":"cached"}"#));
    }
}
