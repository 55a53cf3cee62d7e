//! The target's circuit breaker as a layer: a request first checks the gate; while it is open
//! the target's fallback answers (`fallback.rs`) and nothing is sent. Admitted requests report
//! their outcome. Endpoint breakers use the same machine and are checked by the balancer.
//!
//! Two facts, judged in two places. *An attempt on one endpoint* failing says that endpoint is
//! unwell: it feeds the endpoint's own breaker and outlier ejection (`forward.rs`,
//! `balance.rs`, `eject.rs`), below the retry layer, and the balancer stops choosing it. *A
//! request as the caller saw it*, after retries moved it to other endpoints, failing says the
//! target is unwell: only that feeds the target's breaker, which sits above retries. This is
//! how linkerd separates failure accrual per endpoint (an endpoint the balancer no longer sees
//! as ready) from what the route reports, and how Envoy keeps outlier detection per host apart
//! from cluster-wide limits. Counting attempts here would let one dead replica, which ejection
//! and retries already hide, open the breaker for the whole target and refuse every caller.
//! A target whose every endpoint fails still opens it: when no endpoint is usable, the attempt
//! ends in `BreakerOpen` from the balancer, which the request reports as a failure.

pub mod consecutive_failures;
pub mod failure_ratio;
pub mod machine;

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::metrics;
use crate::outbound::classify::StatusSet;
use crate::outbound::deadline::Deadline;
use crate::outbound::fallback::Fallback;
use crate::outbound::settle::Settle;
use crate::state::{Route, State};
use futures_util::future::BoxFuture;
use http::{Request, Response};
use machine::{Admit, Breaker, Class};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct BreakerLayer {
    state: Arc<State>,
}

#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    state: Arc<State>,
}

/// An admitted request whose outcome the breaker has not heard yet. Dropped unanswered, it
/// counts as a failure when its deadline had passed (a timeout) and as cancelled otherwise.
struct Pending {
    breaker: Arc<Breaker>,
    admit: Admit,
    deadline: Option<Instant>,
    done: bool,
}

impl BreakerLayer {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            state: self.state.clone(),
        }
    }
}

impl<S, B> tower::Service<Request<B>> for CircuitBreaker<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(route) = req.extensions().get::<Route>() else {
            return Box::pin(self.inner.call(req));
        };
        let backend = route.backend.clone();
        let timeout = route.timeout;
        let Some(breaker) = backend.resilience.breaker.clone() else {
            return Box::pin(self.inner.call(req));
        };
        if let Some(admit) = breaker.admit() {
            let failures = backend.resilience.failures;
            let deadline = request_deadline(&req);
            return guarded(breaker, admit, failures, deadline, self.inner.call(req));
        }
        ::metrics::counter!(metrics::BREAKER_SHORT_CIRCUITS, "target" => backend.name.to_string())
            .increment(1);
        let open = ProxyError::BreakerOpen {
            target: backend.name.to_string(),
            retry_after: breaker.retry_after(),
        };
        match &backend.resilience.fallback {
            Fallback::Unavailable => Box::pin(async move { Err(open) }),
            Fallback::Static(answer) => {
                let rsp = answer.respond();
                Box::pin(async move { Ok(rsp) })
            }
            Fallback::Target(name) => {
                let table = self.state.load();
                let Some(alt) = table.backend(name).cloned() else {
                    return Box::pin(async move { Err(open) });
                };
                let admit = match &alt.resilience.breaker {
                    None => None,
                    Some(b) => match b.admit() {
                        Some(a) => Some((b.clone(), a)),
                        // The fallback is down too: the caller gets the first breaker's answer.
                        None => return Box::pin(async move { Err(open) }),
                    },
                };
                let failures = alt.resilience.failures;
                req.extensions_mut().insert(Route {
                    backend: alt,
                    timeout,
                    retry_non_idempotent: false,
                });
                match admit {
                    Some((b, a)) => {
                        let deadline = request_deadline(&req);
                        guarded(b, a, failures, deadline, self.inner.call(req))
                    }
                    None => Box::pin(self.inner.call(req)),
                }
            }
        }
    }
}

/// When the request is given up on: the caller's deadline, across all attempts.
fn request_deadline<B>(req: &Request<B>) -> Option<Instant> {
    req.extensions().get::<Deadline>().map(|d| d.at)
}

fn guarded<F>(
    breaker: Arc<Breaker>,
    admit: Admit,
    failures: StatusSet,
    deadline: Option<Instant>,
    fut: F,
) -> BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>
where
    F: std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static,
{
    // Built before the future is first polled, so even a request dropped at once reports.
    let mut pending = Pending {
        breaker,
        admit,
        deadline,
        done: false,
    };
    Box::pin(async move {
        let mut res = fut.await;
        pending.done = true;
        match (classify(&res, &failures), res.as_mut()) {
            // A good head: the body's end decides.
            (Class::Success, Ok(rsp)) => rsp
                .body_mut()
                .settle_at_end(Settle::Target(pending.breaker.clone(), pending.admit)),
            (class, _) => pending.breaker.record(pending.admit, class),
        }
        res
    })
}

/// How an attempt's result counts for breakers and ejection.
pub fn classify(res: &Result<Response<ProxyBody>, ProxyError>, failures: &StatusSet) -> Class {
    match res {
        Ok(rsp) if failures.contains(rsp.status().as_u16()) => Class::Failure,
        Ok(_) => Class::Success,
        Err(
            ProxyError::Unavailable { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::BreakerOpen { .. },
        ) => Class::Failure,
        Err(_) => Class::Cancelled,
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let timed_out = self.deadline.is_some_and(|d| d <= Instant::now());
            let class = if timed_out {
                Class::Failure
            } else {
                Class::Cancelled
            };
            self.breaker.record(self.admit, class);
        }
    }
}
