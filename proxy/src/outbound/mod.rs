//! The outbound path: an agent's calls to other agents, in the order a request meets them.
//! `route -> client span (trace) -> access log -> limit (Ollama rate) -> deadline -> timeout -> breaker (fallback) ->
//! retry -> forward (balance with ejection and endpoint breakers, pool)`. Each policy is a tower
//! layer in its own file; adding one is a file and a line in [`stack`].
//!
//! The target's breaker sits above retries and judges requests as the caller saw them; what
//! goes wrong on one endpoint is judged below retries, per attempt, by that endpoint's breaker
//! and ejection (see `breaker/mod.rs`).

pub mod balance;
pub mod breaker;
pub mod classify;
pub mod deadline;
pub mod eject;
pub mod fallback;
pub mod forward;
pub mod limit;
pub mod pool;
pub mod replay;
pub mod resilience;
pub mod retry;
pub mod route;
pub mod settle;
pub mod tee;
pub mod timeout;
pub mod upgrade;

use crate::access_log::AccessLogLayer;
use crate::bootstrap::Bootstrap;
use crate::metrics::TargetMetrics;
use crate::state::State;
use crate::trace::{client::ClientSpanLayer, Tracer};
use std::sync::Arc;
use tower::ServiceBuilder;

pub use route::CALLER_HEADER;

/// The outbound service, outermost layer first.
pub type Stack = route::RouteService<
    crate::trace::client::ClientSpan<
        crate::access_log::AccessLog<
            limit::RateLimit<
                deadline::SetDeadline<
                    timeout::Timeout<breaker::CircuitBreaker<retry::Retry<forward::Forward>>>,
                >,
            >,
        >,
    >,
>;

/// Builds the outbound service shared by every outbound connection.
pub fn stack(
    boot: &Bootstrap,
    state: Arc<State>,
    pools: Arc<pool::Pools>,
    tracer: Option<Arc<Tracer>>,
) -> Stack {
    let route = route::RouteLayer::new(&boot.agent, state.clone(), boot.log.access);
    stack_with(boot, route, state, pools, tracer)
}

/// The same stack for an upstream port (`[[upstreams]]`): every request goes to `service`.
pub fn upstream_stack(
    boot: &Bootstrap,
    service: &str,
    state: Arc<State>,
    pools: Arc<pool::Pools>,
    tracer: Option<Arc<Tracer>>,
) -> Stack {
    let route = route::RouteLayer::new(&boot.agent, state.clone(), boot.log.access);
    stack_with(boot, route.fixed(service), state, pools, tracer)
}

fn stack_with(
    boot: &Bootstrap,
    route: route::RouteLayer,
    state: Arc<State>,
    pools: Arc<pool::Pools>,
    tracer: Option<Arc<Tracer>>,
) -> Stack {
    let fallback = TargetMetrics::new("outbound", &boot.agent, boot.phase.as_str(), "");
    ServiceBuilder::new()
        .layer(route)
        .layer(ClientSpanLayer::new(tracer))
        .layer(AccessLogLayer::new("outbound", fallback, boot.log.access))
        .layer(limit::RateLimitLayer::new())
        .layer(deadline::DeadlineLayer)
        .layer(timeout::TimeoutLayer)
        .layer(breaker::BreakerLayer::new(state))
        .layer(retry::RetryLayer)
        .service(forward::Forward::new(pools).upload_limits(boot.limits.upload()))
}
