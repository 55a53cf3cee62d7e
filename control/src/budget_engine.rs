//! Budgets for the current policy and catalog: the host (as configured or read from the
//! machine), minus reserved pools, split among phases and agents, with each agent's Ollama
//! rate; exported as metrics, and the oversubscription logged when the budgets change.

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
