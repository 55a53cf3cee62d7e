//! The last gate before a catalog reaches the snapshots: a catalog that loses too much at
//! once is held back, not pushed. Sidecars keep routing on what they have while an operator
//! looks; the hold shows in `/status`, the log and `mesh_control_catalog_held`.
//!
//! Held back: a first catalog that is empty (a fresh or wiped Consul would otherwise replace
//! every sidecar's persisted snapshot with nothing); any catalog with no services after one
//! with some; a catalog with more than `max_drop_percent` fewer services, or fewer endpoints,
//! than the one in force. A later catalog within the limit replaces the held one and ends the
//! hold; an operator ends it with `POST /v1/catalog/confirm` (see `push`), or raises the limit
//! (`--max-catalog-drop 100` never holds).
//!
//! With `--catalog-state FILE`, every published catalog is kept there, and a restarted control
//! process judges its first read against it rather than against nothing: a restart during a
//! partial recovery of the source (ten of 69 services back) holds the partial catalog instead
//! of publishing it. The kept catalog is only a yardstick; nothing is published from it.

use crate::status::unix_ms;
use mesh_config::Catalog;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// Default for `--max-catalog-drop`: losing more than half the services or endpoints in one
/// step is an outage of the source far more often than an intended change.
pub const DEFAULT_MAX_DROP_PERCENT: u8 = 50;

/// A catalog held back, as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Held {
    pub reason: String,
    pub services_in_force: usize,
    pub services_held: usize,
    pub endpoints_in_force: usize,
    pub endpoints_held: usize,
    pub since_unix_ms: u64,
}

/// What the gate decides for one catalog.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Publish,
    Hold(String),
}

/// An operator's confirmation: publishes the held catalog; answers what it published.
pub type Confirm = oneshot::Sender<Result<Held, &'static str>>;

pub struct Guard {
    pub max_drop_percent: u8,
    /// Catalogs from the source; `None` until it has been read once.
    pub candidates: watch::Receiver<Option<Arc<Catalog>>>,
    /// The catalog in force, read by the snapshot builder.
    pub out: watch::Sender<Arc<Catalog>>,
    pub held: watch::Sender<Option<Held>>,
    pub confirms: mpsc::Receiver<Confirm>,
    /// Where the published catalog is kept across restarts (`--catalog-state`).
    pub state: Option<PathBuf>,
}

/// Decides whether `candidate` may replace `in_force` (`None`: nothing published yet).
pub fn decide(in_force: Option<&Catalog>, candidate: &Catalog, max_drop_percent: u8) -> Decision {
    if max_drop_percent >= 100 {
        return Decision::Publish;
    }
    let Some(in_force) = in_force else {
        return if candidate.services.is_empty() {
            Decision::Hold("the first catalog read has no services".into())
        } else {
            Decision::Publish
        };
    };
    let (was, now) = (in_force.services.len(), candidate.services.len());
    if was > 0 && now == 0 {
        return Decision::Hold(format!("every service would go: {was} -> 0"));
    }
    if dropped_too_much(was, now, max_drop_percent) {
        return Decision::Hold(format!(
            "services would drop by more than {max_drop_percent}% at once: {was} -> {now}"
        ));
    }
    let (was, now) = (endpoints(in_force), endpoints(candidate));
    if dropped_too_much(was, now, max_drop_percent) {
        return Decision::Hold(format!(
            "endpoints would drop by more than {max_drop_percent}% at once: {was} -> {now}"
        ));
    }
    Decision::Publish
}

fn endpoints(c: &Catalog) -> usize {
    c.services.iter().map(|s| s.endpoints.len()).sum()
}

fn dropped_too_much(was: usize, now: usize, max_percent: u8) -> bool {
    now < was && (was - now) * 100 > was * usize::from(max_percent)
}

// === impl Guard ===

