//! Retries: a failed attempt is sent again, after an exponential backoff with full jitter, to
//! another endpoint when there is one, while the target's budget and the caller's deadline
//! allow. A request that never left (connect refused, turned away unwritten) is always safe to
//! send again and goes at once, without the backoff. Otherwise only when it is safe: an
//! idempotent method, a service with `non_idempotent = true`, a route rule with
//! `retry_non_idempotent = true`, or a request carrying `x-mesh-retryable: true`.
//! The body must be small enough to keep (`max_body_bytes`): a body of known length is read
//! whole first; one of unknown length streams to the first attempt at once and is kept on the
//! side (`tee.rs`) until it outgrows the bound, after which it is not retried. A retry is
//! decided on the response head, before anything reaches the caller.
//!
//! Retries sit below the target's breaker: an attempt they move to another endpoint is not a
//! failure the caller sees, and the target's breaker never hears of it.

pub mod budget;

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::metrics;
use crate::outbound::classify::StatusSet;
use crate::outbound::deadline::Deadline;
use crate::outbound::replay::RequestBody;
use crate::outbound::tee::Tee;
use crate::state::Route;
use budget::Budget;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceExt;

/// A caller's opt-in to retries of a non-idempotent request; removed before forwarding.
pub const RETRYABLE_HEADER: HeaderName = HeaderName::from_static("x-mesh-retryable");

/// Retry parameters of one target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub per_try_timeout: Option<Duration>,
    pub max_body_bytes: u64,
    pub statuses: StatusSet,
    pub non_idempotent: bool,
}

/// A target's retry parameters and its budget.
#[derive(Debug)]
pub struct Policy {
    pub params: Params,
    pub budget: Budget,
}

/// Which endpoint (index in the target's set) the latest attempt went to; forward reads it to
/// send the next attempt elsewhere and writes it when it picks, and the target's breaker reads
/// it when the request ends.
#[derive(Clone, Debug)]
pub struct Tried(pub Arc<AtomicUsize>);

// === impl Tried ===

impl Tried {
    pub fn new() -> Self {
        Self(Arc::new(AtomicUsize::new(usize::MAX)))
    }

    /// The endpoint of the latest attempt, if one was picked.
    pub fn last(&self) -> Option<usize> {
        Some(self.0.load(Relaxed)).filter(|&i| i != usize::MAX)
    }
}

impl Default for Tried {
    fn default() -> Self {
        Self::new()
    }
}

/// When the current attempt gives up (the per-try timeout), for layers below that classify an
/// attempt dropped unanswered.
#[derive(Clone, Copy, Debug)]
pub struct TryDeadline(pub Instant);

#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer;

#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner }
    }
}

