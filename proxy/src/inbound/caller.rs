//! The first inbound step: who is calling. Over mutual TLS the caller is the agent the
//! connection's certificate names: any `x-mesh-caller` (or `x-forwarded-client-cert`) the
//! caller sent is dropped and `x-mesh-caller` set from the certificate, so the app and the
//! Ollama gateway rank and log the verified caller. A plaintext caller, on a sidecar that
//! answers TLS, is refused with 403 `mtls_required` when the mesh is `strict`. When it is
//! `permissive` the call is served and counted, but what it claims is not believed: its
//! `x-mesh-caller` is dropped, so the app, the authorization policy and the Ollama gateway see
//! an anonymous caller (Istio's permissive mode likewise gives plaintext requests no
//! principal). Otherwise any process that reaches the port could claim a critical agent's
//! place in the Ollama queue or pass a rule that names an agent.

use crate::body::ProxyBody;
use crate::identity::Identity;
use crate::outbound::CALLER_HEADER;
use crate::serve::Caller;
use futures_util::future::{Either, Ready};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_config::identity::MtlsMode;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Identity headers only the mesh may set.
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

#[derive(Clone, Debug)]
pub struct CallerIdentity<S> {
    inner: S,
    identity: Arc<Identity>,
}

// === impl CallerIdentity ===

impl<S> CallerIdentity<S> {
    pub fn new(inner: S, identity: Arc<Identity>) -> Self {
        Self { inner, identity }
    }
}

impl<S: crate::serve::ForPeer> crate::serve::ForPeer for CallerIdentity<S> {
    fn for_peer(&self, peer: std::net::SocketAddr) -> Self {
        Self {
            inner: self.inner.for_peer(peer),
            identity: self.identity.clone(),
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for CallerIdentity<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<Response<ProxyBody>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let caller = match req.extensions().get::<Caller>() {
            // A listener that does not answer TLS: nothing to decide.
            None => return Either::Left(self.inner.call(req)),
            Some(Caller(c)) => c.clone(),
        };
        match caller {
            Some(agent) => {
                let headers = req.headers_mut();
                headers.remove(&XFCC);
                // Agent names are checked service names: always a valid header value.
                match HeaderValue::from_str(&agent) {
                    Ok(v) => {
                        headers.insert(CALLER_HEADER, v);
                    }
                    Err(_) => {
                        headers.remove(CALLER_HEADER);
                    }
                }
                Either::Left(self.inner.call(req))
            }
            None => match self.identity.mode() {
                MtlsMode::Off => Either::Left(self.inner.call(req)),
                MtlsMode::Permissive => {
                    ::metrics::counter!(crate::metrics::INBOUND_PLAINTEXT, "result" => "accepted")
                        .increment(1);
                    let headers = req.headers_mut();
                    headers.remove(&XFCC);
                    if let Some(claimed) = headers.remove(CALLER_HEADER) {
                        tracing::debug!(?claimed, "a plaintext caller's claimed identity dropped");
                    }
                    Either::Left(self.inner.call(req))
                }
                MtlsMode::Strict => {
                    ::metrics::counter!(crate::metrics::INBOUND_PLAINTEXT, "result" => "refused")
                        .increment(1);
                    tracing::warn!(method = %req.method(), path = req.uri().path(),
                        claimed = req.headers().get(CALLER_HEADER)
                            .and_then(|v| v.to_str().ok()).unwrap_or(""),
                        "refused a plaintext caller: the mesh is strict");
                    Either::Right(futures_util::future::ready(Ok(refusal())))
                }
            },
        }
    }
}

fn refusal() -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": "mtls_required",
        "message": "this mesh accepts only mutual-TLS callers (mode strict)",
    });
    let mut rsp = Response::new(ProxyBody::json(body.to_string()));
    *rsp.status_mut() = StatusCode::FORBIDDEN;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}