impl Guard {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut in_force: Option<Arc<Catalog>> = match &self.state {
            Some(path) => read_state(path).await.map(Arc::new),
            None => None,
        };
        loop {
            let published = self.out.borrow().clone();
            tokio::select! {
                res = self.candidates.changed() => {
                    if res.is_err() { return }
                    let candidate = self.candidates.borrow_and_update().clone();
                    if let Some(c) = candidate {
                        self.consider(&mut in_force, c);
                    }
                }
                Some(reply) = self.confirms.recv() => {
                    let _ = reply.send(self.confirm(&mut in_force));
                }
                _ = crate::stopped(&mut stop) => return,
            }
            let now = self.out.borrow().clone();
            if let (Some(path), false) = (&self.state, Arc::ptr_eq(&published, &now)) {
                write_state(path, &now).await;
            }
        }
    }

    fn consider(&self, in_force: &mut Option<Arc<Catalog>>, candidate: Arc<Catalog>) {
        match decide(in_force.as_deref(), &candidate, self.max_drop_percent) {
            Decision::Publish => {
                // The gauge moves on transitions only: several control processes may share
                // one recorder (tests embed them).
                if let Some(h) = self.held.send_replace(None) {
                    tracing::info!(reason = %h.reason, services = candidate.services.len(),
                        "catalog no longer held back: the source is back within bounds");
                    ::metrics::gauge!(crate::metrics::CATALOG_HELD).set(0.0);
                }
                self.publish(in_force, candidate);
            }
            Decision::Hold(reason) => {
                let held = Held {
                    services_in_force: in_force.as_ref().map_or(0, |c| c.services.len()),
                    services_held: candidate.services.len(),
                    endpoints_in_force: in_force.as_deref().map_or(0, endpoints),
                    endpoints_held: endpoints(&candidate),
                    since_unix_ms: self
                        .held
                        .borrow()
                        .as_ref()
                        .map_or_else(unix_ms, |h| h.since_unix_ms),
                    reason,
                };
                if self.held.borrow().is_none() {
                    ::metrics::counter!(crate::metrics::CATALOG_HOLDS).increment(1);
                    tracing::warn!(reason = %held.reason, services_in_force = held.services_in_force,
                        services_held = held.services_held, endpoints_in_force = held.endpoints_in_force,
                        endpoints_held = held.endpoints_held,
                        "catalog held back; sidecars keep their snapshot until it recovers or an operator confirms");
                }
                ::metrics::gauge!(crate::metrics::CATALOG_HELD).set(1.0);
                self.held.send_replace(Some(held));
            }
        }
    }

    fn confirm(&self, in_force: &mut Option<Arc<Catalog>>) -> Result<Held, &'static str> {
        let Some(held) = self.held.borrow().clone() else {
            return Err("no catalog is held back");
        };
        let Some(candidate) = self.candidates.borrow().clone() else {
            return Err("no catalog is held back");
        };
        tracing::warn!(reason = %held.reason, services = candidate.services.len(),
            "operator confirmed the held catalog; publishing it");
        self.held.send_replace(None);
        ::metrics::gauge!(crate::metrics::CATALOG_HELD).set(0.0);
        self.publish(in_force, candidate);
        Ok(held)
    }

    fn publish(&self, in_force: &mut Option<Arc<Catalog>>, catalog: Arc<Catalog>) {
        *in_force = Some(catalog.clone());
        self.out.send_replace(catalog);
    }
}

/// The catalog published before a restart; a missing or unreadable file is no yardstick.
async fn read_state(path: &Path) -> Option<Catalog> {
    let text = match tokio::fs::read(path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot read the catalog kept from before the restart; judging the first read on its own");
            return None;
        }
    };
    match serde_json::from_slice::<Catalog>(&text) {
        Ok(catalog) => {
            tracing::info!(path = %path.display(), services = catalog.services.len(),
                "the first catalog read is judged against the one published before the restart");
            Some(catalog)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "the catalog kept from before the restart does not parse; judging the first read on its own");
            None
        }
    }
}

/// Replaces the kept catalog whole (write, then rename), so a crash leaves the old or the new.
async fn write_state(path: &Path, catalog: &Catalog) {
    let tmp = path.with_extension("tmp");
    let res = async {
        let json = serde_json::to_vec(catalog).map_err(std::io::Error::other)?;
        tokio::fs::write(&tmp, json).await?;
        tokio::fs::rename(&tmp, path).await
    };
    if let Err(e) = res.await {
        ::metrics::counter!(crate::metrics::CATALOG_STATE_WRITE_FAILURES).increment(1);
        tracing::warn!(path = %path.display(), error = %e,
            "cannot keep the published catalog; a restart will judge its first read on its own");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_config::{CatalogService, Phase};

    fn catalog(services: usize, endpoints_each: u16) -> Catalog {
        Catalog::new(
            (0..services)
                .map(|i| CatalogService {
                    name: format!("s{i}"),
                    phase: Phase::Critical,
                    endpoints: (0..endpoints_each)
                        .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + p)))
                        .collect(),
                })
                .collect(),
        )
    }

    #[test]
    fn drops_beyond_the_limit_are_held() {
        let held = |r| matches!(r, Decision::Hold(_));
        // Nothing published yet: an empty first catalog waits, a real one goes.
        assert!(held(decide(None, &catalog(0, 0), 50)));
        assert_eq!(decide(None, &catalog(0, 0), 100), Decision::Publish);
        assert_eq!(decide(None, &catalog(3, 1), 50), Decision::Publish);
        // N -> 0 is held whatever the limit, short of 100 % (never hold).
        assert!(held(decide(Some(&catalog(1, 1)), &catalog(0, 0), 99)));
        assert_eq!(
            decide(Some(&catalog(1, 1)), &catalog(0, 0), 100),
            Decision::Publish
        );
        // Half may go; more than half may not.
        assert_eq!(
            decide(Some(&catalog(10, 1)), &catalog(5, 1), 50),
            Decision::Publish
        );
        assert!(held(decide(Some(&catalog(10, 1)), &catalog(4, 1), 50)));
        // Every service stays but nearly every endpoint goes (all checks critical at once).
        assert!(held(decide(Some(&catalog(10, 2)), &catalog(10, 0), 50)));
        // Growth and moves are never held.
        assert_eq!(
            decide(Some(&catalog(2, 1)), &catalog(69, 1), 0),
            Decision::Publish
        );
    }

    #[tokio::test]
    async fn the_kept_catalog_round_trips_and_a_bad_file_is_no_yardstick() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog-state.json");
        assert_eq!(read_state(&path).await, None);
        write_state(&path, &catalog(3, 2)).await;
        assert_eq!(read_state(&path).await, Some(catalog(3, 2)));
        std::fs::write(&path, "{\"services\": [").unwrap();
        assert_eq!(read_state(&path).await, None);
    }
}
