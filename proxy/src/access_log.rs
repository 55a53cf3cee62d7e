//! One access-log line and one set of metric updates per request, emitted when the response
//! body ends, or when the caller goes away first. Every request is accounted exactly once.

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::log::json_str;
use crate::metrics::TargetMetrics;
use crate::state::Route;
use crate::trace::{context::TraceContext, FallbackUsed, Pending};
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

/// What is known about a request until it is accounted for. Dropping an unfinished record
/// accounts the request as reset by the caller.
#[derive(Debug)]
pub struct AccessRecord {
    direction: &'static str,
    metrics: Arc<TargetMetrics>,
    started: Instant,
    method: Method,
    uri: Uri,
    version: Version,
    status: u16,
    error: Option<&'static str>,
    /// The failure in words, for lines about requests the proxy answered itself.
    detail: Option<String>,
    log: bool,
    done: bool,
    /// The request's trace context (sampled or not), for the line's `trace_id` and `span_id`.
    trace: Option<TraceContext>,
    /// The span this request's answer ends, when it is sampled.
    span: Option<Pending>,
}

impl AccessRecord {
    pub fn start<B>(
        direction: &'static str,
        metrics: Arc<TargetMetrics>,
        req: &Request<B>,
        log: bool,
    ) -> Self {
        metrics.inflight().increment(1.0);
        Self {
            direction,
            metrics,
            started: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            status: 0,
            error: None,
            detail: None,
            log: log && crate::log::access_enabled(),
            done: false,
            trace: None,
            span: None,
        }
    }

    /// Takes the request's trace context (handed over by the trace layer above) and its open
    /// span, if it is sampled.
    pub fn trace<B>(&mut self, req: &mut Request<B>) {
        self.trace = crate::trace::take_handoff();
        if self.trace.is_some_and(|t| t.sampled) {
            self.span = req.extensions_mut().remove::<Pending>();
        }
    }

    /// Notes a fallback that answered for the target on the open span.
    fn fallback(&mut self, used: Option<&FallbackUsed>) {
        if let (Some(p), Some(used)) = (self.span.as_mut(), used) {
            p.span.event(
                "breaker.short_circuit",
                vec![opentelemetry::KeyValue::new("reason", "breaker open")],
            );
            p.span.event(
                "fallback",
                vec![opentelemetry::KeyValue::new("fallback.kind", used.0)],
            );
        }
    }

    pub fn set_response(&mut self, status: u16) {
        self.status = status;
    }

    pub fn set_error(&mut self, status: u16, err: &ProxyError) {
        self.status = status;
        self.error = Some(err.kind());
        if self.log {
            self.detail = Some(err.to_string());
        }
        if let Some(p) = self.span.as_mut() {
            let name = match err {
                ProxyError::BreakerOpen { .. } => "breaker.short_circuit",
                ProxyError::Timeout { .. } => "deadline.expired",
                ProxyError::RateLimited { .. } => "rate_limit.refused",
                ProxyError::Queue { .. } => "ollama.queue.refused",
                _ => "mesh.error",
            };
            p.span.event(
                name,
                vec![
                    opentelemetry::KeyValue::new("error.type", err.kind()),
                    opentelemetry::KeyValue::new("reason", err.to_string()),
                ],
            );
        }
    }

    /// The response body ended (or failed with `error`) after `bytes` bytes.
    pub fn finish(mut self, bytes: u64, error: Option<&'static str>) {
        self.emit(bytes, error);
    }

    fn emit(&mut self, bytes: u64, late_error: Option<&'static str>) {
        if self.done {
            return;
        }
        self.done = true;
        let m = &self.metrics;
        m.inflight().decrement(1.0);
        let elapsed = self.started.elapsed();
        let error = self.error.or(late_error);
        if self.status != 0 {
            m.response(self.status, elapsed.as_secs_f64());
        }
        if let Some(kind) = error {
            m.error(kind);
        } else if self.status >= 500 {
            m.error("upstream_status");
        }
        if self.log {
            self.write_line(elapsed, bytes, error);
        }
        if let Some(Pending { tracer, mut span }) = self.span.take() {
            use opentelemetry::KeyValue;
            if self.status != 0 {
                span.set(KeyValue::new(
                    "http.response.status_code",
                    self.status as i64,
                ));
            }
            span.set(KeyValue::new("http.response.body.size", bytes as i64));
            let failed = match error {
                Some(kind) => Some(kind.to_owned()),
                None if self.status >= 500 => Some(self.status.to_string()),
                None => None,
            };
            if let Some(kind) = failed {
                span.set(KeyValue::new("error.type", kind.clone()));
                span.fail(kind);
            }
            tracer.end(*span);
        }
    }

