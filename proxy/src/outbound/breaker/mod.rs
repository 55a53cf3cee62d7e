//! The target's circuit breaker as a layer: a request first checks the gate; while it is open
//! the target's fallback answers (`fallback.rs`) and nothing is sent. Admitted requests report
//! their outcome. Endpoint breakers use the same machine and are checked by the balancer.
//!
//! Two facts, judged in two places. *An attempt on one endpoint* failing says that endpoint is
//! unwell: it feeds the endpoint's own breaker and outlier ejection (`forward.rs`,
//! `balance.rs`, `eject.rs`), below the retry layer, and the balancer stops choosing it. *A
//! request as the caller saw it*, after retries moved it to other endpoints, failing while no
//! other endpoint of the target was usable says the target is unwell: only that feeds the
//! target's breaker, which sits above retries. A request that failed on one endpoint while
//! another was usable (a non-idempotent call cut on a dying replica, a request whose retries ran
//! out) is confined to that endpoint and counts for it alone ([`TargetOutcome`]).
//!
//! This is how linkerd separates failure accrual per endpoint (an endpoint the balancer no
//! longer sees as ready) from the route's view, where a service is unavailable only when no
//! endpoint is ready; and how Envoy keeps outlier detection per host apart from cluster-wide
//! circuit breaking. Counting attempts here let one dead replica, which ejection and retries
//! already hide, open the breaker for the whole target and refuse every caller. A target whose
//! every endpoint fails still opens it: once no endpoint is usable, failures are no longer
//! confined, and the balancer's own `BreakerOpen` (nothing to pick) counts as one.

pub mod consecutive_failures;
pub mod failure_ratio;
pub mod machine;

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::metrics;
use crate::outbound::classify::StatusSet;
use crate::outbound::deadline::Deadline;
use crate::outbound::fallback::Fallback;
use crate::outbound::retry::Tried;
use crate::outbound::settle::Settle;
use crate::state::{Backend, Route, State};
use crate::trace::FallbackUsed;
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

/// An admitted request's outcome on its way to the target's breaker. A failure confined to one
/// endpoint, while another endpoint of the target is usable, is that endpoint's business and
/// tells nothing about the target: it counts as neither success nor failure here.
#[derive(Debug)]
pub struct TargetOutcome {
    breaker: Arc<Breaker>,
    admit: Admit,
    backend: Arc<Backend>,
    /// The endpoint the request's last attempt went to.
    tried: Tried,
}

/// An admitted request whose outcome the breaker has not heard yet. Dropped unanswered, it
/// counts as a failure when its deadline had passed (a timeout) and as cancelled otherwise.
struct Pending {
    outcome: Option<TargetOutcome>,
    deadline: Option<Instant>,
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
            let outcome = TargetOutcome::new(breaker, admit, backend, &mut req);
            let deadline = request_deadline(&req);
            return guarded(outcome, deadline, self.inner.call(req));
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
                let mut rsp = answer.respond();
                rsp.extensions_mut().insert(FallbackUsed("static"));
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
                req.extensions_mut().insert(Route {
                    backend: alt.clone(),
                    timeout,
                    retry_non_idempotent: false,
                    client: None,
                });
                let answered = match admit {
                    Some((b, a)) => {
                        let outcome = TargetOutcome::new(b, a, alt, &mut req);
                        let deadline = request_deadline(&req);
                        guarded(outcome, deadline, self.inner.call(req))
                    }
                    None => Box::pin(self.inner.call(req)),
                };
                Box::pin(async move {
                    let mut res = answered.await;
                    if let Ok(rsp) = res.as_mut() {
                        rsp.extensions_mut().insert(FallbackUsed("target"));
                    }
                    res
                })
            }
        }
    }
}

/// When the request is given up on: the caller's deadline, across all attempts.
fn request_deadline<B>(req: &Request<B>) -> Option<Instant> {
    req.extensions().get::<Deadline>().map(|d| d.at)
}

fn guarded<F>(
    outcome: TargetOutcome,
    deadline: Option<Instant>,
    fut: F,
) -> BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>
where
    F: std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static,
{
    // Built before the future is first polled, so even a request dropped at once reports.
    let mut pending = Pending {
        outcome: Some(outcome),
        deadline,
    };
    Box::pin(async move {
        let mut res = fut.await;
        let Some(outcome) = pending.outcome.take() else {
            return res;
        };
        match (
            classify(&res, &outcome.backend.resilience.failures),
            res.as_mut(),
        ) {
            // A good head: the body's end decides.
            (Class::Success, Ok(rsp)) => rsp.body_mut().settle_at_end(Settle::Target(outcome)),
            (class, _) => outcome.record(class),
        }
        res
    })
}

/// How an attempt's result counts for breakers and ejection. A refusal the mesh marked
/// (`refusal.rs`) counts as neither success nor failure; a gRPC status in the head counts as
/// the HTTP status it stands for (`grpc.rs`).
pub fn classify(res: &Result<Response<ProxyBody>, ProxyError>, failures: &StatusSet) -> Class {
    match res {
        // Load the mesh shed (`refusal.rs`) says nothing about the target's health.
        Ok(rsp) if crate::refusal::is_refused(rsp) => Class::Cancelled,
        Ok(rsp) if failures.contains(crate::grpc::judged_status(rsp)) => Class::Failure,
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

// === impl TargetOutcome ===

impl TargetOutcome {
    /// Marks `req` so that the endpoint of its last attempt is known when it ends.
    fn new<B>(
        breaker: Arc<Breaker>,
        admit: Admit,
        backend: Arc<Backend>,
        req: &mut Request<B>,
    ) -> Self {
        let tried = Tried::new();
        req.extensions_mut().insert(tried.clone());
        Self {
            breaker,
            admit,
            backend,
            tried,
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn record(self, class: Class) {
        let last = self.tried.last();
        let class = match class {
            Class::Failure if self.backend.endpoints.usable_besides(last) => Class::Cancelled,
            // A probe that found every endpoint still out tried nothing: the endpoints' own
            // breakers decide when the upstream is tried again, and the next request probes.
            // Counted as a failure it would put the two breakers out of step and hold the
            // target shut for another cool-down after its endpoint had recovered.
            Class::Failure if self.admit == Admit::Probe && last.is_none() => Class::Cancelled,
            class => class,
        };
        self.breaker.record(self.admit, class);
    }
}

// === impl Pending ===

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome.take() {
            let timed_out = self.deadline.is_some_and(|d| d <= Instant::now());
            outcome.record(if timed_out {
                Class::Failure
            } else {
                Class::Cancelled
            });
        }
    }
}
