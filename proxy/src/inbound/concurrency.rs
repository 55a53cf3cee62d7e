//! Bounds the requests the local app handles at once. Beyond the limit, requests wait in a
//! bounded FIFO queue for a bounded time; a full queue or a long wait answers 503 with
//! `Retry-After`. A slot is held until the response body ends, so streams count.

use crate::body::ProxyBody;
use crate::bootstrap::Inbound;
use crate::errors::ProxyError;
use crate::metrics;
use crate::state::Route;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::ServiceExt;

#[derive(Debug)]
struct Limiter {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    queue_depth: usize,
    queue_timeout: Duration,
    depth_gauge: ::metrics::Gauge,
}

#[derive(Clone, Debug)]
pub struct ConcurrencyLayer {
    limiter: Arc<Limiter>,
}

#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

/// A place in the queue, given back on drop (also when the caller disconnects while waiting).
struct Queued<'a>(&'a Limiter);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let now = self.0.queued.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.depth_gauge.set(now as f64);
    }
}

impl ConcurrencyLayer {
    pub fn new(cfg: &Inbound) -> Self {
        Self {
            limiter: Arc::new(Limiter {
                slots: Arc::new(Semaphore::new(cfg.max_concurrency)),
                queued: AtomicUsize::new(0),
                queue_depth: cfg.queue_depth,
                queue_timeout: cfg.queue_timeout,
                depth_gauge: ::metrics::gauge!(metrics::INBOUND_QUEUE_DEPTH),
            }),
        }
    }
}

impl<S> tower::Layer<S> for ConcurrencyLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for ConcurrencyLimit<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let limiter = self.limiter.clone();
        if let Ok(permit) = limiter.slots.clone().try_acquire_owned() {
            let fut = self.inner.call(req);
            return Box::pin(async move {
                let mut rsp = fut.await?;
                rsp.body_mut().hold_permit(permit);
                Ok(rsp)
            });
        }
        let target = req
            .extensions()
            .get::<Route>()
            .map(|r| r.backend.name.to_string())
            .unwrap_or_default();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let depth = limiter.queued.fetch_add(1, Ordering::AcqRel) + 1;
            let queued = Queued(&limiter);
            limiter.depth_gauge.set(depth as f64);
            if depth > limiter.queue_depth {
                return Err(ProxyError::Overloaded {
                    target,
                    reason: "queue full",
                    retry_after: Duration::from_secs(1),
                });
            }
            let wait = limiter.slots.clone().acquire_owned();
            let permit = match tokio::time::timeout(limiter.queue_timeout, wait).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    return Err(ProxyError::Overloaded {
                        target,
                        reason: "queue timeout",
                        retry_after: limiter.queue_timeout.max(Duration::from_secs(1)),
                    })
                }
            };
            drop(queued);
            let mut rsp = inner.ready().await?.call(req).await?;
            rsp.body_mut().hold_permit(permit);
            Ok(rsp)
        })
    }
}
