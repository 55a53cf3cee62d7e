//! The host/phase resource model (Rules 20 and 21) and the one computation that turns it into
//! phase slices and per-agent shares. The control process uses it for sidecar budgets; the
//! compose limits are meant to use the same function.

use crate::ollama::Rate;
use crate::snapshot::{check_name, invalid, Invalid, PathSeg};
use crate::units::ByteSize;
use crate::Phase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[host]`: what the machine has. `detect = true` reads cores and memory from the machine
/// at start instead (see the control process).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostModel {
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    #[serde(default)]
    pub detect: bool,
    /// Inbound requests a sidecar admits at once per CPU of its agent's budget.
    #[serde(default = "default_concurrency_per_cpu")]
    pub concurrency_per_cpu: u32,
}

/// `[pools.<name>]` (Rule 21). A pool without `phases` is reserved (infrastructure,
/// monitoring, emergency); a pool with `phases` bounds the memory of the agents in them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub memory: ByteSize,
    #[serde(default)]
    pub cpus: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_agent: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// `[phases.<phase>]` (Rule 20): the slice a phase asks for and the per-agent limits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseLimits {
    pub cpus: f64,
    pub memory: ByteSize,
    pub agent_cpus: f64,
    pub agent_memory: ByteSize,
}

/// The whole model: host, pools, phases.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetModel {
    #[serde(default)]
    pub host: HostModel,
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
    #[serde(default)]
    pub phases: BTreeMap<Phase, PhaseLimits>,
}

/// What one agent's sidecar receives: its share of its phase's slice.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBudget {
    pub phase: Phase,
    pub cpus: f64,
    pub memory: ByteSize,
    pub concurrency_per_cpu: u32,
    /// Calls to Ollama per agent: the phase's explicit rate or a share of the gateway's
    /// capacity by CPU budget (see `OllamaPolicy::size_rates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ollama_rate: Option<Rate>,
}

/// The computed budgets, with the oversubscription spelled out rather than hidden.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetReport {
    pub host_cpus: f64,
    pub host_memory: ByteSize,
    pub reserved_cpus: f64,
    pub reserved_memory: ByteSize,
    pub available_cpus: f64,
    pub available_memory: ByteSize,
    pub requested_cpus: f64,
    pub requested_memory: ByteSize,
    /// Factor applied to every phase's CPU request (1.0 when it fits).
    pub cpu_scale: f64,
    pub memory_scale: f64,
    pub oversubscribed: bool,
    pub phases: BTreeMap<Phase, PhaseBudget>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseBudget {
    pub agents: usize,
    pub requested_cpus: f64,
    pub granted_cpus: f64,
    pub requested_memory: ByteSize,
    pub granted_memory: ByteSize,
    /// The agent pool that further capped the memory slice, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capped_by_pool: Option<String>,
    pub agent: AgentBudget,
}

fn default_cpus() -> f64 {
    12.0
}
fn default_memory() -> ByteSize {
    ByteSize::gib(29)
}
fn default_concurrency_per_cpu() -> u32 {
    64
}

// === impl HostModel ===

impl Default for HostModel {
    fn default() -> Self {
        Self {
            cpus: default_cpus(),
            memory: default_memory(),
            detect: false,
            concurrency_per_cpu: default_concurrency_per_cpu(),
        }
    }
}

// === impl AgentBudget ===

impl AgentBudget {
    /// Inbound requests the agent's app may handle at once: at least one.
    pub fn inbound_concurrency(&self) -> usize {
        ((self.cpus * f64::from(self.concurrency_per_cpu)).round() as usize).max(1)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.cpus.is_finite() && self.cpus > 0.0) {
            return Err("budget.cpus must be greater than zero".into());
        }
        if self.concurrency_per_cpu == 0 {
            return Err("budget.concurrency_per_cpu must be at least 1".into());
        }
        Ok(())
    }
}

