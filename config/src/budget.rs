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

/// `[sidecar]`: what every agent's sidecar is given beside its agent. The floor is reserved
/// out of a phase's slice before the rest is divided among the agents, so a sidecar never gets
/// less than it runs on however many agents share the phase; above the floor a sidecar takes
/// `share` of its agent's part of the slice, its memory at most `max_memory`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarModel {
    #[serde(default = "default_sidecar_cpus")]
    pub cpus: f64,
    #[serde(default = "default_sidecar_memory")]
    pub memory: ByteSize,
    #[serde(default = "default_sidecar_share")]
    pub share: f64,
    #[serde(default = "default_sidecar_max_memory")]
    pub max_memory: ByteSize,
}

/// The whole model: host, pools, phases, the sidecar beside each agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetModel {
    #[serde(default)]
    pub host: HostModel,
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
    #[serde(default)]
    pub phases: BTreeMap<Phase, PhaseLimits>,
    #[serde(default)]
    pub sidecar: SidecarModel,
}

/// One sidecar's CPUs and memory.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SidecarBudget {
    pub cpus: f64,
    pub memory: ByteSize,
}

/// What one agent receives: its share of its phase's slice once the sidecars' part is set
/// aside. The sidecar admits inbound requests by these CPUs.
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
    /// CPUs and memory the sidecar floors of every phase's agents need together.
    pub sidecar_floor_cpus: f64,
    pub sidecar_floor_memory: ByteSize,
    /// The floors alone exceed what the host has for agents.
    pub floors_oversubscribe_host: bool,
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
    /// The sidecars' floors exceed the phase's granted slice: the agents get only what is
    /// left, which may be nothing.
    pub floors_exceed_slice: bool,
    pub agent: AgentBudget,
    /// Each sidecar of the phase, beside its agent.
    pub sidecar: SidecarBudget,
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
// Measured (benches/README.md): a sidecar's RSS is 7-9 MiB idle and 12-14 MiB at 5,000 req/s;
// one request costs it 15-33 us of CPU, so 0.05 CPU serves about 1,500 req/s.
fn default_sidecar_cpus() -> f64 {
    0.05
}
fn default_sidecar_memory() -> ByteSize {
    ByteSize::mib(24)
}
fn default_sidecar_share() -> f64 {
    0.25
}
fn default_sidecar_max_memory() -> ByteSize {
    ByteSize::mib(64)
}

// === impl SidecarModel ===

impl Default for SidecarModel {
    fn default() -> Self {
        Self {
            cpus: default_sidecar_cpus(),
            memory: default_sidecar_memory(),
            share: default_sidecar_share(),
            max_memory: default_sidecar_max_memory(),
        }
    }
}

