//! Every inbound request goes to one place, the agent's own app; this layer attaches that
//! route so the shared layers (access log, timeout, forward) work unchanged.

use crate::bootstrap::Bootstrap;
use crate::metrics::TargetMetrics;
use crate::outbound::balance::{Endpoint, EndpointSet};
use crate::state::{Backend, Route};
use http::Request;
use hyper::body::Incoming;
use mesh_config::Protocol;
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Clone, Debug)]
pub struct LocalTargetLayer {
    route: Route,
}

#[derive(Clone, Debug)]
pub struct LocalTarget<S> {
    inner: S,
    route: Route,
}

impl LocalTargetLayer {
    pub fn new(boot: &Bootstrap) -> Self {
        let backend = Backend {
            name: boot.agent.as_str().into(),
            phase: boot.phase,
            protocol: Protocol::Http1,
            timeout: boot.inbound.timeout,
            stream_idle: boot.inbound.stream_idle_timeout,
            endpoints: EndpointSet::new(vec![Arc::new(Endpoint::new(boot.inbound.app))]),
            resilience: Default::default(),
            ollama_rate: None,
            metrics: TargetMetrics::new("inbound", &boot.agent, boot.phase.as_str(), &boot.agent),
        };
        Self {
            route: Route {
                timeout: backend.timeout,
                retry_non_idempotent: false,
                backend: Arc::new(backend),
            },
        }
    }

    pub fn metrics(&self) -> Arc<TargetMetrics> {
        self.route.backend.metrics.clone()
    }
}

impl<S> tower::Layer<S> for LocalTargetLayer {
    type Service = LocalTarget<S>;

    fn layer(&self, inner: S) -> LocalTarget<S> {
        LocalTarget {
            inner,
            route: self.route.clone(),
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for LocalTarget<S>
where
    S: tower::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> S::Future {
        req.extensions_mut().insert(self.route.clone());
        self.inner.call(req)
    }
}
