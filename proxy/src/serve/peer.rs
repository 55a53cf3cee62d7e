//! Who called, as the connection proved it: on a listener that answers mutual TLS, every
//! request carries a [`Caller`] extension naming the agent whose certificate the connection
//! verified, or none for a plaintext connection. Listeners without TLS add nothing.

use http::Request;
use hyper::body::Incoming;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The verified calling agent of a request (`None`: the connection is plaintext).
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<str>>);

#[derive(Clone, Debug)]
pub struct PeerService<S> {
    inner: S,
    /// Whether this listener tells (it answers TLS).
    tagged: bool,
    caller: Option<Arc<str>>,
}

// === impl PeerService ===

impl<S> PeerService<S> {
    pub fn new(inner: S, tagged: bool, caller: Option<Arc<str>>) -> Self {
        Self {
            inner,
            tagged,
            caller,
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for PeerService<S>
where
    S: tower::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        if self.tagged {
            req.extensions_mut().insert(Caller(self.caller.clone()));
        }
        self.inner.call(req)
    }
}
