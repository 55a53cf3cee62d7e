//! Budgets for the current policy and catalog: the host (as configured or read from the
//! machine), minus reserved pools, split among phases; each phase's slice holds its sidecars'
//! floors first, then its agents' shares, with each agent's Ollama rate; exported as metrics,
//! and the oversubscription (sidecar floors included) logged when the budgets change.

use mesh_config::budget::HostModel;
use mesh_config::units::ByteSize;
use mesh_config::{BudgetReport, Catalog, Policy, Registry};

/// The host capacity to budget: the policy's figures, or the machine's when `detect` is set.
pub fn host(model: &HostModel) -> (f64, ByteSize) {
    if !model.detect {
        return (model.cpus, model.memory);
    }
    let cpus = std::thread::available_parallelism().map_or(model.cpus, |n| n.get() as f64);
    let memory = mem_total().unwrap_or(model.memory);
    (cpus, memory)
}

fn mem_total() -> Option<ByteSize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(ByteSize(kib * 1024))
}

/// `None` when the policy models no phases. Pure: [`publish`] exports the result.
pub fn compute(policy: &Policy, catalog: &Catalog) -> Option<BudgetReport> {
    if policy.budget.phases.is_empty() {
        return None;
    }
    let (cpus, memory) = host(&policy.budget.host);
    let mut report = policy
        .budget
        .compute(cpus, memory, |phase| catalog.agents_in(phase));
    policy.ollama.size_rates(&mut report);
    Some(report)
}

/// Budgets for the agents of the registry on the host the policy describes (never the
/// machine this runs on, so a rendered deployment is the same wherever it is rendered).
pub fn for_registry(policy: &Policy, registry: &Registry) -> Option<BudgetReport> {
    if policy.budget.phases.is_empty() {
        return None;
    }
    let host = &policy.budget.host;
    let mut report = policy
        .budget
        .compute(host.cpus, host.memory, |phase| registry.count(phase));
    policy.ollama.size_rates(&mut report);
    Some(report)
}

/// One line per resource saying how far the phases exceed the host, empty when they fit.
pub fn oversubscription(r: &BudgetReport) -> Vec<String> {
    let mut lines = Vec::new();
    if r.cpu_scale < 1.0 {
        lines.push(format!(
            "phases ask for {} CPUs, {} are available: every phase's CPUs scaled by {:.3}",
            r.requested_cpus, r.available_cpus, r.cpu_scale
        ));
    }
    if r.memory_scale < 1.0 {
        lines.push(format!(
            "phases ask for {} of memory, {} is available: every phase's memory scaled by {:.3}",
            r.requested_memory, r.available_memory, r.memory_scale
        ));
    }
    for (phase, b) in &r.phases {
        if let Some(pool) = &b.capped_by_pool {
            lines.push(format!(
                "{phase}: memory capped by pool {pool} to {}",
                b.granted_memory
            ));
        }
    }
    if r.floors_oversubscribe_host {
        lines.push(format!(
            "the sidecar floors alone ask for {:.2} CPUs and {}, the host has {} CPUs and {} for agents",
            r.sidecar_floor_cpus, r.sidecar_floor_memory, r.available_cpus, r.available_memory
        ));
    }
    for (phase, b) in &r.phases {
        if b.floors_exceed_slice {
            lines.push(format!(
                "{phase}: {} sidecar floors of {:.2} CPUs and {} each exceed the phase's {:.2} CPUs and {}: its agents get {:.2} CPUs and {}",
                b.agents,
                b.sidecar.cpus,
                b.sidecar.memory,
                b.granted_cpus,
                b.granted_memory,
                b.agent.cpus,
                b.agent.memory
            ));
        }
    }
    lines
}

/// Exports `new` when it differs from `prev`, warning once per change while the phases are
/// oversubscribed (not on every rebuild); says whether it warned.
pub fn publish(prev: Option<&BudgetReport>, new: Option<&BudgetReport>) -> bool {
    match new {
        Some(r) if prev != Some(r) => export(r),
        _ => false,
    }
}

