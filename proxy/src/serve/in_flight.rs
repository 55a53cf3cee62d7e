//! Counts the requests open on one connection, so a drain can close a connection as soon as it
//! holds none, whatever its peer does with GOAWAY and PING. A request counts from the moment the
//! stack is called until its response body is finished or dropped.

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::Notify;

/// One connection's open requests.
#[derive(Debug, Default)]
pub struct Requests {
    open: AtomicUsize,
    idle: Notify,
}

/// A request counted open; dropping it closes it.
#[derive(Debug)]
pub struct Open(Arc<Requests>);

/// The connection's service with every request counted.
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    requests: Arc<Requests>,
}

pin_project_lite::pin_project! {
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        open: Option<Open>,
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted until it ends or is dropped.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        open: Option<Open>,
    }
}

// === impl Requests ===

impl Requests {
    fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::SeqCst);
        Open(self.clone())
    }

    /// Resolves once no request is open on the connection.
    pub async fn none_open(&self) {
        loop {
            let idle = self.idle.notified();
            if self.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Lock-free while nobody waits: it only stores a permit.
            self.0.idle.notify_one();
        }
    }
}

// === impl Counted ===

impl<S> Counted<S> {
    pub fn new(inner: S, requests: Arc<Requests>) -> Self {
        Self { inner, requests }
    }
}

impl<S, ReqB, B> tower::Service<Request<ReqB>> for Counted<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        CountedFuture {
            open: Some(self.requests.open()),
            inner: self.inner.call(req),
        }
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = ready!(this.inner.poll(cx))?;
        let open = this.open.take();
        Poll::Ready(Ok(rsp.map(|inner| CountedBody { inner, open })))
    }
}

// === impl CountedBody ===

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            *this.open = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `fut` once: whether it is still waiting.
    async fn pending<F: std::future::Future>(mut fut: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
    }
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{Service, ServiceExt};

    #[tokio::test]
    async fn a_request_is_open_until_its_body_is_done() {
        let requests = Arc::new(Requests::default());
        let mut svc = Counted::new(
            tower::service_fn(|_: Request<()>| async {
                Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("hi"))))
            }),
            requests.clone(),
        );
        let rsp = svc.ready().await.unwrap().call(Request::new(())).await;
        let body = rsp.unwrap().into_body();
        // The answer's head is out, its body is not: still open.
        assert_eq!(requests.open.load(Ordering::SeqCst), 1);
        let mut none_open = std::pin::pin!(requests.none_open());
        assert!(pending(none_open.as_mut()).await);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hi");
        none_open.await;
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_answer_closes() {
        let requests = Arc::new(Requests::default());
        let mut svc = Counted::new(
            tower::service_fn(|_: Request<()>| std::future::pending::<Result<Response<()>, ()>>()),
            requests.clone(),
        );
        let fut = svc.call(Request::new(()));
        assert_eq!(requests.open.load(Ordering::SeqCst), 1);
        drop(fut);
        requests.none_open().await;
    }
}
