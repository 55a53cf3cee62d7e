//! Bounds the wait for a response head by the request's [`Deadline`] (the route's timeout, or
//! less when the caller asked for less), across every attempt; a timeout answers 504. A budget
//! of zero (`x-mesh-timeout-ms: 0`) is a deadline already passed: 504 at once, nothing sent.
//! Streamed bodies are not cut: a long LLM stream that started in time runs to its end.

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::outbound::deadline::Deadline;
use crate::state::Route;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use std::task::{Context, Poll};

#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer;

#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

impl<S, B> tower::Service<Request<B>> for Timeout<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(route) = req.extensions().get::<Route>() else {
            return Box::pin(self.inner.call(req));
        };
        let target = route.backend.name.clone();
        let (at, timeout) = match req.extensions().get::<Deadline>() {
            Some(d) => (d.at, d.budget),
            None => (tokio::time::Instant::now() + route.timeout, route.timeout),
        };
        if timeout.is_zero() {
            // `x-mesh-timeout-ms: 0`: the caller's deadline has passed; nothing is sent.
            return Box::pin(std::future::ready(Err(ProxyError::Timeout {
                target: target.to_string(),
                timeout,
            })));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(at, fut).await {
                Ok(res) => res,
                Err(_) => Err(ProxyError::Timeout {
                    target: target.to_string(),
                    timeout,
                }),
            }
        })
    }
}