    /// `{"timestamp":..,"level":"INFO","target":"access",..}`, the shape of the other log lines.
    fn write_line(&self, elapsed: Duration, bytes: u64, error: Option<&'static str>) {
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        LINE.with_borrow_mut(|out| {
            out.clear();
            self.format_line(out, elapsed, bytes, error);
            crate::log::write_access(out);
        });
    }

    fn format_line(
        &self,
        out: &mut Vec<u8>,
        elapsed: Duration,
        bytes: u64,
        error: Option<&'static str>,
    ) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        crate::log::rfc3339_micros(out, SystemTime::now());
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"access\",\"direction\":\"");
        out.extend_from_slice(self.direction.as_bytes());
        out.extend_from_slice(b"\",\"target_service\":");
        json_str(out, &self.metrics.target);
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method.as_str());
        out.extend_from_slice(b",\"path\":");
        json_str(out, self.uri.path());
        out.extend_from_slice(b",\"version\":\"");
        out.extend_from_slice(version_str(self.version).as_bytes());
        out.extend_from_slice(b"\",\"status\":");
        push_u64(out, self.status.into());
        out.extend_from_slice(b",\"duration_ms\":");
        let micros = elapsed.as_micros() as u64;
        push_u64(out, micros / 1000);
        out.push(b'.');
        push_padded(out, micros % 1000, 3);
        out.extend_from_slice(b",\"bytes\":");
        push_u64(out, bytes);
        if let Some(kind) = error {
            out.extend_from_slice(b",\"error\":");
            json_str(out, kind);
        }
        if let Some(detail) = &self.detail {
            out.extend_from_slice(b",\"detail\":");
            json_str(out, detail);
        }
        if let Some(t) = &self.trace {
            out.extend_from_slice(&t.log_fields());
        }
        out.extend_from_slice(b"}\n");
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}

use crate::log::{push_padded, push_u64};

impl Drop for AccessRecord {
    fn drop(&mut self) {
        self.emit(0, Some("client_reset"));
    }
}

/// Turns failures into responses and accounts every request. Reads the [`Route`] the route
/// layer attached; without one, accounts to `fallback`.
#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
    direction: &'static str,
    fallback: Arc<TargetMetrics>,
    log: bool,
}

#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    direction: &'static str,
    fallback: Arc<TargetMetrics>,
    log: bool,
}

impl AccessLogLayer {
    pub fn new(direction: &'static str, fallback: Arc<TargetMetrics>, log: bool) -> Self {
        Self {
            direction,
            fallback,
            log,
        }
    }
}

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            direction: self.direction,
            fallback: self.fallback.clone(),
            log: self.log,
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for AccessLog<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let metrics = req
            .extensions()
            .get::<Route>()
            .map(|r| r.backend.metrics.clone())
            .unwrap_or_else(|| self.fallback.clone());
        let mut record = AccessRecord::start(self.direction, metrics, &req, self.log);
        record.trace(&mut req);
        let grpc = crate::grpc::is_grpc(&req);
        let direction = self.direction;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut rsp = match fut.await {
                Ok(rsp) => {
                    record.set_response(rsp.status().as_u16());
                    if record.span.is_some() {
                        record.fallback(rsp.extensions().get::<FallbackUsed>());
                    }
                    rsp
                }
                Err(e) => {
                    let mut rsp = e.respond(grpc);
                    // The caller's sidecar reads the marker; the agent never sees it.
                    if let (true, Some(reason)) = (direction == "inbound", e.refusal()) {
                        crate::refusal::mark(&mut rsp, reason);
                    }
                    record.set_error(e.status().as_u16(), &e);
                    rsp
                }
            };
            rsp.body_mut().attach_record(record);
            Ok(rsp)
        })
    }
}

/// Answers a request that failed before reaching any layer that accounts it.
pub fn reject<B>(
    direction: &'static str,
    metrics: Arc<TargetMetrics>,
    req: &Request<B>,
    err: ProxyError,
    log: bool,
) -> Response<ProxyBody> {
    let mut record = AccessRecord::start(direction, metrics, req, log);
    let mut rsp = err.respond(crate::grpc::is_grpc(req));
    record.set_error(err.status().as_u16(), &err);
    rsp.body_mut().attach_record(record);
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_line_is_one_json_object() {
        let metrics = TargetMetrics::new("outbound", "a", "critical", "b");
        let req = Request::get("/v1/x?q=1").body(()).unwrap();
        let mut record = AccessRecord::start("outbound", metrics, &req, true);
        record.log = true;
        record.set_error(
            503,
            &ProxyError::NoRoute {
                target: "c\"d".into(),
            },
        );
        let mut out = Vec::new();
        record.format_line(&mut out, Duration::from_micros(1500), 73, record.error);
        record.done = true;
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["target_service"], "b");
        assert_eq!(v["path"], "/v1/x");
        assert_eq!(v["status"], 503);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["bytes"], 73);
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["detail"], "no route to \"c\\\"d\"");
    }
}
