//! The Ollama gateway's spans for a sampled request, children of its server span: the time
//! queued (`ollama.queue`: the caller's phase, its position when it entered and what it waited
//! for) and the generation (`{operation} {model}` by the GenAI conventions), which ends with
//! the response body.

use super::context::TraceContext;
use super::span::{Kind, Span};
use super::{Recording, Tracer};
use crate::errors::ProxyError;
use crate::inbound::ollama::dispatch::Entry;
use bytes::Bytes;
use opentelemetry::KeyValue;
use std::sync::{Arc, Mutex};
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
    /// The latest answer frame that reports token usage (Ollama's final chunk, OpenAI's
    /// `usage`), kept by the body's tap until the body ends.
    usage: Arc<Mutex<Option<Bytes>>>,
}

#[derive(serde::Deserialize)]
struct Model {
    model: Option<String>,
}

// === impl GatewaySpans ===

impl GatewaySpans {
    /// `Some` when the request is sampled.
    pub fn of(ext: &http::Extensions) -> Option<Self> {
        let r = ext.get::<Recording>()?;
        Some(Self {
            tracer: r.tracer.clone(),
            parent: r.parent,
        })
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
            usage: Arc::default(),
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

    /// Watches the answer's frames for token usage.
    pub fn watch(&self, body: &mut crate::body::ProxyBody) {
        let usage = self.usage.clone();
        body.tap(move |frame| {
            if contains(frame, b"eval_count") || contains(frame, b"\"usage\"") {
                *usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame.clone());
            }
        });
    }

    /// Ends the span: `error` is how the body ended when it did not end whole.
    pub fn end(mut self, error: Option<String>) {
        let frame = self.usage.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((input, output)) = frame.as_deref().and_then(usage) {
            self.span
                .set(KeyValue::new("gen_ai.usage.input_tokens", input));
            self.span
                .set(KeyValue::new("gen_ai.usage.output_tokens", output));
        }
        if let Some(e) = error {
            self.span.set(KeyValue::new("error.type", e.clone()));
            self.span.fail(e);
        }
        self.tracer.end(self.span);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Input and output tokens from the last JSON line of `frame` that reports them: Ollama's
/// `prompt_eval_count` / `eval_count`, or OpenAI's `usage.prompt_tokens` /
/// `completion_tokens` (an SSE `data:` line or a whole answer).
fn usage(frame: &[u8]) -> Option<(i64, i64)> {
    frame.split(|&b| b == b'\n').rev().find_map(|line| {
        let line = line.trim_ascii();
        let line = line.strip_prefix(b"data:").unwrap_or(line).trim_ascii();
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        if let Some(out) = v.get("eval_count").and_then(|c| c.as_i64()) {
            let input = v
                .get("prompt_eval_count")
                .and_then(|c| c.as_i64())
                .unwrap_or(0);
            return Some((input, out));
        }
        let u = v.get("usage")?;
        Some((
            u.get("prompt_tokens")?.as_i64()?,
            u.get("completion_tokens")?.as_i64()?,
        ))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_comes_from_ollamas_final_chunk_or_openais_usage() {
        let ollama = b"{\"response\":\"!\",\"done\":false}\n{\"done\":true,\"prompt_eval_count\":26,\"eval_count\":290}\n";
        assert_eq!(usage(ollama), Some((26, 290)));
        let openai = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n";
        assert_eq!(usage(openai), Some((9, 12)));
        assert_eq!(usage(b"data: [DONE]\n\n"), None);
    }
}
