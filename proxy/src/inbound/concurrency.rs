//! Bounds the requests the local app handles at once. Beyond the limit, requests wait in a
//! bounded FIFO queue for a bounded time; a full queue or a long wait answers 503 with
//! `Retry-After`. A slot is held until the response body ends, so streams count. One client
//! address holds at most `max_client_share` of the slots (`clients.rs`): beyond it, its
//! requests wait in the queue even while slots are free, which keeps the rest for others.

use crate::body::ProxyBody;
use crate::bootstrap::Inbound;
use crate::errors::ProxyError;
use crate::inbound::clients::ClientPermit;
use crate::metrics;
use crate::state::Route;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// The inbound limit in force, after the snapshot's budget.
pub const INBOUND_CONCURRENCY_LIMIT: &str = "agent_inbound_concurrency_limit";

#[derive(Debug)]
struct Limiter {
    /// The limit in force; written only by [`Resize`], never on the request path.
    size: std::sync::Mutex<usize>,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    queue_depth: usize,
    queue_timeout: Duration,
    depth_gauge: ::metrics::Gauge,
    /// Share of the limit one client address may hold, and that share in slots.
    client_share: f64,
    per_client: AtomicU32,
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
                size: std::sync::Mutex::new(cfg.max_concurrency),
                slots: Arc::new(Semaphore::new(cfg.max_concurrency)),
                queued: AtomicUsize::new(0),
                queue_depth: cfg.queue_depth,
                queue_timeout: cfg.queue_timeout,
                depth_gauge: ::metrics::gauge!(metrics::INBOUND_QUEUE_DEPTH),
                client_share: cfg.max_client_share,
                per_client: AtomicU32::new(per_client(cfg.max_concurrency, cfg.max_client_share)),
            }),
        }
    }
}

impl ConcurrencyLayer {
    /// A handle that changes the limit of every service this layer builds.
    pub fn resizer(&self) -> Resize {
        Resize(self.limiter.clone())
    }
}

/// Changes the inbound limit without touching the request path: permits are added, or
/// forgotten as they come free.
#[derive(Clone, Debug)]
pub struct Resize(Arc<Limiter>);

impl Resize {
    pub fn resize(&self, limit: usize) {
        let limit = limit.max(1);
        let mut size = self.0.size.lock().unwrap_or_else(|e| e.into_inner());
        if limit > *size {
            self.0.slots.add_permits(limit - *size);
        } else if limit < *size {
            let excess = *size - limit;
            let forgotten = self.0.slots.forget_permits(excess);
            if forgotten < excess {
                // The rest are in use: take them out as requests finish.
                let slots = self.0.slots.clone();
                let owed = (excess - forgotten) as u32;
                tokio::spawn(async move {
                    if let Ok(p) = slots.acquire_many_owned(owed).await {
                        p.forget();
                    }
                });
            }
        }
        if *size != limit {
            tracing::info!(from = *size, to = limit, "inbound concurrency resized");
        }
        *size = limit;
        self.0
            .per_client
            .store(per_client(limit, self.0.client_share), Ordering::Relaxed);
        ::metrics::gauge!(INBOUND_CONCURRENCY_LIMIT).set(limit as f64);
    }

    pub fn limit(&self) -> usize {
        *self.0.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the snapshot in force: its budget sets the limit; without one, `fallback`
    /// (the bootstrap's `max_concurrency`) does.
    pub async fn follow_budget(
        self,
        state: Arc<crate::state::State>,
        fallback: usize,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut versions = state.versions();
        loop {
            let budget = state.load().snapshot.budget;
            self.resize(budget.map_or(fallback, |b| b.inbound_concurrency()));
            tokio::select! {
                res = versions.changed() => if res.is_err() { return },
                _ = crate::drain::stopped(&mut stop) => return,
            }
        }
    }
}

/// Slots one client address may hold: its share of `limit`, at least one.
fn per_client(limit: usize, share: f64) -> u32 {
    ((limit as f64 * share).ceil() as u32).max(1)
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
        let route = req.extensions().get::<Route>();
        let client = route.and_then(|r| r.client.clone());
        let per_client = limiter.per_client.load(Ordering::Relaxed);
        // The address's place first: without it, a free slot is not this request's to take.
        let place = client.as_ref().map(|c| c.try_take(per_client));
        if !matches!(place, Some(None)) {
            if let Ok(permit) = limiter.slots.clone().try_acquire_owned() {
                let fut = self.inner.call(req);
                return Box::pin(async move {
                    let mut rsp = fut.await?;
                    hold(rsp.body_mut(), permit, place.flatten());
                    Ok(rsp)
                });
            }
        }
        let target = route
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
            let wait = async {
                let place = match (place.flatten(), &client) {
                    (Some(p), _) => Some(p),
                    (None, Some(c)) => Some(c.take(per_client).await),
                    (None, None) => None,
                };
                (limiter.slots.clone().acquire_owned().await, place)
            };
            let (permit, place) = match tokio::time::timeout(limiter.queue_timeout, wait).await {
                Ok((Ok(permit), place)) => (permit, place),
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
            hold(rsp.body_mut(), permit, place);
            Ok(rsp)
        })
    }
}

/// The slot and the address's place live as long as the response body.
fn hold(
    body: &mut ProxyBody,
    permit: tokio::sync::OwnedSemaphorePermit,
    place: Option<ClientPermit>,
) {
    body.hold_permit(permit);
    if let Some(place) = place {
        body.hold_client(place);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: usize) -> ConcurrencyLayer {
        ConcurrencyLayer::new(&Inbound {
            max_concurrency: n,
            ..Inbound::default()
        })
    }

    #[tokio::test]
    async fn resize_adds_and_forgets_permits() {
        let l = layer(4);
        let r = l.resizer();
        r.resize(10);
        assert_eq!(l.limiter.slots.available_permits(), 10);
        r.resize(3);
        assert_eq!(l.limiter.slots.available_permits(), 3);
    }

    #[tokio::test]
    async fn shrinking_below_the_permits_in_use_takes_them_back_as_they_free() {
        let l = layer(4);
        let held = l.limiter.slots.clone().acquire_many_owned(4).await.unwrap();
        l.resizer().resize(1);
        assert_eq!(l.limiter.slots.available_permits(), 0);
        // The four requests finish: three permits go to the debt, one stays.
        drop(held);
        tokio::task::yield_now().await;
        assert_eq!(l.limiter.slots.available_permits(), 1);
    }
}
