//! The caller's deadline: how long the whole exchange may take, every attempt included. It is
//! the route's timeout, shortened by an `x-mesh-timeout-ms` header (or a gRPC call's
//! `grpc-timeout`) when the caller sent one, and each hop passes the budget left on in the same
//! header (and in `grpc-timeout` when the call had one, so the app's gRPC server sees its real
//! deadline), so a chain of agents never waits longer than the first caller will.

use crate::grpc::{self, GRPC_TIMEOUT};
use http::{HeaderName, HeaderValue, Request, Version};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// The remaining budget, in milliseconds, that a request carries to the next hop.
pub const TIMEOUT_HEADER: HeaderName = HeaderName::from_static("x-mesh-timeout-ms");

/// When the caller stops waiting; set by [`DeadlineLayer`], read by the timeout, retry and
/// forward steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    /// The budget the request started with, for error messages.
    pub budget: Duration,
    /// The call carried `grpc-timeout`, which is rewritten to the budget left at each hop.
    pub grpc: bool,
}

impl Deadline {
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Writes the budget left into the request for the next hop (at least 1 ms: a zero would
    /// read as "no budget" and a timeout is imminent anyway).
    pub fn propagate(&self, headers: &mut http::HeaderMap) {
        let ms = self.remaining().as_millis().max(1) as u64;
        headers.insert(TIMEOUT_HEADER, header_value(ms));
        if self.grpc {
            // At most 8 digits: 99999999 ms is over a day.
            let v = format!("{}m", ms.min(99_999_999));
            headers.insert(
                GRPC_TIMEOUT,
                HeaderValue::try_from(v).expect("digits and a unit"),
            );
        }
    }
}

thread_local! {
    /// The last value written on this thread: requests of one route mostly leave with the same
    /// budget, and a cached value is a reference count instead of an allocation.
    static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> = const { std::cell::RefCell::new(None) };
}

fn header_value(ms: u64) -> HeaderValue {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((cached, v)) if *cached == ms => v.clone(),
            _ => {
                let v = HeaderValue::from(ms);
                *last = Some((ms, v.clone()));
                v
            }
        }
    })
}

/// The budget a caller asked for, if its header is well formed; the smallest, when it sent
/// the header more than once (the next hop gets one value either way).
pub fn requested(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get_all(TIMEOUT_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .min()
        .map(Duration::from_millis)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

/// Sets the request's [`Deadline`] from its route's timeout and the caller's header.
#[derive(Clone, Debug)]
pub struct SetDeadline<S> {
    inner: S,
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = SetDeadline<S>;

    fn layer(&self, inner: S) -> SetDeadline<S> {
        SetDeadline { inner }
    }
}

impl<S, B> tower::Service<Request<B>> for SetDeadline<S>
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
        let route_timeout = req
            .extensions()
            .get::<crate::state::Route>()
            .map(|r| r.timeout);
        // A malformed header is ignored rather than refused: the route's timeout still holds.
        let mut asked = requested(req.headers());
        // Only HTTP/2 requests can be gRPC calls; HTTP/1.1 ones skip the lookup.
        let grpc_asked = (req.version() == Version::HTTP_2)
            .then(|| grpc::timeout(req.headers()))
            .flatten();
        if let Some(g) = grpc_asked {
            asked = Some(asked.map_or(g, |a| a.min(g)));
        }
        let budget = match (route_timeout, asked) {
            (Some(t), Some(a)) => Some(t.min(a)),
            (t, a) => t.or(a),
        };
        if let Some(budget) = budget {
            req.extensions_mut().insert(Deadline {
                at: Instant::now() + budget,
                budget,
                grpc: grpc_asked.is_some(),
            });
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn propagates_what_is_left() {
        let d = Deadline {
            at: Instant::now() + Duration::from_millis(1000),
            budget: Duration::from_millis(1000),
            grpc: true,
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut h = http::HeaderMap::new();
        d.propagate(&mut h);
        assert_eq!(h[TIMEOUT_HEADER], "700");
        assert_eq!(h[GRPC_TIMEOUT], "700m");
        assert_eq!(requested(&h), Some(Duration::from_millis(700)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        d.propagate(&mut h);
        assert_eq!(h[TIMEOUT_HEADER], "1");
    }

    #[test]
    fn the_smallest_of_several_budgets_holds() {
        let mut h = http::HeaderMap::new();
        h.append(TIMEOUT_HEADER, HeaderValue::from_static("60000"));
        h.append(TIMEOUT_HEADER, HeaderValue::from_static("soon"));
        h.append(TIMEOUT_HEADER, HeaderValue::from_static("5000"));
        assert_eq!(requested(&h), Some(Duration::from_millis(5000)));
    }

    #[test]
    fn malformed_header_is_ignored() {
        let mut h = http::HeaderMap::new();
        h.insert(TIMEOUT_HEADER, HeaderValue::from_static("soon"));
        assert_eq!(requested(&h), None);
    }
}
