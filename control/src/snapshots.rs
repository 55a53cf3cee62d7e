//! Versioned generations of what sidecars receive. A generation is built whenever the catalog
//! or the policy changes and differs from the last one; its per-phase views (the shared
//! snapshot plus the phase's agent budget) are serialized once, so answering a long-poll is a
//! reference-count increment.

use bytes::Bytes;
use mesh_config::{BudgetReport, Catalog, Phase, Policy, Snapshot};
use std::sync::Arc;
use tokio::sync::watch;

/// One version of the mesh as sidecars see it. Version 0 means "not synced yet": it is never
/// served.
#[derive(Debug, Default)]
pub struct Generation {
    pub version: u64,
    /// The snapshot shared by every sidecar (no budget).
    pub snapshot: Arc<Snapshot>,
    pub budget: Option<BudgetReport>,
    /// Route rules left out because their backend is not discovered.
    pub skipped: Vec<String>,
    /// JSON bodies, indexed by phase (`Phase::ALL` order) and then one without a budget.
    views: Vec<Bytes>,
}

/// Versions are wall-clock milliseconds, kept strictly increasing: a restarted control
/// process serves versions above those it served before, with no state to carry over.
pub fn next_version(prev: u64) -> u64 {
    (prev + 1).max(crate::status::unix_ms())
}

// === impl Generation ===

impl Generation {
    pub fn build(catalog: &Catalog, policy: &Policy, version: u64) -> Self {
        let (snapshot, skipped) = policy.snapshot(catalog, version);
        let budget = crate::budget_engine::compute(policy, catalog);
        let mut views = Vec::with_capacity(Phase::ALL.len() + 1);
        for phase in Phase::ALL {
            let mut view = snapshot.clone();
            view.budget = budget.as_ref().and_then(|b| b.agent(phase));
            views.push(to_json(&view));
        }
        views.push(to_json(&snapshot));
        Self {
            version,
            snapshot: Arc::new(snapshot),
            budget,
            skipped,
            views,
        }
    }

    /// The body for a sidecar of `phase`.
    pub fn view(&self, phase: Option<Phase>) -> Bytes {
        let i = phase.map_or(Phase::ALL.len(), |p| p as usize);
        self.views.get(i).cloned().unwrap_or_default()
    }

    /// Same content as `other`, whatever the versions.
    fn same_as(&self, other: &Generation) -> bool {
        self.budget == other.budget
            && self.skipped == other.skipped
            && Snapshot {
                version: 0,
                ..(*self.snapshot).clone()
            } == Snapshot {
                version: 0,
                ..(*other.snapshot).clone()
            }
    }
}

fn to_json(snap: &Snapshot) -> Bytes {
    // A snapshot holds only strings, numbers and maps with string keys: it always serializes.
    Bytes::from(serde_json::to_vec(snap).unwrap_or_default())
}

/// Rebuilds the generation on every catalog or policy change.
pub struct Snapshots {
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub policy: watch::Receiver<Arc<Policy>>,
    pub out: watch::Sender<Arc<Generation>>,
    /// False until the catalog source has delivered a first catalog.
    pub synced: bool,
}

impl Snapshots {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            if self.synced {
                self.rebuild();
            }
            tokio::select! {
                res = self.catalog.changed() => {
                    if res.is_err() { return }
                    self.synced = true;
                }
                res = self.policy.changed() => if res.is_err() { return },
                _ = crate::stopped(&mut stop) => return,
            }
        }
    }

    fn rebuild(&mut self) {
        let catalog = self.catalog.borrow_and_update().clone();
        let policy = self.policy.borrow_and_update().clone();
        let prev = self.out.borrow().clone();
        let candidate = Generation::build(&catalog, &policy, prev.version);
        if prev.version != 0 && candidate.same_as(&prev) {
            return;
        }
        let version = next_version(prev.version);
        let gen = Generation::build(&catalog, &policy, version);
        tracing::info!(
            version,
            services = gen.snapshot.services.len(),
            routes = gen.snapshot.routes.len(),
            "snapshot built"
        );
        ::metrics::gauge!(crate::metrics::SNAPSHOT_VERSION).set(version as f64);
        ::metrics::gauge!(crate::metrics::CATALOG_SERVICES).set(catalog.services.len() as f64);
        self.out.send_replace(Arc::new(gen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_config::CatalogService;

    #[test]
    fn views_carry_the_phase_budget() {
        let policy = mesh_config::policy::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh"),
        )
        .unwrap();
        let catalog = Catalog::new(vec![CatalogService {
            name: "a".into(),
            phase: Phase::Critical,
            endpoints: vec!["127.0.0.1:1".parse().unwrap()],
        }]);
        let gen = Generation::build(&catalog, &policy, 5);
        let view: Snapshot = serde_json::from_slice(&gen.view(Some(Phase::Critical))).unwrap();
        assert_eq!(view.version, 5);
        assert_eq!(view.budget.unwrap().phase, Phase::Critical);
        let bare: Snapshot = serde_json::from_slice(&gen.view(None)).unwrap();
        assert!(bare.budget.is_none());
        // The same inputs make the same content under another version.
        assert!(Generation::build(&catalog, &policy, 9).same_as(&gen));
    }

    #[test]
    fn versions_increase_past_the_clock() {
        let now = crate::status::unix_ms();
        assert!(next_version(0) >= now);
        assert_eq!(next_version(u64::MAX / 2), u64::MAX / 2 + 1);
    }
}