impl<S> tower::Service<Request<Incoming>> for Retry<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<ProxyBody>, Error = ProxyError>
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
        let route = req.extensions().get::<Route>();
        let policy = route
            .and_then(|r| r.backend.resilience.retry.clone())
            .filter(|p| p.params.max_attempts > 1);
        let Some(policy) = policy else {
            return Box::pin(self.inner.call(req.map(RequestBody::from)));
        };
        let target = route.map(|r| r.backend.name.clone()).unwrap_or_default();
        let route_opt_in = route.is_some_and(|r| r.retry_non_idempotent);
        policy.budget.deposit();
        let (mut parts, body) = req.into_parts();
        let opted_in = parts
            .headers
            .remove(RETRYABLE_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let safe =
            idempotent(&parts.method) || policy.params.non_idempotent || route_opt_in || opted_in;
        let max = policy.params.max_body_bytes;
        let upper = body.size_hint().upper();
        let kept = if parts.headers.contains_key(http::header::UPGRADE) {
            None
        } else if body.is_end_stream() || upper.is_some_and(|u| u <= max) {
            Some(false)
        } else if upper.is_none() {
            // Unknown length: stream it and keep a copy while it stays under the bound.
            Some(true)
        } else {
            None
        };
        // The service polled ready is the one to call; the clone waits for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(tee) = kept else {
            return Box::pin(inner.call(Request::from_parts(parts, body.into())));
        };
        Box::pin(async move {
            let kept = if tee {
                Kept::Tee(Tee::new(body, max))
            } else if body.is_end_stream() {
                // Most requests (GETs) have no body: nothing to read or keep.
                Kept::Whole(Bytes::new(), None)
            } else {
                let collected = Limited::new(body, max as usize)
                    .collect()
                    .await
                    .map_err(|e| ProxyError::RequestBody {
                        target: target.to_string(),
                        reason: e.to_string(),
                    })?;
                let trailers = collected.trailers().cloned();
                Kept::Whole(collected.to_bytes(), trailers)
            };
            // The target's breaker above may already watch where the attempts go.
            let tried = match parts.extensions.get::<Tried>() {
                Some(t) => t.clone(),
                None => {
                    let t = Tried::new();
                    parts.extensions.insert(t.clone());
                    t
                }
            };
            // A sampled request records its attempts as children of its client span, once
            // there is a second one: a lone attempt says nothing its client span does not.
            let attempts = crate::trace::attempt::Attempts::of(&parts.extensions);
            let mut first_attempt = None;
            let again = Again::new(&parts, tried);
            let deadline = again.deadline;
            let p = policy.params;
            let mut attempt = 1;
            let mut body = kept.first();
            // The first attempt takes the caller's parts; a retry rebuilds them from `again`.
            let mut first = Some(parts);
            let res = loop {
                let parts = first.take().unwrap_or_else(|| again.parts());
                let mut req = Request::from_parts(parts, body);
                let per_try = p.per_try_timeout.map(|t| (t, Instant::now() + t));
                if let Some((_, until)) = per_try {
                    req.extensions_mut().insert(TryDeadline(until));
                }
                let span = attempts.as_ref().map(|a| a.start(attempt));
                let sent = async {
                    let mut res = inner.ready().await?.call(req).await;
                    if let Ok(rsp) = res.as_mut() {
                        if let Err(e) = read_small(rsp, &p, &target).await {
                            res = Err(e);
                        }
                    }
                    res
                };
                let res =
                    match per_try {
                        Some((t, until)) => tokio::time::timeout_at(until, sent)
                            .await
                            .unwrap_or_else(|_| {
                                Err(ProxyError::Timeout {
                                    target: target.to_string(),
                                    timeout: t,
                                })
                            }),
                        None => sent.await,
                    };
                if let (Some(a), Some(span)) = (&attempts, span) {
                    let span = a.finish(span, &res, again.route.as_ref(), &again.tried);
                    match attempt {
                        1 => first_attempt = Some(span),
                        _ => a.send(span),
                    }
                }
                if attempt >= p.max_attempts
                    || !should_retry(&res, safe, &p.statuses)
                    || !kept.replayable()
                {
                    break res;
                }
                if !policy.budget.withdraw() {
                    ::metrics::counter!(metrics::RETRY_BUDGET_EXHAUSTED, "target" => target.to_string())
                        .increment(1);
                    break res;
                }
                // A request that never left goes to another endpoint at once: waiting spares
                // no one, the endpoint that refused it is already out of the balancer. A
                // refusal for load waits as long as the mesh asked, not the backoff.
                let backoff = if never_left(&res) {
                    Duration::ZERO
                } else {
                    res.as_ref()
                        .ok()
                        .and_then(crate::refusal::retry_after)
                        .unwrap_or_else(|| full_jitter(&p, attempt))
                };
                if deadline.is_some_and(|d| d.remaining() <= backoff) {
                    break res;
                }
                // Taking the next attempt's body supersedes the failed one's.
                let Some(next) = kept.next() else { break res };
                // The failed answer is dropped unread: nothing of it reached the caller.
                drop(res);
                if let (Some(a), Some(span)) = (&attempts, first_attempt.take()) {
                    a.send(span);
                }
                ::metrics::counter!(metrics::RETRIES_TOTAL, "target" => target.to_string())
                    .increment(1);
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                }
                body = next;
                attempt += 1;
            };
            kept.release();
            res
        })
    }
}

/// What a retry needs to rebuild the request head. Only the extensions the layers below read
/// are carried over: cloning the whole `Extensions` map costs an allocation per value.
struct Again {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
    route: Option<Route>,
    deadline: Option<Deadline>,
    tried: Tried,
}

// === impl Again ===

impl Again {
    fn new(parts: &http::request::Parts, tried: Tried) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            route: parts.extensions.get::<Route>().cloned(),
            deadline: parts.extensions.get::<Deadline>().copied(),
            tried,
        }
    }

    fn parts(&self) -> http::request::Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = self.headers.clone();
        if let Some(route) = &self.route {
            parts.extensions.insert(route.clone());
        }
        if let Some(deadline) = self.deadline {
            parts.extensions.insert(deadline);
        }
        parts.extensions.insert(self.tried.clone());
        parts
    }
}

/// A request body kept for replay: whole (known small length, read before the first attempt)
/// or teed (unknown length, kept while the first attempt streams it).
enum Kept {
    Whole(Bytes, Option<HeaderMap>),
    Tee(Tee<Incoming>),
}

