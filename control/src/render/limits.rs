//! Container limits from an agent's budget: the agent and its sidecar share the agent's slice
//! (the sidecar takes a small, bounded part), so their sum never exceeds what the budget
//! engine granted.

use mesh_config::units::ByteSize;
use mesh_config::{BudgetReport, Phase, Registry};
use std::collections::BTreeMap;

/// One container's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub cpus: f64,
    pub memory: ByteSize,
}

/// An agent, its sidecar, and the sidecar's inbound concurrency: one computation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLimits {
    pub phase: Phase,
    pub agent: Limits,
    pub sidecar: Limits,
    pub concurrency: usize,
}

/// The sidecar's part of a pair's CPUs and memory, and its memory cap.
const SIDECAR_CPU_SHARE: f64 = 0.25;
const SIDECAR_MEMORY_SHARE: f64 = 0.25;
const SIDECAR_MEMORY_CAP: u64 = 64 << 20;
/// Compose expresses CPUs to the hundredth and memory in MiB; round down to stay inside.
const MIB: u64 = 1 << 20;

fn floor_cpus(v: f64) -> f64 {
    ((v * 100.0).floor() / 100.0).max(0.01)
}

fn floor_mib(v: u64) -> ByteSize {
    ByteSize((v / MIB).max(1) * MIB)
}

/// Limits for every agent of the registry, by name.
pub fn pairs(
    report: &BudgetReport,
    registry: &Registry,
) -> Result<BTreeMap<String, PairLimits>, String> {
    let mut out = BTreeMap::new();
    for agent in &registry.agents {
        let budget = report
            .agent(agent.phase)
            .ok_or_else(|| format!("{}: phase {} has no budget", agent.name, agent.phase))?;
        let sidecar_cpus = floor_cpus(budget.cpus * SIDECAR_CPU_SHARE);
        let sidecar_mem = floor_mib(
            ((budget.memory.0 as f64 * SIDECAR_MEMORY_SHARE) as u64).min(SIDECAR_MEMORY_CAP),
        );
        let agent_cpus = floor_cpus(budget.cpus - sidecar_cpus);
        let agent_mem = floor_mib(budget.memory.0.saturating_sub(sidecar_mem.0));
        out.insert(
            agent.name.clone(),
            PairLimits {
                phase: agent.phase,
                agent: Limits {
                    cpus: agent_cpus,
                    memory: agent_mem,
                },
                sidecar: Limits {
                    cpus: sidecar_cpus,
                    memory: sidecar_mem,
                },
                concurrency: budget.inbound_concurrency(),
            },
        );
    }
    Ok(out)
}

// === impl Limits ===

impl Limits {
    /// `{cpus: "0.4", memory: 384m}` for compose.
    pub fn compose(&self) -> String {
        format!(
            "{{cpus: \"{}\", memory: {}m}}",
            trim(self.cpus),
            self.memory.0 / MIB
        )
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_never_exceeds_its_budget() {
        let policy = mesh_config::policy::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh"),
        )
        .unwrap();
        let registry = mesh_config::registry::load_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh/agents.toml"),
        )
        .unwrap();
        let report = crate::budget_engine::for_registry(&policy, &registry).unwrap();
        for (name, p) in pairs(&report, &registry).unwrap() {
            let b = report.agent(p.phase).unwrap();
            assert!(p.agent.cpus + p.sidecar.cpus <= b.cpus + 1e-9, "{name}");
            assert!(
                p.agent.memory.0 + p.sidecar.memory.0 <= b.memory.0,
                "{name}"
            );
            assert_eq!(p.concurrency, b.inbound_concurrency(), "{name}");
        }
    }

    #[test]
    fn limits_print_for_compose() {
        let l = Limits {
            cpus: 0.4,
            memory: ByteSize(384 * MIB),
        };
        assert_eq!(l.compose(), "{cpus: \"0.4\", memory: 384m}");
    }
}
