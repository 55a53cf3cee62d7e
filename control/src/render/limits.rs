//! Container limits from the budget engine: each agent's and each sidecar's own figure (the
//! engine reserves the sidecar's floor before it shares a phase's slice among the agents),
//! rounded to what compose expresses without the pair exceeding what the engine granted.

use mesh_config::units::ByteSize;
use mesh_config::{BudgetReport, Phase, Registry};
use std::collections::BTreeMap;

/// One container's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub cpus: f64,
    pub memory: ByteSize,
}

/// An agent, its sidecar, the sidecar's inbound concurrency and its connection cap: one
/// computation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLimits {
    pub phase: Phase,
    pub agent: Limits,
    pub sidecar: Limits,
    pub concurrency: usize,
    /// `limits.max_connections`: what each of the sidecar's traffic listeners holds at most.
    pub max_connections: usize,
}

/// Measured (benches/README.md, "Idle connection flood"): a served, kept-alive connection holds
/// about 18 KiB (24 with a margin); under load the sidecar's own working set is 12-14 MiB.
const CONNECTION_BYTES: u64 = 24 << 10;
const WORKING_SET: u64 = 16 << 20;
/// Below this a sidecar refuses ordinary traffic; a floor this low is reported by no one, so
/// the cap never goes under it.
const MIN_CONNECTIONS: usize = 64;

/// The Ollama gateway sidecar's memory limit.
pub const GATEWAY_MEMORY: ByteSize = ByteSize(64 << 20);

/// Connections each of the two traffic listeners (inbound, outbound) may hold so that both
/// full stay inside the sidecar's memory limit: a connection flood is refused with 503, not
/// answered by the kernel's OOM killer.
pub fn max_connections(memory: ByteSize) -> usize {
    let room = memory.0.saturating_sub(WORKING_SET) / CONNECTION_BYTES / 2;
    (room as usize).max(MIN_CONNECTIONS)
}

/// Compose expresses CPUs to the hundredth and memory in MiB: a sidecar is rounded up (never
/// under its floor), its agent down by as much more (the pair stays inside its grant).
const MIB: u64 = 1 << 20;

fn floor_cpus(v: f64) -> f64 {
    // The epsilon keeps 0.05 (0.0500...01 x 100) from rounding to 0.06 or 0.04.
    (((v * 100.0) + 1e-9).floor() / 100.0).max(0.01)
}

fn ceil_cpus(v: f64) -> f64 {
    (((v * 100.0) - 1e-9).ceil() / 100.0).max(0.01)
}

fn floor_mib(v: u64) -> ByteSize {
    ByteSize((v / MIB).max(1) * MIB)
}

fn ceil_mib(v: u64) -> ByteSize {
    ByteSize(v.div_ceil(MIB).max(1) * MIB)
}

/// Limits for every agent of the registry, by name.
pub fn pairs(
    report: &BudgetReport,
    registry: &Registry,
) -> Result<BTreeMap<String, PairLimits>, String> {
    let mut out = BTreeMap::new();
    for agent in &registry.agents {
        let phase = report
            .phases
            .get(&agent.phase)
            .ok_or_else(|| format!("{}: phase {} has no budget", agent.name, agent.phase))?;
        let (budget, side) = (phase.agent, phase.sidecar);
        let sidecar_cpus = ceil_cpus(side.cpus);
        let sidecar_mem = ceil_mib(side.memory.0);
        let agent_cpus = floor_cpus(budget.cpus - (sidecar_cpus - side.cpus));
        let agent_mem = floor_mib(
            budget
                .memory
                .0
                .saturating_sub(sidecar_mem.0 - side.memory.0),
        );
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
                max_connections: max_connections(sidecar_mem),
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
    fn a_pair_never_exceeds_its_budget_and_a_sidecar_never_goes_under_its_floor() {
        let policy = mesh_config::policy::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh"),
        )
        .unwrap();
        let registry = mesh_config::registry::load_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh/agents.toml"),
        )
        .unwrap();
        let report = crate::budget_engine::for_registry(&policy, &registry).unwrap();
        let floor = policy.budget.sidecar;
        for (name, p) in pairs(&report, &registry).unwrap() {
            let phase = &report.phases[&p.phase];
            let (b, s) = (phase.agent, phase.sidecar);
            assert!(
                p.agent.cpus + p.sidecar.cpus <= b.cpus + s.cpus + 1e-9,
                "{name}"
            );
            assert!(
                p.agent.memory.0 + p.sidecar.memory.0 <= b.memory.0 + s.memory.0,
                "{name}"
            );
            assert!(p.sidecar.cpus >= floor.cpus - 1e-9, "{name}");
            assert!(p.sidecar.memory >= floor.memory, "{name}");
            assert!(!phase.floors_exceed_slice, "{name}");
            assert_eq!(p.concurrency, b.inbound_concurrency(), "{name}");
        }
    }

    #[test]
    fn rounding_keeps_the_floor_and_the_pair_inside_its_grant() {
        assert_eq!(ceil_cpus(0.05), 0.05);
        assert_eq!(floor_cpus(0.05), 0.05);
        assert_eq!(ceil_cpus(0.1333), 0.14);
        assert_eq!(floor_cpus(0.4 - 0.0067), 0.39);
        assert_eq!(ceil_mib(24 * MIB + 1), ByteSize(25 * MIB));
        assert_eq!(ceil_mib(24 * MIB), ByteSize(24 * MIB));
    }

    #[test]
    fn the_connection_cap_keeps_a_full_sidecar_inside_its_memory() {
        // 24 MiB: 8 MiB beside the working set, 170 connections of 24 KiB on each listener.
        assert_eq!(max_connections(ByteSize(24 * MIB)), 170);
        assert_eq!(max_connections(ByteSize(64 * MIB)), 1024);
        for mib in [24, 37, 64] {
            let n = max_connections(ByteSize(mib * MIB)) as u64;
            assert!(WORKING_SET + 2 * n * CONNECTION_BYTES <= mib * MIB, "{mib}");
        }
        assert_eq!(max_connections(ByteSize(8 * MIB)), MIN_CONNECTIONS);
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
