//! The caller's side of a hop: reads the context the agent sent (W3C, or B3 translated to
//! W3C), starts a trace when there is none, records the client span of a sampled request,
//! and forwards the client span's own context, so the callee's server span is its child.
//! Sits right below `route` (it names the target) and above the access log (which ends the
//! span when the response body ends).

use super::context::{self, TraceContext};
use super::span::{Kind, Span};
use super::{begin, Pending, Recording, Tracer};
use crate::state::Route;
use http::{Method, Request};
use opentelemetry::{KeyValue, Value};
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Clone, Debug)]
pub struct ClientSpanLayer {
    tracer: Option<Arc<Tracer>>,
}

#[derive(Clone, Debug)]
pub struct ClientSpan<S> {
    inner: S,
    tracer: Option<Arc<Tracer>>,
}

impl ClientSpanLayer {
    /// Without a tracer (no `[trace]`), requests pass untouched.
    pub fn new(tracer: Option<Arc<Tracer>>) -> Self {
        Self { tracer }
    }
}

impl<S> tower::Layer<S> for ClientSpanLayer {
    type Service = ClientSpan<S>;

    fn layer(&self, inner: S) -> ClientSpan<S> {
        ClientSpan {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

impl<S, B> tower::Service<Request<B>> for ClientSpan<S>
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
        let incoming = context::extract(req.headers_mut(), true);
        let parent = incoming.parent;
        let ctx = begin(tracer, parent);
        context::inject(req.headers_mut(), &ctx, incoming);
        if ctx.sampled {
            let span = client_span(tracer, &req, ctx, parent);
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

fn client_span<B>(
    tracer: &Tracer,
    req: &Request<B>,
    ctx: TraceContext,
    parent: Option<TraceContext>,
) -> Span {
    let mut span = Span::start(
        method_name(req.method()),
        Kind::Client,
        ctx,
        parent.map(|p| p.span_id),
        parent.is_some(),
    );
    tracer.identity(&mut span);
    request_attributes(&mut span, req);
    if let Some(route) = req.extensions().get::<Route>() {
        span.set(KeyValue::new("server.address", shared(&route.backend.name)));
        span.set(KeyValue::new("target.agent", shared(&route.backend.name)));
    }
    span
}

/// HTTP semantic conventions of the request, and `operation.type` (`grpc` or `http`).
pub(crate) fn request_attributes<B>(span: &mut Span, req: &Request<B>) {
    span.set(KeyValue::new(
        "http.request.method",
        method_name(req.method()),
    ));
    span.set(KeyValue::new("url.path", req.uri().path().to_owned()));
    span.set(KeyValue::new(
        "network.protocol.version",
        match req.version() {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        },
    ));
    let grpc = crate::grpc::is_grpc(req);
    span.set(KeyValue::new(
        "operation.type",
        if grpc { "grpc" } else { "http" },
    ));
}

/// A name the sidecar already holds, as an attribute value without a copy.
pub(crate) fn shared(name: &Arc<str>) -> Value {
    Value::String(name.clone().into())
}

/// Span names are the method (low cardinality, as the conventions ask); unknown methods are
/// `HTTP`.
pub(crate) fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "HTTP",
    }
}
