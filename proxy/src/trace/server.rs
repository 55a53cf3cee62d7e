//! The callee's side of a hop: reads the W3C context the caller's sidecar sent (a malformed one
//! is dropped and a new trace starts here), records the server span of a sampled request as a
//! child of the caller's client span, and hands the app (or Ollama) the server span's context.
//! Sits right below the local target and above the access log, which ends the span.

use super::client::{method_name, request_attributes, shared};
use super::context;
use super::span::{Kind, Span};
use super::{begin, Pending, Recording, Tracer};
use crate::outbound::CALLER_HEADER;
use http::Request;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Clone, Debug)]
pub struct ServerSpanLayer {
    tracer: Option<Arc<Tracer>>,
}

#[derive(Clone, Debug)]
pub struct ServerSpan<S> {
    inner: S,
    tracer: Option<Arc<Tracer>>,
}

impl ServerSpanLayer {
    /// Without a tracer (no `[trace]`), requests pass untouched.
    pub fn new(tracer: Option<Arc<Tracer>>) -> Self {
        Self { tracer }
    }
}

impl<S> tower::Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;

    fn layer(&self, inner: S) -> ServerSpan<S> {
        ServerSpan {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

impl<S, B> tower::Service<Request<B>> for ServerSpan<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let Some(tracer) = &self.tracer else {
            return self.inner.call(req);
        };
        let incoming = context::extract(req.headers_mut(), false);
        let parent = incoming.parent;
        let ctx = begin(tracer, parent);
        context::inject(req.headers_mut(), &ctx, incoming);
        if ctx.sampled {
            let mut span = Span::start(
                method_name(req.method()),
                Kind::Server,
                ctx,
                parent.map(|p| p.span_id),
                true,
            );
            tracer.identity(&mut span);
            request_attributes(&mut span, &req);
            span.set(KeyValue::new("url.scheme", "http"));
            span.set(KeyValue::new("server.address", shared(&tracer.agent)));
            span.set(KeyValue::new("target.agent", shared(&tracer.agent)));
            if let Some(caller) = req
                .headers()
                .get(CALLER_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                span.set(KeyValue::new("mesh.caller", caller.to_owned()));
            }
            req.extensions_mut().insert(Pending {
                tracer: tracer.clone(),
                span: Box::new(span),
            });
            req.extensions_mut().insert(Recording {
                tracer: tracer.clone(),
                parent: ctx,
            });
        }
        let inner = &mut self.inner;
        super::hand_over(ctx, move || inner.call(req))
    }
}
