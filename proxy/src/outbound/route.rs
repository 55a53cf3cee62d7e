//! Finds where a request goes: by authority (`name`, `name.mesh`, `name.service.consul`), then
//! by the snapshot's explicit rules (path prefix, headers). No route answers 503 at once. On an
//! upstream port (`[[upstreams]]`) the target is the port's service whatever the authority,
//! and the same rules apply to it. Host hygiene (`host.rs`) comes first.

use crate::access_log;
use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::host;
use crate::state::State;
use futures_util::future::{self, Either, Ready};
use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use mesh_config::snapshot::normalize_authority;
use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The identity of the calling agent, set by its sidecar; an agent cannot choose its value.
pub const CALLER_HEADER: HeaderName = HeaderName::from_static("x-mesh-caller");

#[derive(Clone, Debug)]
pub struct RouteLayer {
    caller: HeaderValue,
    state: Arc<State>,
    log: bool,
    fixed: Option<Arc<str>>,
}

#[derive(Clone, Debug)]
pub struct RouteService<S> {
    inner: S,
    caller: HeaderValue,
    state: Arc<State>,
    log: bool,
    /// The service of an upstream port: every request goes there.
    fixed: Option<Arc<str>>,
}

impl RouteLayer {
    pub fn new(agent: &str, state: Arc<State>, log: bool) -> Self {
        Self {
            caller: HeaderValue::from_str(agent).expect("bootstrap checked the agent name"),
            state,
            log,
            fixed: None,
        }
    }

    /// Routes every request to `service`, as an upstream port does.
    pub fn fixed(mut self, service: &str) -> Self {
        self.fixed = Some(service.into());
        self
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService {
            inner,
            caller: self.caller.clone(),
            state: self.state.clone(),
            log: self.log,
            fixed: self.fixed.clone(),
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for RouteService<S>
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
        let table = self.state.load();
        let named = match host::inspect(&req) {
            Ok(named) => named,
            Err(err) => {
                let rsp =
                    access_log::reject("outbound", table.unrouted.clone(), &req, err, self.log);
                return Either::Right(future::ready(Ok(rsp)));
            }
        };
        let misaligned = named.misaligned;
        let authority = match &self.fixed {
            Some(service) => Some(&**service),
            None => named.authority,
        };
        let Some(authority) = authority else {
            let rsp = access_log::reject(
                "outbound",
                table.unrouted.clone(),
                &req,
                ProxyError::NoAuthority,
                self.log,
            );
            return Either::Right(future::ready(Ok(rsp)));
        };
        // Host names are case-insensitive, the `.mesh` suffix included (`B.MESH` is `b`).
        let lower = lowercase(authority);
        let name = normalize_authority(&lower);
        match table.route(name, req.uri().path(), req.headers()) {
            Some(route) => {
                if misaligned {
                    host::align(&mut req);
                }
                req.headers_mut().insert(CALLER_HEADER, self.caller.clone());
                req.extensions_mut().insert(route);
                Either::Left(self.inner.call(req))
            }
            None => {
                let err = ProxyError::NoRoute {
                    target: name.to_owned(),
                };
                let rsp =
                    access_log::reject("outbound", table.unrouted.clone(), &req, err, self.log);
                Either::Right(future::ready(Ok(rsp)))
            }
        }
    }
}

/// Host names are case-insensitive: the name routed on, in lower case.
pub(crate) fn lowercase(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}
