//! Every inbound request goes to one place, the agent's own app; this layer attaches that
//! route so the shared layers (access log, timeout, forward) work unchanged. The route says
//! how to speak to the app (`inbound.protocol`): HTTP/1.1, h2c, or by request (`auto`): a gRPC
//! call goes over h2c, since gRPC needs HTTP/2, and everything else over HTTP/1.1. Both routes
//! share the app's one endpoint and its metrics.

use crate::access_log;
use crate::body::ProxyBody;
use crate::bootstrap::{AppProtocol, Bootstrap};
use crate::inbound::clients::{Client, Clients};
use crate::metrics::TargetMetrics;
use crate::outbound::balance::{Endpoint, EndpointSet};
use crate::state::{Backend, Route};
use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh_config::Protocol;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Clone, Debug)]
pub struct LocalTargetLayer {
    routes: Routes,
    log: bool,
    clients: Arc<Clients>,
}

#[derive(Clone, Debug)]
pub struct LocalTarget<S> {
    inner: S,
    routes: Routes,
    log: bool,
    clients: Arc<Clients>,
    /// The connection's client address (set per connection by [`LocalTarget::for_peer`]).
    client: Option<Arc<Client>>,
}

/// The app's route for most requests, and the h2c one gRPC calls take under `auto`.
#[derive(Clone, Debug)]
struct Routes {
    default: Route,
    grpc: Option<Route>,
}

impl LocalTargetLayer {
    pub fn new(boot: &Bootstrap) -> Self {
        let app = Arc::new(Endpoint::new(boot.inbound.app));
        let metrics = TargetMetrics::new("inbound", &boot.agent, boot.phase.as_str(), &boot.agent);
        let route = |protocol| {
            let backend = Backend {
                name: boot.agent.as_str().into(),
                phase: boot.phase,
                protocol,
                timeout: boot.inbound.timeout,
                stream_idle: boot.inbound.stream_idle_timeout,
                endpoints: EndpointSet::new(vec![app.clone()]),
                resilience: Default::default(),
                ollama_rate: None,
                metrics: metrics.clone(),
            };
            Route {
                timeout: backend.timeout,
                retry_non_idempotent: false,
                client: None,
                backend: Arc::new(backend),
            }
        };
        let routes = match boot.inbound.protocol {
            AppProtocol::Http1 => Routes {
                default: route(Protocol::Http1),
                grpc: None,
            },
            AppProtocol::Http2 => Routes {
                default: route(Protocol::Http2),
                grpc: None,
            },
            AppProtocol::Auto => Routes {
                default: route(Protocol::Http1),
                grpc: Some(route(Protocol::Http2)),
            },
        };
        Self {
            routes,
            log: boot.log.access,
            clients: Arc::default(),
        }
    }

    pub fn metrics(&self) -> Arc<TargetMetrics> {
        self.routes.default.backend.metrics.clone()
    }
}

impl<S> tower::Layer<S> for LocalTargetLayer {
    type Service = LocalTarget<S>;

    fn layer(&self, inner: S) -> LocalTarget<S> {
        LocalTarget {
            inner,
            routes: self.routes.clone(),
            log: self.log,
            clients: self.clients.clone(),
            client: None,
        }
    }
}

impl<S: Clone> LocalTarget<S> {
    /// The service for one connection from `peer`: its requests count against the address.
    pub fn for_peer(&self, peer: std::net::SocketAddr) -> Self {
        let mut svc = self.clone();
        svc.client = Some(self.clients.get(peer.ip()));
        svc
    }
}

impl<S> tower::Service<Request<Incoming>> for LocalTarget<S>
where
    S: tower::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future = BoxFuture<'static, Result<Response<ProxyBody>, Infallible>>,
    >,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let mut route = match &self.routes.grpc {
            Some(grpc) if crate::grpc::is_grpc(&req) => grpc.clone(),
            _ => self.routes.default.clone(),
        };
        route.client = self.client.clone();
        if let Err(err) = crate::host::check(&mut req) {
            let metrics = route.backend.metrics.clone();
            let rsp = access_log::reject("inbound", metrics, &req, err, self.log);
            return Box::pin(async move { Ok(rsp) });
        }
        req.extensions_mut().insert(route);
        self.inner.call(req)
    }
}
