//! The Ollama gateway's spans for a sampled request, children of its server span: the time
//! queued (`ollama.queue`: the caller's phase, its position when it entered and what it waited
//! for) and the generation (`{operation} {model}` by the GenAI conventions), which ends with
//! the response body.

use super::context::TraceContext;
use super::span::{Kind, Span};
use super::{Recording, Tracer};
use crate::errors::ProxyError;
use crate::inbound::ollama::dispatch::Entry;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::time::SystemTime;

/// The spans of one sampled request at the gateway.
#[derive(Debug)]
pub struct GatewaySpans {
    tracer: Arc<Tracer>,
    parent: TraceContext,
}

/// A generation under way; ends with the response body.
#[derive(Debug)]
pub struct Generation {
    tracer: Arc<Tracer>,
    span: Span,
}

#[derive(serde::Deserialize)]
struct Model {
    model: Option<String>,
}

// === impl GatewaySpans ===

impl GatewaySpans {
    /// `Some` when the request is sampled.
    pub fn of(ext: &http::Extensions) -> Option<Self> {
        let tracer = ext.get::<Recording>()?.0.clone();
        let parent = *ext.get::<TraceContext>()?;
        Some(Self { tracer, parent })
    }

    fn child(&self, name: impl Into<std::borrow::Cow<'static, str>>, kind: Kind) -> Span {
        let mut span = Span::start(
            name,
            kind,
            self.parent.child(),
            Some(self.parent.span_id),
            false,
        );
        self.tracer.identity(&mut span);
        span
    }

    /// Records the wait for a slot, from `since` to now: admitted (`Ok`) or refused.
    pub fn queued(
        &self,
        since: SystemTime,
        caller: &str,
        phase: &'static str,
        admitted: Result<Entry, &ProxyError>,
    ) {
        let mut span = self.child("ollama.queue", Kind::Internal);
        span.started_at(since);
        span.set(KeyValue::new("mesh.caller", caller.to_owned()));
        span.set(KeyValue::new("mesh.caller.phase", phase));
        match admitted {
            Ok(entry) => {
                span.set(KeyValue::new(
                    "ollama.queue.position",
                    entry.position as i64,
                ));
                span.set(KeyValue::new("ollama.queue.wait_reason", entry.reason));
            }
            Err(e) => {
                if let ProxyError::Queue {
                    reason, position, ..
                } = e
                {
                    span.set(KeyValue::new("ollama.queue.position", *position as i64));
                    span.set(KeyValue::new("ollama.queue.refused", *reason));
                }
                span.set(KeyValue::new("error.type", e.kind()));
                span.fail(e.to_string());
            }
        }
        self.tracer.end(span);
    }

    /// Starts the generation span for a request to `path` with `body`.
    pub fn generation(&self, path: &str, body: &[u8], ollama: &str) -> Generation {
        let op = operation(path);
        let model = serde_json::from_slice::<Model>(body)
            .ok()
            .and_then(|m| m.model);
        let name = match &model {
            Some(m) => format!("{op} {m}"),
            None => op.to_owned(),
        };
        let mut span = self.child(name, Kind::Client);
        span.set(KeyValue::new("gen_ai.operation.name", op));
        span.set(KeyValue::new("gen_ai.provider.name", "ollama"));
        span.set(KeyValue::new("gen_ai.system", "ollama"));
        span.set(KeyValue::new("server.address", ollama.to_owned()));
        span.set(KeyValue::new("url.path", path.to_owned()));
        if let Some(m) = model {
            span.set(KeyValue::new("gen_ai.request.model", m));
        }
        Generation {
            tracer: self.tracer.clone(),
            span,
        }
    }
}

// === impl Generation ===

impl Generation {
    /// The answer's head arrived with `status`.
    pub fn answered(&mut self, status: u16) {
        self.span.set(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            self.span
                .set(KeyValue::new("error.type", status.to_string()));
            self.span.fail(status.to_string());
        }
    }

    /// Ends the span: `error` is how the body ended when it did not end whole.
    pub fn end(mut self, error: Option<String>) {
        if let Some(e) = error {
            self.span.set(KeyValue::new("error.type", e.clone()));
            self.span.fail(e);
        }
        self.tracer.end(self.span);
    }
}

/// The GenAI operation a gateway path stands for.
fn operation(path: &str) -> &'static str {
    match path {
        "/api/chat" | "/v1/chat/completions" => "chat",
        "/api/generate" | "/v1/completions" => "text_completion",
        "/api/embed" | "/api/embeddings" | "/v1/embeddings" => "embeddings",
        _ => "ollama",
    }
}
