//! One access-log line and one set of metric updates per request, emitted when the response
//! body ends, or when the caller goes away first. Every request is accounted exactly once.

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::metrics::TargetMetrics;
use crate::state::Route;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

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
    log: bool,
    done: bool,
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
            log,
            done: false,
        }
    }

    pub fn set_response(&mut self, status: u16, error: Option<&'static str>) {
        self.status = status;
        self.error = error;
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
        if !self.log {
            return;
        }
        let duration_ms = elapsed.as_micros() as f64 / 1e3;
        let path = self.uri.path();
        match error {
            None => tracing::info!(
                target: "access",
                direction = self.direction,
                target_service = &*m.target,
                method = %self.method,
                path,
                version = ?self.version,
                status = self.status,
                duration_ms,
                bytes,
            ),
            Some(error) => tracing::info!(
                target: "access",
                direction = self.direction,
                target_service = &*m.target,
                method = %self.method,
                path,
                version = ?self.version,
                status = self.status,
                duration_ms,
                bytes,
                error,
            ),
        }
    }
}

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

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let metrics = req
            .extensions()
            .get::<Route>()
            .map(|r| r.backend.metrics.clone())
            .unwrap_or_else(|| self.fallback.clone());
        let mut record = AccessRecord::start(self.direction, metrics, &req, self.log);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut rsp = match fut.await {
                Ok(rsp) => {
                    record.set_response(rsp.status().as_u16(), None);
                    rsp
                }
                Err(e) => {
                    tracing::debug!(error = %e, "request failed");
                    let rsp = e.to_response();
                    record.set_response(rsp.status().as_u16(), Some(e.kind()));
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
    if log {
        tracing::warn!(error = %err, "request rejected");
    }
    let mut rsp = err.to_response();
    record.set_response(rsp.status().as_u16(), Some(err.kind()));
    rsp.body_mut().attach_record(record);
    rsp
}
