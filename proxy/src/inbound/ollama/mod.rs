//! The Ollama gateway: the inbound stack of the sidecar in front of the one shared Ollama server
//! (bootstrap `[inbound] mode = "ollama"`). `target -> access log -> gateway`, where the gateway
//! reads the caller's identity and limits (`limits`), queues by phase and caller (`queue`,
//! owned by the `dispatch` task) and sends admitted requests to Ollama (`gateway`).
//!
//! Callers are named by `x-mesh-caller`. With identity on, the inbound side has already set it
//! from the caller's certificate, or dropped it for a plaintext caller (`inbound::caller`), so
//! a caller without a certificate ranks as anonymous. Without identity the header is the one
//! the caller's own sidecar set (it overwrites whatever the agent sent).

pub mod dispatch;
pub mod gateway;
pub mod limits;
pub mod queue;

use crate::access_log::{AccessLog, AccessLogLayer};
use crate::bootstrap::Bootstrap;
use crate::inbound::target::{LocalTarget, LocalTargetLayer};
use crate::state::State;
use crate::trace::server::{ServerSpan, ServerSpanLayer};
use crate::trace::Tracer;
use arc_swap::ArcSwap;
use mesh_config::ollama::{AgentLimits, GatewayParams};
use mesh_config::{Phase, Snapshot};
use std::collections::HashMap;
use std::sync::Arc;
use tower::ServiceBuilder;

pub type Stack = LocalTarget<ServerSpan<AccessLog<gateway::Gateway>>>;

/// Who a caller is to the gateway: its phase and limits, from the snapshot.
#[derive(Debug)]
pub struct Caller {
    pub name: Arc<str>,
    pub phase: Phase,
    pub limits: AgentLimits,
}

/// The snapshot's Ollama policy compiled for lookups by caller name.
#[derive(Debug)]
pub struct Policy {
    callers: HashMap<Box<str>, Arc<Caller>>,
    defaults: AgentLimits,
    pub params: GatewayParams,
}

// === impl Policy ===

impl Policy {
    /// Agents are the snapshot's services (their phase) and the policy's agents (their limits).
    pub fn compile(snap: &Snapshot) -> Policy {
        let ollama = &snap.ollama;
        let mut callers = HashMap::with_capacity(snap.services.len());
        for svc in &snap.services {
            callers.insert(
                Box::<str>::from(svc.name.as_str()),
                Arc::new(Caller {
                    name: svc.name.as_str().into(),
                    phase: svc.phase,
                    limits: *ollama.limits(&svc.name),
                }),
            );
        }
        for (name, limits) in &ollama.agents {
            callers
                .entry(Box::<str>::from(name.as_str()))
                .or_insert_with(|| {
                    Arc::new(Caller {
                        name: name.as_str().into(),
                        phase: Phase::Specialized,
                        limits: *limits,
                    })
                });
        }
        Policy {
            callers,
            defaults: ollama.defaults,
            params: ollama.gateway.clone(),
        }
    }

    /// The caller named by the header; unknown or anonymous callers rank lowest and get the
    /// default limits.
    pub fn caller(&self, name: Option<&str>) -> Arc<Caller> {
        let name = name.unwrap_or("anonymous");
        match self.callers.get(name) {
            Some(c) => c.clone(),
            None => Arc::new(Caller {
                name: name.into(),
                phase: Phase::Specialized,
                limits: self.defaults,
            }),
        }
    }
}

/// Builds the gateway stack and starts its dispatcher and policy watcher. Both tasks end when
/// the stack and the state are dropped.
pub fn stack(boot: &Bootstrap, state: &Arc<State>, tracer: Option<Arc<Tracer>>) -> Stack {
    let snapshot = state.load().snapshot.clone();
    let policy = Arc::new(ArcSwap::from_pointee(Policy::compile(&snapshot)));
    let (dispatcher, handle) = dispatch::Dispatcher::new(policy.load().params.clone());
    tokio::spawn(dispatcher.run());
    let handle = Arc::new(handle);
    tokio::spawn(watch_policy(
        Arc::downgrade(state),
        state.versions(),
        policy.clone(),
        Arc::downgrade(&handle),
    ));

    let local = LocalTargetLayer::new(boot);
    let fallback = local.metrics();
    ServiceBuilder::new()
        .layer(local)
        .layer(ServerSpanLayer::new(tracer))
        .layer(AccessLogLayer::new("inbound", fallback, boot.log.access))
        .service(gateway::Gateway::new(boot, policy, handle))
}

/// Recompiles the policy on each snapshot and hands new gateway parameters to the dispatcher.
async fn watch_policy(
    state: std::sync::Weak<State>,
    mut versions: tokio::sync::watch::Receiver<u64>,
    policy: Arc<ArcSwap<Policy>>,
    handle: std::sync::Weak<dispatch::Handle>,
) {
    while versions.changed().await.is_ok() {
        let (Some(state), Some(handle)) = (state.upgrade(), handle.upgrade()) else {
            return;
        };
        let next = Policy::compile(&state.load().snapshot);
        if next.params != policy.load().params {
            handle.send(dispatch::Cmd::Params(next.params.clone()));
        }
        policy.store(Arc::new(next));
    }
}