// === impl Kept ===

impl Kept {
    fn first(&self) -> RequestBody {
        match self {
            Kept::Whole(data, trailers) => RequestBody::replay(data.clone(), trailers.clone()),
            Kept::Tee(t) => RequestBody::Tee(t.attempt().expect("a fresh tee has a first attempt")),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Kept::Whole(..) => true,
            Kept::Tee(t) => t.replayable(),
        }
    }

    fn next(&self) -> Option<RequestBody> {
        match self {
            Kept::Whole(..) => Some(self.first()),
            Kept::Tee(t) => t.attempt().map(RequestBody::Tee),
        }
    }

    /// No more attempts: a tee stops keeping its copy for the rest of the stream.
    fn release(&self) {
        if let Kept::Tee(t) = self {
            t.release();
        }
    }
}

/// RFC 9110 9.2.2: methods whose repetition has the same effect as one request.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn should_retry(
    res: &Result<Response<ProxyBody>, ProxyError>,
    safe: bool,
    statuses: &StatusSet,
) -> bool {
    match res {
        Ok(rsp) => safe && statuses.contains(rsp.status().as_u16()),
        // A connect failure means the request never left: safe for any method.
        Err(ProxyError::Unavailable { .. }) => true,
        Err(ProxyError::UpstreamFailed { .. }) | Err(ProxyError::Timeout { .. }) => safe,
        Err(_) => false,
    }
}

/// Reads an answer of known length up to `max_body_bytes` whole before it reaches the caller:
/// an upstream that dies between the head and the end of such an answer (a replica killed
/// mid-response) then costs a retry, or when none is left or allowed, a clear `502
/// upstream_failed` rather than a broken answer. Streams, and answers of unknown or larger
/// length, go to the caller frame by frame as they come.
async fn read_small(
    rsp: &mut Response<ProxyBody>,
    p: &Params,
    target: &str,
) -> Result<(), ProxyError> {
    let len = match rsp.body().size_hint().exact() {
        Some(n) if n > 0 && n <= p.max_body_bytes => n as usize,
        _ => return Ok(()),
    };
    // A status that is retried anyway is dropped unread.
    if p.statuses.contains(rsp.status().as_u16()) {
        return Ok(());
    }
    rsp.body_mut()
        .read_whole(len)
        .await
        .map_err(|e| ProxyError::UpstreamFailed {
            target: target.to_owned(),
            reason: format!("response body: {e}"),
        })
}

/// The attempt failed before any of the request was sent (connect refused, or turned away
/// unwritten).
fn never_left(res: &Result<Response<ProxyBody>, ProxyError>) -> bool {
    matches!(res, Err(ProxyError::Unavailable { .. }))
}

/// A random wait in [0, min(max_backoff, backoff * 2^(attempt-1))] ("full jitter"), so
/// callers that failed together do not retry together.
fn full_jitter(p: &Params, attempt: u32) -> Duration {
    let cap = p
        .backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(p.max_backoff);
    cap.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            max_attempts: 5,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            per_try_timeout: None,
            max_body_bytes: 64,
            statuses: StatusSet::new(&[503]),
            non_idempotent: false,
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = params();
        for _ in 0..200 {
            assert!(full_jitter(&p, 1) <= Duration::from_millis(10));
            assert!(full_jitter(&p, 2) <= Duration::from_millis(20));
            assert!(full_jitter(&p, 4) <= Duration::from_millis(50));
        }
        // Full jitter spreads over the whole range.
        let spread: Vec<_> = (0..200).map(|_| full_jitter(&p, 4)).collect();
        assert!(spread.iter().any(|d| *d < Duration::from_millis(10)));
        assert!(spread.iter().any(|d| *d > Duration::from_millis(40)));
    }

    #[test]
    fn only_safe_requests_retry_on_status_but_unsent_ones_always() {
        let s = StatusSet::new(&[503]);
        let rsp = |code: u16| {
            let mut r = Response::new(ProxyBody::empty());
            *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
            Ok(r)
        };
        assert!(should_retry(&rsp(503), true, &s));
        assert!(!should_retry(&rsp(503), false, &s));
        assert!(!should_retry(&rsp(500), true, &s));
        let unsent = Err(ProxyError::Unavailable {
            target: "b".into(),
            reason: "refused".into(),
        });
        assert!(should_retry(&unsent, false, &s));
        let reset = Err(ProxyError::UpstreamFailed {
            target: "b".into(),
            reason: "reset".into(),
        });
        assert!(!should_retry(&reset, false, &s));
    }

    #[test]
    fn idempotent_methods() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }
}