impl SidecarModel {
    /// The sidecar beside an agent whose part of the slice is `cpus` and `memory`.
    fn size(&self, cpus: f64, memory: u64) -> SidecarBudget {
        let mem = ((memory as f64 * self.share) as u64).min(self.max_memory.0);
        SidecarBudget {
            cpus: (cpus * self.share).max(self.cpus),
            memory: ByteSize(mem.max(self.memory.0)),
        }
    }
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
/// What an agent gets when its sidecar's floor leaves nothing (reported as
/// `floors_exceed_slice`): the least a container limit expresses, never zero, so every agent
/// still has a CPU share for its concurrency and Ollama rate.
const MIN_AGENT_CPUS: f64 = 0.01;
const MIN_AGENT_MEMORY: u64 = 1 << 20;

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
        let sc = &self.sidecar;
        let at = |k| vec![Key("sidecar"), Key(k)];
        if !cpus_ok(sc.cpus) {
            return Err(invalid(at("cpus"), format!("must be in (0, {MAX_CPUS}]")));
        }
        if sc.memory.0 == 0 {
            return Err(invalid(at("memory"), "must be greater than zero"));
        }
        if !(0.0..1.0).contains(&sc.share) {
            return Err(invalid(at("share"), "must be in [0, 1)"));
        }
        if sc.max_memory < sc.memory {
            return Err(invalid(
                at("max_memory"),
                "must be at least the floor (memory)",
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
                    floors_exceed_slice: false,
                    sidecar: SidecarBudget {
                        cpus: 0.0,
                        memory: ByteSize(0),
                    },
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

        // Each agent's part of the slice holds its sidecar and itself. The sidecar is sized
        // first (its floor, or its share of the agent's capped part), then the agent gets the
        // rest of the part, within its per-agent limits.
        for (phase, b) in phases.iter_mut() {
            let l = &self.phases[phase];
            let n = b.agents.max(1) as f64;
            let pool_cap = self
                .pools
                .values()
                .find(|p| p.phases.contains(phase))
                .and_then(|p| p.max_per_agent)
                .map_or(u64::MAX, |m| m.0);
            let part_cpus = b.granted_cpus / n;
            let part_memory = (b.granted_memory.0 as f64 / n) as u64;
            let agent_memory_cap = l.agent_memory.0.min(pool_cap);
            b.sidecar = self.sidecar.size(
                part_cpus.min(l.agent_cpus),
                part_memory.min(agent_memory_cap),
            );
            b.floors_exceed_slice =
                part_cpus < self.sidecar.cpus || part_memory < self.sidecar.memory.0;
            b.agent.cpus = l
                .agent_cpus
                .min((part_cpus - b.sidecar.cpus).max(MIN_AGENT_CPUS));
            b.agent.memory = ByteSize(
                agent_memory_cap.min(
                    part_memory
                        .saturating_sub(b.sidecar.memory.0)
                        .max(MIN_AGENT_MEMORY),
                ),
            );
        }
        let agents: usize = phases.values().map(|b| b.agents).sum();
        let sidecar_floor_cpus = agents as f64 * self.sidecar.cpus;
        let sidecar_floor_memory = agents as u64 * self.sidecar.memory.0;

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
            sidecar_floor_cpus,
            sidecar_floor_memory: ByteSize(sidecar_floor_memory),
            floors_oversubscribe_host: sidecar_floor_cpus > available_cpus
                || sidecar_floor_memory > available_memory,
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
            sidecar: SidecarModel::default(),
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
        // 5.33 CPUs over 10 agents: 0.533 each, below the 2-CPU cap; the sidecar takes a
        // quarter (0.133, above its 0.05 floor), the agent the rest.
        assert!((crit.sidecar.cpus - 0.1333).abs() < 1e-3);
        assert!((crit.agent.cpus - 0.4).abs() < 1e-3);
        assert!(!crit.floors_exceed_slice && !report.floors_oversubscribe_host);
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
    fn sidecar_floors_are_reserved_before_the_agents_share_the_slice() {
        // 34 agents on 4 CPUs and 2 GiB: 0.118 CPU and 60 MiB each. A quarter of that
        // (0.029 CPU, 15 MiB) is below the floor: every sidecar gets 0.05 CPU and 24 MiB and
        // the agent the rest of its part.
        let mut m = rules();
        m.phases.get_mut(&Phase::Specialized).unwrap().memory = ByteSize::gib(2);
        let r = m.compute(18.0, ByteSize::gib(36), |p| match p {
            Phase::Specialized => 34,
            _ => 1,
        });
        let spec = &r.phases[&Phase::Specialized];
        assert_eq!(spec.sidecar.cpus, 0.05);
        assert_eq!(spec.sidecar.memory, ByteSize::mib(24));
        let part_cpus = 4.0 / 34.0;
        assert!((spec.agent.cpus - (part_cpus - 0.05)).abs() < 1e-9);
        let part_mem = ByteSize::gib(2).0 / 34;
        assert_eq!(spec.agent.memory.0, part_mem - ByteSize::mib(24).0);
        // Agent and sidecars together stay inside the slice.
        assert!(34.0 * (spec.agent.cpus + spec.sidecar.cpus) <= spec.granted_cpus + 1e-9);
        assert!(34 * (spec.agent.memory.0 + spec.sidecar.memory.0) <= spec.granted_memory.0);
        assert!(!spec.floors_exceed_slice);
        // Concurrency follows the agent's CPUs, not the pair's: 0.068 x 64 = 4.
        assert_eq!(spec.agent.inbound_concurrency(), 4);
        assert!((r.sidecar_floor_cpus - 36.0 * 0.05).abs() < 1e-9);
    }

    #[test]
    fn floors_that_exceed_a_slice_or_the_host_are_reported() {
        // 100 specialized agents on 4 CPUs: 0.04 each, under the 0.05 floor.
        let r = rules().compute(18.0, ByteSize::gib(36), |p| match p {
            Phase::Specialized => 100,
            _ => 1,
        });
        let spec = &r.phases[&Phase::Specialized];
        assert!(spec.floors_exceed_slice);
        assert_eq!(spec.sidecar.cpus, 0.05);
        assert_eq!(spec.agent.cpus, MIN_AGENT_CPUS);
        assert!(!r.floors_oversubscribe_host);
        // 600 agents' floors (30 CPUs) on a host with 12 for agents.
        let r = rules().compute(12.0, ByteSize::gib(36), |_| 200);
        assert!(r.floors_oversubscribe_host);
        assert!(r.phases.values().all(|b| b.floors_exceed_slice));
    }

    #[test]
    fn a_sidecar_above_its_floor_takes_its_share_up_to_its_memory_cap() {
        // One critical agent: its part is capped at 2 CPUs and 4 GiB; its sidecar takes a
        // quarter of the CPUs and at most 64 MiB, the agent its full per-agent limit.
        let r = rules().compute(64.0, ByteSize::gib(256), |_| 1);
        let crit = &r.phases[&Phase::Critical];
        assert_eq!(crit.sidecar.cpus, 0.5);
        assert_eq!(crit.sidecar.memory, ByteSize::mib(64));
        assert_eq!(crit.agent.cpus, 2.0);
        assert_eq!(crit.agent.memory, ByteSize::gib(4));
    }

    #[test]
    fn sidecar_model_errors_name_their_key() {
        let mut m = rules();
        m.sidecar.share = 1.0;
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "sidecar.share: must be in [0, 1)"
        );
        m.sidecar = SidecarModel {
            max_memory: ByteSize::mib(8),
            ..SidecarModel::default()
        };
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("sidecar.max_memory"));
        m.sidecar = SidecarModel {
            cpus: 0.0,
            ..SidecarModel::default()
        };
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("sidecar.cpus"));
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
