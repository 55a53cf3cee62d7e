//! A span being recorded for a sampled request, in OpenTelemetry's own types so that ending it
//! is a move into [`SpanData`]. Requests that are not sampled never build one.

use super::context::TraceContext;
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::borrow::Cow;
use std::time::SystemTime;

pub use opentelemetry::trace::SpanKind as Kind;

/// One span under way: its context, parent, timing, attributes and events.
#[derive(Clone, Debug)]
pub struct Span {
    pub ctx: TraceContext,
    parent: Option<[u8; 8]>,
    parent_remote: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    events: Vec<Event>,
    error: Option<Cow<'static, str>>,
}

// === impl Span ===

impl Span {
    /// Starts a span now: `ctx` is its own context, `parent` the span it is a child of
    /// (`remote` when that parent lives in another process).
    pub fn start(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        ctx: TraceContext,
        parent: Option<[u8; 8]>,
        remote: bool,
    ) -> Self {
        Self {
            ctx,
            parent,
            parent_remote: remote,
            kind,
            name: name.into(),
            start: SystemTime::now(),
            attributes: Vec::with_capacity(12),
            events: Vec::new(),
            error: None,
        }
    }

    pub fn set(&mut self, kv: KeyValue) {
        self.attributes.push(kv);
    }

    /// The span began earlier than it was built (a wait measured before the span existed).
    pub fn started_at(&mut self, at: SystemTime) {
        self.start = at;
    }

    pub fn event(&mut self, name: &'static str, attributes: Vec<KeyValue>) {
        self.events
            .push(Event::new(name, SystemTime::now(), attributes, 0));
    }

    /// Marks the span failed (status `Error` with `description`).
    pub fn fail(&mut self, description: impl Into<Cow<'static, str>>) {
        self.error = Some(description.into());
    }

    /// Ends the span now.
    pub fn end(self, scope: &InstrumentationScope) -> SpanData {
        let flags = if self.ctx.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let mut events = SpanEvents::default();
        events.events = self.events;
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(self.ctx.trace_id),
                SpanId::from_bytes(self.ctx.span_id),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: self.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: self.parent_remote,
            span_kind: self.kind,
            name: self.name,
            start_time: self.start,
            end_time: SystemTime::now(),
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: match self.error {
                Some(d) => Status::error(d),
                None => Status::Unset,
            },
            instrumentation_scope: scope.clone(),
        }
    }
}