// === impl BudgetModel ===

const MAX_CPUS: f64 = 4096.0;

impl BudgetModel {
    /// Range and reference checks serde cannot make; paths start at the policy root.
    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        let cpus_ok = |v: f64| v.is_finite() && v > 0.0 && v <= MAX_CPUS;
        if !cpus_ok(self.host.cpus) {
            return Err(invalid(
                vec![Key("host"), Key("cpus")],
                format!("must be in (0, {MAX_CPUS}]"),
            ));
        }
        if self.host.memory.0 == 0 {
            return Err(invalid(
                vec![Key("host"), Key("memory")],
                "must be greater than zero",
            ));
        }
        if !(1..=100_000).contains(&self.host.concurrency_per_cpu) {
            return Err(invalid(
                vec![Key("host"), Key("concurrency_per_cpu")],
                "must be in 1..=100000",
            ));
        }
        let mut served: BTreeMap<Phase, &str> = BTreeMap::new();
        let (mut reserved_cpus, mut reserved_mem) = (0.0, 0u64);
        for (name, pool) in &self.pools {
            let at = |k| vec![Key("pools"), Name(name.clone()), Key(k)];
            if let Err(r) = check_name(&name.replace('_', "-")) {
                return Err(invalid(vec![Key("pools"), Name(name.clone())], r));
            }
            if pool.memory.0 == 0 {
                return Err(invalid(at("memory"), "must be greater than zero"));
            }
            if !(pool.cpus.is_finite() && (0.0..=MAX_CPUS).contains(&pool.cpus)) {
                return Err(invalid(at("cpus"), format!("must be in [0, {MAX_CPUS}]")));
            }
            if pool
                .max_per_agent
                .is_some_and(|m| m.0 == 0 || m > pool.memory)
            {
                return Err(invalid(
                    at("max_per_agent"),
                    "must be greater than zero and at most the pool's memory",
                ));
            }
            if pool.phases.is_empty() {
                if pool.max_per_agent.is_some() {
                    return Err(invalid(
                        at("max_per_agent"),
                        "only agent pools (with `phases`) have a per-agent maximum",
                    ));
                }
                reserved_cpus += pool.cpus;
                reserved_mem += pool.memory.0;
            }
            for phase in &pool.phases {
                if let Some(other) = served.insert(*phase, name) {
                    return Err(invalid(
                        at("phases"),
                        format!("phase {phase} is already served by pool {other:?}"),
                    ));
                }
                if !self.phases.contains_key(phase) {
                    return Err(invalid(
                        at("phases"),
                        format!("phase {phase} has no [phases.{phase}] limits"),
                    ));
                }
            }
        }
        if reserved_mem >= self.host.memory.0 {
            return Err(invalid(
                vec![Key("pools")],
                format!(
                    "reserved pools hold {} of the host's {}: nothing is left for agents",
                    ByteSize(reserved_mem),
                    self.host.memory
                ),
            ));
        }
        if reserved_cpus >= self.host.cpus {
            return Err(invalid(
                vec![Key("pools")],
                format!(
                    "reserved pools hold {reserved_cpus} of the host's {} CPUs",
                    self.host.cpus
                ),
            ));
        }
        for (phase, l) in &self.phases {
            let at = |k| vec![Key("phases"), Name(phase.to_string()), Key(k)];
            for (k, v) in [("cpus", l.cpus), ("agent_cpus", l.agent_cpus)] {
                if !cpus_ok(v) {
                    return Err(invalid(at(k), format!("must be in (0, {MAX_CPUS}]")));
                }
            }
            for (k, v) in [("memory", l.memory), ("agent_memory", l.agent_memory)] {
                if v.0 == 0 {
                    return Err(invalid(at(k), "must be greater than zero"));
                }
            }
            if l.agent_cpus > l.cpus {
                return Err(invalid(at("agent_cpus"), "exceeds the phase's cpus"));
            }
            if l.agent_memory > l.memory {
                return Err(invalid(at("agent_memory"), "exceeds the phase's memory"));
            }
        }
        Ok(())
    }

    /// Host minus reserved pools, split among phases; requests beyond what is left are scaled
    /// down by one factor per resource, and agent pools cap the memory of their phases.
    /// `agents` counts the agents discovered in a phase.
    pub fn compute(
        &self,
        host_cpus: f64,
        host_memory: ByteSize,
        agents: impl Fn(Phase) -> usize,
    ) -> BudgetReport {
        let reserved = self.pools.values().filter(|p| p.phases.is_empty());
        let reserved_cpus: f64 = reserved.clone().map(|p| p.cpus).sum();
        let reserved_memory: u64 = reserved.map(|p| p.memory.0).sum();
        let available_cpus = (host_cpus - reserved_cpus).max(0.0);
        let available_memory = host_memory.0.saturating_sub(reserved_memory);
        let requested_cpus: f64 = self.phases.values().map(|l| l.cpus).sum();
        let requested_memory: u64 = self.phases.values().map(|l| l.memory.0).sum();
        let scale = |avail: f64, req: f64| if req > avail { avail / req } else { 1.0 };
        let cpu_scale = scale(available_cpus, requested_cpus);
        let memory_scale = scale(available_memory as f64, requested_memory as f64);

        let mut phases: BTreeMap<Phase, PhaseBudget> = self
            .phases
            .iter()
            .map(|(phase, l)| {
                let granted_memory = (l.memory.0 as f64 * memory_scale) as u64;
                let b = PhaseBudget {
                    agents: agents(*phase),
                    requested_cpus: l.cpus,
                    granted_cpus: l.cpus * cpu_scale,
                    requested_memory: l.memory,
                    granted_memory: ByteSize(granted_memory),
                    capped_by_pool: None,
                    agent: AgentBudget {
                        phase: *phase,
                        cpus: 0.0,
                        memory: ByteSize(0),
                        concurrency_per_cpu: self.host.concurrency_per_cpu,
                        ollama_rate: None,
                    },
                };
                (*phase, b)
            })
            .collect();

        // An agent pool shared by several phases caps their memory together, proportionally.
        for (name, pool) in self.pools.iter().filter(|(_, p)| !p.phases.is_empty()) {
            let total: u64 = pool
                .phases
                .iter()
                .filter_map(|ph| phases.get(ph))
                .map(|b| b.granted_memory.0)
                .sum();
            if total > pool.memory.0 {
                let f = pool.memory.0 as f64 / total as f64;
                for ph in &pool.phases {
                    if let Some(b) = phases.get_mut(ph) {
                        b.granted_memory = ByteSize((b.granted_memory.0 as f64 * f) as u64);
                        b.capped_by_pool = Some(name.clone());
                    }
                }
            }
        }

        for (phase, b) in phases.iter_mut() {
            let l = &self.phases[phase];
            let n = b.agents.max(1) as f64;
            let pool_cap = self
                .pools
                .values()
                .find(|p| p.phases.contains(phase))
                .and_then(|p| p.max_per_agent)
                .map_or(u64::MAX, |m| m.0);
            b.agent.cpus = l.agent_cpus.min(b.granted_cpus / n);
            b.agent.memory = ByteSize(
                l.agent_memory
                    .0
                    .min(pool_cap)
                    .min((b.granted_memory.0 as f64 / n) as u64),
            );
        }

        BudgetReport {
            host_cpus,
            host_memory,
            reserved_cpus,
            reserved_memory: ByteSize(reserved_memory),
            available_cpus,
            available_memory: ByteSize(available_memory),
            requested_cpus,
            requested_memory: ByteSize(requested_memory),
            cpu_scale,
            memory_scale,
            oversubscribed: cpu_scale < 1.0 || memory_scale < 1.0,
            phases,
        }
    }
}

