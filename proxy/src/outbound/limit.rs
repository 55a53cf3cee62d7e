//! The caller-side rate limit on Ollama calls: a token bucket per agent (`governor`), sized by
//! the snapshot's rate for this agent: its own, else the one its budget carries (derived by the
//! control process from the phase budget), else its phase's. The rate is resolved when the
//! snapshot is compiled (`Backend::ollama_rate`), so other targets pay one field check. Over the limit, the call is
//! answered 429 with `Retry-After` here and never leaves the host. Listing endpoints
//! (`/api/tags`, `/api/version`, `/api/ps`) are not counted.

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::inbound::ollama::limits::Api;
use crate::metrics;
use crate::state::Route;
use arc_swap::ArcSwapOption;
use futures_util::future::{self, Either, Ready};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Request, Response};
use hyper::body::Incoming;
use mesh_config::ollama::Rate;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Replaced only when the rate changes, so a new snapshot does not refill the bucket.
    bucket: ArcSwapOption<Bucket>,
    limited: ::metrics::Counter,
}

/// A token bucket for one rate: bursts of `count`, refilled one token per `per / count`.
#[derive(Debug)]
struct Bucket {
    rate: Rate,
    limiter: DefaultDirectRateLimiter,
}

// === impl RateLimitLayer ===

impl RateLimitLayer {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                bucket: ArcSwapOption::empty(),
                limited: ::metrics::counter!(metrics::OLLAMA_RATE_LIMITED),
            }),
        }
    }
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

// === impl RateLimit ===

impl<S> tower::Service<Request<Incoming>> for RateLimit<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, Ready<Result<Response<ProxyBody>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        match self.shared.check(&req) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(e) => Either::Right(future::ready(Err(e))),
        }
    }
}

// === impl Shared ===

impl Shared {
    fn check<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        let Some(route) = req.extensions().get::<Route>() else {
            return Ok(());
        };
        let Some(rate) = route.backend.ollama_rate else {
            return Ok(());
        };
        if Api::of(req.uri().path()) == Api::Bypass {
            return Ok(());
        }
        let bucket = match self.bucket.load_full() {
            Some(b) if b.rate == rate => b,
            _ => {
                let b = Arc::new(Bucket::new(rate));
                self.bucket.store(Some(b.clone()));
                b
            }
        };
        bucket.check().map_err(|retry_after| {
            self.limited.increment(1);
            ProxyError::RateLimited {
                target: route.backend.name.to_string(),
                retry_after,
            }
        })
    }
}

// === impl Bucket ===

impl Bucket {
    fn new(rate: Rate) -> Self {
        let period = (rate.per / rate.count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("the period is not zero")
            .allow_burst(rate.count);
        Self {
            rate,
            limiter: RateLimiter::direct(quota),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_says_when_to_retry() {
        let bucket = Bucket::new("2/s".parse().unwrap());
        assert!(bucket.check().is_ok());
        assert!(bucket.check().is_ok());
        let wait = bucket.check().unwrap_err();
        // One token comes back every half second.
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }
}
