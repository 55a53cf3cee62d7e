//! The inbound path: peers' calls to this sidecar's agent.
//! `target (this agent) -> server span (trace) -> access log -> concurrency -> deadline -> timeout -> forward to the
//! local app`, or, for the sidecar in front of Ollama, `target -> server span -> access log -> ollama gateway`.
//! The deadline honours the budget a peer sidecar propagated (`x-mesh-timeout-ms`).

pub mod authz;
pub mod caller;
pub mod clients;
pub mod concurrency;
pub mod ollama;
pub mod target;

use crate::access_log::AccessLogLayer;
use crate::body::ProxyBody;
use crate::bootstrap::{Bootstrap, InboundMode};
use crate::outbound::deadline::{DeadlineLayer, SetDeadline};
use crate::outbound::{forward::Forward, pool::Pools, timeout::TimeoutLayer};
use crate::state::State;
use crate::trace::{server::ServerSpan, server::ServerSpanLayer, Tracer};
use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::ServiceBuilder;

/// The inbound service: the local app's stack or the Ollama gateway, as the bootstrap says.
#[derive(Clone, Debug)]
pub enum Stack {
    App(AppStack),
    Ollama(ollama::Stack),
}

pub type AppStack = target::LocalTarget<
    ServerSpan<
        crate::access_log::AccessLog<
            concurrency::ConcurrencyLimit<SetDeadline<crate::outbound::timeout::Timeout<Forward>>>,
        >,
    >,
>;

pub fn stack(
    boot: &Bootstrap,
    state: &Arc<State>,
    pools: Arc<Pools>,
    tracer: Option<Arc<Tracer>>,
) -> Stack {
    stack_with(
        boot,
        state,
        pools,
        concurrency::ConcurrencyLayer::new(&boot.inbound),
        tracer,
    )
}

/// The stack with a given concurrency layer, whose limit the caller may resize.
pub fn stack_with(
    boot: &Bootstrap,
    state: &Arc<State>,
    pools: Arc<Pools>,
    limit: concurrency::ConcurrencyLayer,
    tracer: Option<Arc<Tracer>>,
) -> Stack {
    match boot.inbound.mode {
        InboundMode::App => Stack::App(app_stack(boot, pools, limit, tracer)),
        InboundMode::Ollama => Stack::Ollama(ollama::stack(boot, state, tracer)),
    }
}

fn app_stack(
    boot: &Bootstrap,
    pools: Arc<Pools>,
    limit: concurrency::ConcurrencyLayer,
    tracer: Option<Arc<Tracer>>,
) -> AppStack {
    let local = target::LocalTargetLayer::new(boot);
    let fallback = local.metrics();
    ServiceBuilder::new()
        .layer(local)
        .layer(ServerSpanLayer::new(tracer))
        .layer(AccessLogLayer::new("inbound", fallback, boot.log.access))
        .layer(limit)
        .layer(DeadlineLayer)
        .layer(TimeoutLayer)
        .service(Forward::new(pools).upload_limits(boot.limits.upload()))
}

impl tower::Service<Request<Incoming>> for Stack {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self {
            Stack::App(s) => s.poll_ready(cx),
            Stack::Ollama(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        match self {
            Stack::App(s) => s.call(req),
            Stack::Ollama(s) => s.call(req),
        }
    }
}
