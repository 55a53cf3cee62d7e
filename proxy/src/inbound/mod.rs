//! The inbound path: peers' calls to this sidecar's agent.
//! `target (this agent) -> access log -> concurrency -> deadline -> timeout -> forward to the
//! local app`. The deadline honours the budget a peer sidecar propagated (`x-mesh-timeout-ms`).

pub mod concurrency;
pub mod target;

use crate::access_log::AccessLogLayer;
use crate::bootstrap::Bootstrap;
use crate::outbound::deadline::{DeadlineLayer, SetDeadline};
use crate::outbound::{forward::Forward, pool::Pools, timeout::TimeoutLayer};
use std::sync::Arc;
use tower::ServiceBuilder;

pub type Stack = target::LocalTarget<
    crate::access_log::AccessLog<
        concurrency::ConcurrencyLimit<SetDeadline<crate::outbound::timeout::Timeout<Forward>>>,
    >,
>;

pub fn stack(boot: &Bootstrap, pools: Arc<Pools>) -> Stack {
    stack_with(
        boot,
        pools,
        concurrency::ConcurrencyLayer::new(&boot.inbound),
    )
}

/// The stack with a given concurrency layer, whose limit the caller may resize.
pub fn stack_with(
    boot: &Bootstrap,
    pools: Arc<Pools>,
    limit: concurrency::ConcurrencyLayer,
) -> Stack {
    let local = target::LocalTargetLayer::new(boot);
    let fallback = local.metrics();
    ServiceBuilder::new()
        .layer(local)
        .layer(AccessLogLayer::new("inbound", fallback, boot.log.access))
        .layer(limit)
        .layer(DeadlineLayer)
        .layer(TimeoutLayer)
        .service(Forward::new(pools))
}