// === impl BudgetReport ===

impl BudgetReport {
    /// The budget for one agent of `phase`, if the phase is modelled.
    pub fn agent(&self, phase: Phase) -> Option<AgentBudget> {
        self.phases.get(&phase).map(|b| b.agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> BudgetModel {
        let phase = |cpus, mem, acpu, amem| PhaseLimits {
            cpus,
            memory: ByteSize::gib(mem),
            agent_cpus: acpu,
            agent_memory: ByteSize::gib(amem),
        };
        BudgetModel {
            host: HostModel::default(),
            pools: BTreeMap::new(),
            phases: [
                (Phase::Critical, phase(8.0, 16, 2.0, 4)),
                (Phase::Performance, phase(6.0, 12, 1.0, 2)),
                (Phase::Specialized, phase(4.0, 8, 0.5, 1)),
            ]
            .into(),
        }
    }

    #[test]
    fn oversubscribed_phases_are_scaled_proportionally_and_reported() {
        let report = rules().compute(12.0, ByteSize::gib(29), |_| 10);
        // 8 + 6 + 4 = 18 CPUs asked of 12: every phase gets two thirds of its request.
        assert!(report.oversubscribed);
        assert!((report.cpu_scale - 12.0 / 18.0).abs() < 1e-9);
        let crit = &report.phases[&Phase::Critical];
        assert!((crit.granted_cpus - 8.0 * 12.0 / 18.0).abs() < 1e-9);
        // 5.33 CPUs over 10 agents: the share is below the 2-CPU cap.
        assert!((crit.agent.cpus - 0.5333).abs() < 1e-3);
        let granted: f64 = report.phases.values().map(|p| p.granted_cpus).sum();
        assert!((granted - 12.0).abs() < 1e-9);
    }

    #[test]
    fn per_agent_limit_caps_the_share() {
        let report = rules().compute(64.0, ByteSize::gib(256), |_| 1);
        assert!(!report.oversubscribed);
        assert_eq!(report.agent(Phase::Specialized).unwrap().cpus, 0.5);
        assert_eq!(
            report.agent(Phase::Critical).unwrap().memory,
            ByteSize::gib(4)
        );
    }

    #[test]
    fn reserved_pools_and_agent_pools_bound_memory() {
        let mut m = rules();
        m.pools.insert(
            "infrastructure".into(),
            Pool {
                memory: ByteSize::gib(12),
                cpus: 0.0,
                max_per_agent: None,
                phases: vec![],
                services: vec!["ollama".into()],
                purpose: None,
            },
        );
        m.pools.insert(
            "agent-standard".into(),
            Pool {
                memory: ByteSize::gib(6),
                cpus: 0.0,
                max_per_agent: Some(ByteSize::mib(256)),
                phases: vec![Phase::Performance, Phase::Specialized],
                services: vec![],
                purpose: None,
            },
        );
        m.validate().unwrap();
        let r = m.compute(12.0, ByteSize::gib(29), |_| 4);
        assert_eq!(r.available_memory, ByteSize::gib(17));
        let perf = &r.phases[&Phase::Performance];
        let spec = &r.phases[&Phase::Specialized];
        assert_eq!(perf.capped_by_pool.as_deref(), Some("agent-standard"));
        assert!(perf.granted_memory.0 + spec.granted_memory.0 <= ByteSize::gib(6).0);
        assert_eq!(perf.agent.memory, ByteSize::mib(256));
    }

    #[test]
    fn share_turns_into_concurrency() {
        let b = AgentBudget {
            phase: Phase::Critical,
            cpus: 0.5,
            memory: ByteSize::gib(1),
            concurrency_per_cpu: 64,
            ollama_rate: None,
        };
        assert_eq!(b.inbound_concurrency(), 32);
        assert_eq!(AgentBudget { cpus: 0.001, ..b }.inbound_concurrency(), 1);
    }
}
