//! Versioned generations of what sidecars receive. A generation is built whenever the catalog
//! or the policy changes and differs from the last one; its per-phase views (the shared
//! snapshot plus the phase's agent budget) are serialized once, so answering a long-poll is a
//! reference-count increment.

use bytes::Bytes;
use mesh_config::resilience::Fallback;
use mesh_config::{BudgetReport, Catalog, Phase, Policy, Resilience, Snapshot};
use std::collections::HashSet;
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
        let (mut snapshot, mut skipped) = policy.snapshot(catalog, version);
        skip_undiscovered_fallbacks(&mut snapshot, &mut skipped);
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

    /// Checks every view as a sidecar will: parsed from the bytes it receives and validated
    /// with the same rules. A generation that fails is never served.
    pub fn check(&self) -> Result<(), String> {
        for body in &self.views {
            serde_json::from_slice::<Snapshot>(body)
                .map_err(|e| format!("not a snapshot: {e}"))?
                .validate()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
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

/// A fallback to a service that is not discovered is left out and reported, as a route rule
/// to one is: a sidecar rejects a snapshot whose fallback names an unknown service, and
/// Consul decides which services exist.
fn skip_undiscovered_fallbacks(snap: &mut Snapshot, skipped: &mut Vec<String>) {
    let known: HashSet<String> = snap.services.iter().map(|s| s.name.clone()).collect();
    let mut skip = |owner: &str, r: &mut Resilience| {
        if let Some(Fallback::Target { service }) = &r.fallback {
            if !known.contains(service) {
                skipped.push(format!(
                    "fallback of {owner} skipped: target {service:?} is not discovered"
                ));
                r.fallback = None;
            }
        }
    };
    skip("defaults", &mut snap.defaults.resilience);
    for svc in &mut snap.services {
        skip(&svc.name, &mut svc.resilience);
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
    /// Why the last build was not served, while it is not (see [`Generation::check`]).
    pub invalid: watch::Sender<Option<String>>,
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
        if let Err(reason) = gen.check() {
            // A bug, not an input: everything from Consul and the policy is checked before.
            if self.invalid.borrow().as_ref() != Some(&reason) {
                tracing::error!(version, %reason,
                    "built snapshot fails the sidecars' validation; not served, the last one stays");
                ::metrics::counter!(crate::metrics::SNAPSHOT_INVALID).increment(1);
            }
            self.invalid.send_replace(Some(reason));
            return;
        }
        self.invalid.send_replace(None);
        tracing::info!(
            version,
            services = gen.snapshot.services.len(),
            routes = gen.snapshot.routes.len(),
            "snapshot built"
        );
        crate::budget_engine::publish(prev.budget.as_ref(), gen.budget.as_ref());
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
        // The shipped policy's `[trace] sampling` reaches every sidecar (Rule 28).
        assert_eq!(view.trace.as_ref().map(|t| t.sampling), Some(0.1));
        let bare: Snapshot = serde_json::from_slice(&gen.view(None)).unwrap();
        assert!(bare.budget.is_none());
        // The same inputs make the same content under another version.
        assert!(Generation::build(&catalog, &policy, 9).same_as(&gen));
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn count(&self, needle: &str) -> usize {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .matches(needle)
                .count()
        }
    }

    #[test]
    fn oversubscription_is_logged_when_the_budgets_change_not_on_every_rebuild() {
        let policy = mesh_config::policy::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh"),
        )
        .unwrap();
        let svc = |name: &str, phase, port| CatalogService {
            name: name.into(),
            phase,
            endpoints: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
        };
        let (catalog_tx, catalog) =
            watch::channel(Arc::new(Catalog::new(vec![svc("a", Phase::Critical, 1)])));
        let (policy_tx, policy) = watch::channel(Arc::new(policy));
        let (out, gens) = watch::channel(Arc::new(Generation::default()));
        let mut builder = Snapshots {
            catalog,
            policy,
            out,
            invalid: watch::Sender::new(None),
            synced: true,
        };
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let warning = "phases ask for more than the host has";
        tracing::subscriber::with_default(subscriber, || {
            // The shipped phases ask 18 CPUs of 12: the first build warns.
            builder.rebuild();
            assert_eq!(log.count(warning), 1);
            // A new endpoint makes a new version with the same budgets: no second warning.
            let v1 = gens.borrow().version;
            catalog_tx.send_replace(Arc::new(Catalog::new(vec![svc("a", Phase::Critical, 2)])));
            builder.rebuild();
            assert_ne!(gens.borrow().version, v1);
            assert_eq!(log.count(warning), 1);
            // Neither does a rebuild with nothing new, nor a policy resend.
            policy_tx.send_modify(|_| {});
            builder.rebuild();
            assert_eq!(log.count(warning), 1);
            // A second critical agent changes the phase budget (its agent count): it warns again.
            catalog_tx.send_replace(Arc::new(Catalog::new(vec![
                svc("a", Phase::Critical, 2),
                svc("b", Phase::Critical, 3),
            ])));
            builder.rebuild();
            assert_eq!(log.count(warning), 2);
        });
    }

    #[test]
    fn versions_increase_past_the_clock() {
        let now = crate::status::unix_ms();
        assert!(next_version(0) >= now);
        assert_eq!(next_version(u64::MAX / 2), u64::MAX / 2 + 1);
    }
}
