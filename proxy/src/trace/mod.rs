//! Tracing across the mesh (Rule 28). Where a request meets it, in order: the caller's sidecar
//! (`client.rs`: reads or starts the context, records the client span, forwards its own
//! context), the retry loop (one span per attempt), the callee's sidecar (`server.rs`: the
//! server span, a child of the caller's client span, whose context the app receives), and the
//! Ollama gateway (queue and generation spans). Spans end with the access record, when the
//! response body ends, and leave through the bounded exporter queue (`export/`: OTLP/HTTP, or
//! OTLP/gRPC when the bootstrap asks).
//!
//! Sampling is parent-based: a parent's decision (`sampled` flag) is kept; a new trace is
//! sampled by the policy's `[trace] sampling` ratio for this sidecar's phase, read from each
//! snapshot. A request not sampled still carries its context to the next hop and its ids into
//! the access log; no span is built for it. Without `[trace]` in the bootstrap there is no
//! tracer: the layers pass requests through untouched (trace headers travel as the app sent
//! them) and cost one branch.

pub mod attempt;
pub mod client;
pub mod context;
pub mod export;
pub mod ollama;
pub mod server;
pub mod span;

use crate::state::State;
use context::TraceContext;
use mesh_config::Phase;
use opentelemetry::{InstrumentationScope, KeyValue};
use span::Span;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// This sidecar's tracer: who it is, the sampling ratio in force and the export queue.
#[derive(Debug)]
pub struct Tracer {
    pub agent: Arc<str>,
    pub phase: Phase,
    /// Roots are sampled when the low 64 bits of their trace id are below this.
    threshold: AtomicU64,
    queue: export::Queue,
    scope: InstrumentationScope,
}

/// The tracer of a sampled request and the span its layers below record children of.
#[derive(Clone, Debug)]
pub struct Recording {
    pub tracer: Arc<Tracer>,
    pub parent: TraceContext,
}

thread_local! {
    /// The context a trace layer hands to the access record of the layer right below it. The
    /// access layer's `call` runs inside the trace layer's `call`, on the same thread, so a
    /// cell is enough, and it spares every request an `Extensions` insert and lookup.
    static HANDOFF: std::cell::Cell<Option<TraceContext>> = const { std::cell::Cell::new(None) };
}

/// Calls `inner` with `ctx` handed to the access record it opens.
pub(crate) fn hand_over<R>(ctx: TraceContext, inner: impl FnOnce() -> R) -> R {
    HANDOFF.with(|h| h.set(Some(ctx)));
    let out = inner();
    // Not taken (no access layer below): it must not reach another request's record.
    HANDOFF.with(|h| h.set(None));
    out
}

/// The context handed over for the request being accounted, if any.
pub(crate) fn take_handoff() -> Option<TraceContext> {
    HANDOFF.with(|h| h.take())
}

/// The span a layer opened for the request, handed to the access record that ends it.
#[derive(Clone, Debug)]
pub struct Pending {
    pub tracer: Arc<Tracer>,
    pub span: Box<Span>,
}

/// A fallback answered in place of the target: an event on the client span.
#[derive(Clone, Copy, Debug)]
pub struct FallbackUsed(pub &'static str);

// === impl Tracer ===

impl Tracer {
    /// Starts the exporter of `[trace]`; the ratio follows the snapshots of `state`.
    pub fn start(
        boot: &crate::bootstrap::Bootstrap,
        cfg: &crate::bootstrap::Trace,
        state: &Arc<State>,
    ) -> Result<Arc<Tracer>, export::ExportError> {
        let queue = export::start(cfg, &boot.agent, boot.phase.as_str())?;
        let tracer = Arc::new(Tracer {
            agent: boot.agent.as_str().into(),
            phase: boot.phase,
            threshold: AtomicU64::new(0),
            queue,
            scope: InstrumentationScope::builder("mesh-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        });
        tracer.apply(&state.load().snapshot);
        tokio::spawn(follow(
            Arc::downgrade(&tracer),
            Arc::downgrade(state),
            state.versions(),
        ));
        Ok(tracer)
    }

    /// Reads the sampling ratio for this sidecar's phase from a snapshot (none: 0).
    pub fn apply(&self, snap: &mesh_config::Snapshot) {
        let ratio = snap.trace.as_ref().map_or(0.0, |t| t.ratio(self.phase));
        self.threshold.store(threshold(ratio), Relaxed);
    }

    /// Whether a trace that starts here is sampled.
    pub fn sample_root(&self, trace_id: &[u8; 16]) -> bool {
        let t = self.threshold.load(Relaxed);
        t == u64::MAX || low64(trace_id) < t
    }

    /// Ends `span` and hands it to the exporter (dropped and counted when the queue is full).
    pub fn end(&self, span: Span) {
        self.queue.send(span.end(&self.scope));
    }

    /// Hands a span ended earlier to the exporter.
    pub fn export(&self, span: opentelemetry_sdk::trace::SpanData) {
        self.queue.send(span);
    }

    pub fn scope(&self) -> &InstrumentationScope {
        &self.scope
    }

    /// The Rule 28 attributes every span of this sidecar carries.
    pub fn identity(&self, span: &mut Span) {
        span.set(KeyValue::new("agent.id", client::shared(&self.agent)));
        span.set(KeyValue::new("agent.phase", self.phase.as_str()));
    }
}

/// The context a request starts from: its parent's, or a new trace sampled by the ratio.
pub fn begin(tracer: &Tracer, parent: Option<TraceContext>) -> TraceContext {
    match parent {
        Some(p) => p.child(),
        None => {
            let (trace_id, span_id) = context::new_ids();
            TraceContext {
                trace_id,
                span_id,
                sampled: tracer.sample_root(&trace_id),
            }
        }
    }
}

fn low64(id: &[u8; 16]) -> u64 {
    u64::from_be_bytes(id[8..].try_into().expect("eight bytes"))
}

/// `ratio` of the 64-bit space (1 samples everything, 0 nothing).
fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 || ratio.is_nan() {
        0
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

async fn follow(
    tracer: std::sync::Weak<Tracer>,
    state: std::sync::Weak<State>,
    mut versions: tokio::sync::watch::Receiver<u64>,
) {
    while versions.changed().await.is_ok() {
        let (Some(tracer), Some(state)) = (tracer.upgrade(), state.upgrade()) else {
            return;
        };
        tracer.apply(&state.load().snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_splits_the_id_space() {
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(1.0), u64::MAX);
        let t = threshold(0.25);
        let sampled = (0..10_000)
            .filter(|_| low64(&context::new_trace_id()) < t)
            .count();
        assert!((2_000..3_000).contains(&sampled), "{sampled}");
    }
}