fn export(r: &BudgetReport) -> bool {
    use crate::metrics::*;
    for (phase, b) in &r.phases {
        let p = phase.as_str();
        for (kind, cpus, mem) in [
            ("requested", b.requested_cpus, b.requested_memory),
            ("granted", b.granted_cpus, b.granted_memory),
            ("agent", b.agent.cpus, b.agent.memory),
            ("sidecar", b.sidecar.cpus, b.sidecar.memory),
        ] {
            metrics::gauge!(BUDGET_CPUS, "phase" => p, "kind" => kind).set(cpus);
            metrics::gauge!(BUDGET_MEMORY, "phase" => p, "kind" => kind).set(mem.0 as f64);
        }
    }
    for (phase, b) in &r.phases {
        // Calls per second; 0 when the phase's agents are not limited.
        let rate = b
            .agent
            .ollama_rate
            .map_or(0.0, |r| f64::from(r.count.get()) / r.per.as_secs_f64());
        metrics::gauge!(BUDGET_OLLAMA_RATE, "phase" => phase.as_str()).set(rate);
    }
    metrics::gauge!(BUDGET_SCALE, "resource" => "cpu").set(r.cpu_scale);
    metrics::gauge!(BUDGET_SCALE, "resource" => "memory").set(r.memory_scale);
    metrics::gauge!(BUDGET_OVERSUBSCRIBED).set(if r.oversubscribed { 1.0 } else { 0.0 });
    if r.oversubscribed {
        tracing::warn!(
            requested_cpus = r.requested_cpus,
            available_cpus = r.available_cpus,
            cpu_scale = r.cpu_scale,
            requested_memory = %r.requested_memory,
            available_memory = %r.available_memory,
            memory_scale = r.memory_scale,
            "phases ask for more than the host has; slices scaled down proportionally"
        );
    }
    r.oversubscribed
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_config::Phase;
    use std::path::Path;

    fn shipped() -> (Policy, Registry) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh");
        let policy = mesh_config::policy::load_dir(&dir).unwrap();
        let registry = mesh_config::registry::load_file(&dir.join("agents.toml")).unwrap();
        (policy, registry)
    }

    #[test]
    fn the_shipped_registry_gives_every_sidecar_at_least_its_floor() {
        let (policy, registry) = shipped();
        let r = for_registry(&policy, &registry).unwrap();
        let floor = policy.budget.sidecar;
        for (phase, b) in &r.phases {
            assert!(b.sidecar.cpus >= floor.cpus, "{phase}");
            assert!(b.sidecar.memory >= floor.memory, "{phase}");
            assert!(!b.floors_exceed_slice, "{phase}");
            let n = b.agents as f64;
            assert!(
                n * (b.agent.cpus + b.sidecar.cpus) <= b.granted_cpus + 1e-9,
                "{phase}"
            );
        }
        // 34 specialized agents: their sidecars sit on the floor, not on a quarter of 0.078.
        let spec = &r.phases[&Phase::Specialized];
        assert_eq!(spec.agents, 34);
        assert_eq!(spec.sidecar.cpus, floor.cpus);
        assert_eq!(spec.sidecar.memory, floor.memory);
        assert!(!r.floors_oversubscribe_host);
        assert!(oversubscription(&r).iter().all(|l| !l.contains("floor")));
    }

    #[test]
    fn floors_that_do_not_fit_are_reported_per_phase_and_for_the_host() {
        let (mut policy, registry) = shipped();
        // A 0.2-CPU floor: 34 specialized sidecars need 6.8 of the phase's 2.67 CPUs, and
        // 69 need 13.8 CPUs of the host's 12.
        policy.budget.sidecar.cpus = 0.2;
        let r = for_registry(&policy, &registry).unwrap();
        let lines = oversubscription(&r);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("the sidecar floors alone ask for 13.80 CPUs")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("specialized: 34 sidecar floors of 0.20 CPUs")),
            "{lines:?}"
        );
        assert!(r.phases[&Phase::Specialized].floors_exceed_slice);
        // The agents still get a share to size their concurrency and Ollama rate by.
        assert!(r.agent(Phase::Specialized).unwrap().inbound_concurrency() >= 1);
        assert!(r.agent(Phase::Specialized).unwrap().ollama_rate.is_some());
    }
}
