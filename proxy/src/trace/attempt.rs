//! One span per attempt of a retried request, a child of the request's client span: its
//! number, the endpoint it went to and how it ended. Only sampled requests under a retry
//! policy build them, and they are exported only when a second attempt was made. The agent's
//! identity is on the client span and the resource, not repeated here.

use super::context::TraceContext;
use super::span::{Kind, Span};
use super::{Recording, Tracer};
use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::outbound::retry::Tried;
use crate::state::Route;
use http::Response;
use opentelemetry::KeyValue;
use std::sync::Arc;

/// An attempt's span, ended (its end time taken) but not yet exported.
#[derive(Debug)]
pub struct Finished(opentelemetry_sdk::trace::SpanData);

/// The attempts of one sampled request.
#[derive(Debug)]
pub struct Attempts {
    tracer: Arc<Tracer>,
    parent: TraceContext,
}

// === impl Attempts ===

impl Attempts {
    /// `Some` when the request is sampled (a trace layer above left its tracer).
    pub fn of(ext: &http::Extensions) -> Option<Self> {
        let r = ext.get::<Recording>()?;
        Some(Self {
            tracer: r.tracer.clone(),
            parent: r.parent,
        })
    }

    pub fn start(&self, attempt: u32) -> Span {
        let mut span = Span::start(
            "attempt",
            Kind::Internal,
            self.parent.child(),
            Some(self.parent.span_id),
            false,
        );
        span.set(KeyValue::new("mesh.attempt", i64::from(attempt)));
        span.set(KeyValue::new(
            "http.request.resend_count",
            i64::from(attempt.saturating_sub(1)),
        ));
        span
    }

    /// Records the endpoint an attempt went to and its outcome; [`Attempts::send`] exports it.
    pub fn finish(
        &self,
        mut span: Span,
        res: &Result<Response<ProxyBody>, ProxyError>,
        route: Option<&Route>,
        tried: &Tried,
    ) -> Finished {
        let endpoint = route
            .zip(tried.last())
            .and_then(|(r, i)| r.backend.endpoints.get(i));
        if let Some(ep) = endpoint {
            span.set(KeyValue::new(
                "network.peer.address",
                ep.addr.ip().to_string(),
            ));
            span.set(KeyValue::new(
                "network.peer.port",
                i64::from(ep.addr.port()),
            ));
        }
        let outcome = match res {
            Ok(rsp) => {
                let status = rsp.status().as_u16();
                span.set(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    span.set(KeyValue::new("error.type", status.to_string()));
                    span.fail(status.to_string());
                    "failed"
                } else {
                    "ok"
                }
            }
            Err(e) => {
                span.set(KeyValue::new("error.type", e.kind()));
                span.fail(e.to_string());
                "error"
            }
        };
        span.set(KeyValue::new("mesh.attempt.outcome", outcome));
        Finished(span.end(self.tracer.scope()))
    }

    pub fn send(&self, span: Finished) {
        self.tracer.export(span.0);
    }
}
