//! Watches Consul with blocking queries: the service list, and for each mesh service its
//! passing instances. Follows Consul's rules for blocking queries: the index is reset when it
//! goes backwards or is 0, errors back off with jitter, and a query whose index did not move
//! is not repeated faster than `min_interval`. While Consul is unreachable the last catalog
//! stays published and the status says it is stale.

use super::client::{ConsulClient, Query};
use super::{MESH_TAG, PHASE_TAG};
use crate::status::DiscoveryStatus;
use mesh_config::backoff::Backoff;
use mesh_config::{Catalog, CatalogService, Phase};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Timing of the watch.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// `wait` sent with each blocking query.
    pub wait: Duration,
    /// Floor between two queries when the index did not move.
    pub min_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(60),
            min_interval: Duration::from_secs(1),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The index for the next query, after Consul's documented rules.
pub fn next_index(prev: u64, got: u64) -> u64 {
    if got < prev || got == 0 {
        0
    } else {
        got
    }
}

/// How long to pause before the next query: a query that came back early without the index
/// moving (a reset, an idempotent write, a misbehaving server) must not spin.
pub fn pause(moved: bool, elapsed: Duration, min_interval: Duration) -> Duration {
    if moved {
        Duration::ZERO
    } else {
        min_interval.saturating_sub(elapsed)
    }
}

/// The phase a service's tags name, if it is a mesh service.
pub fn mesh_phase(tags: &[String]) -> Option<Phase> {
    if !tags.iter().any(|t| t == MESH_TAG) {
        return None;
    }
    let phase = tags
        .iter()
        .filter_map(|t| t.strip_prefix(PHASE_TAG))
        .find_map(|p| Phase::ALL.into_iter().find(|ph| ph.as_str() == p));
    Some(phase.unwrap_or(Phase::Specialized))
}

pub struct ConsulWatch {
    pub client: ConsulClient,
    pub params: Params,
    pub catalog: watch::Sender<Arc<Catalog>>,
    pub status: watch::Sender<DiscoveryStatus>,
}

struct Health {
    name: String,
    result: Result<Vec<SocketAddr>, String>,
}

/// A per-service watch, stopped when the service leaves the catalog.
struct Watched {
    phase: Phase,
    endpoints: Option<Vec<SocketAddr>>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === impl ConsulWatch ===

impl ConsulWatch {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel::<Health>(1024);
        let mut services: BTreeMap<String, Watched> = BTreeMap::new();
        // What is failing now, by service ("" for the service list).
        let mut failing: BTreeMap<String, String> = BTreeMap::new();
        let mut index = 0;
        let mut backoff = Backoff::new(self.params.backoff_base, self.params.backoff_max);
        let mut next = Box::pin(list(
            self.client.clone(),
            index,
            self.params,
            Duration::ZERO,
        ));
        loop {
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                (res, elapsed) = &mut next => {
                    let delay = match res {
                        Ok(r) => {
                            backoff.reset();
                            failing.remove("");
                            let moved = r.index != index;
                            index = next_index(index, r.index);
                            self.reconcile(&mut services, &mut failing, r.value, &tx);
                            pause(moved, elapsed, self.params.min_interval)
                        }
                        Err(e) => {
                            ::metrics::counter!(crate::metrics::CONSUL_ERRORS).increment(1);
                            if !failing.contains_key("") {
                                tracing::warn!(error = %e, "consul unreachable; serving the last catalog");
                            }
                            failing.insert(String::new(), e.to_string());
                            backoff.next_delay()
                        }
                    };
                    next = Box::pin(list(self.client.clone(), index, self.params, delay));
                }
                Some(h) = rx.recv() => {
                    let Some(w) = services.get_mut(&h.name) else { continue };
                    match h.result {
                        Ok(eps) => {
                            failing.remove(&h.name);
                            w.endpoints = Some(eps);
                        }
                        Err(e) => {
                            ::metrics::counter!(crate::metrics::CONSUL_ERRORS).increment(1);
                            failing.insert(h.name, e);
                        }
                    }
                }
            }
            self.publish(&services, &failing);
        }
    }

    fn reconcile(
        &self,
        services: &mut BTreeMap<String, Watched>,
        failing: &mut BTreeMap<String, String>,
        listed: BTreeMap<String, Vec<String>>,
        tx: &mpsc::Sender<Health>,
    ) {
        let wanted: BTreeMap<String, Phase> = listed
            .into_iter()
            .filter_map(|(name, tags)| Some((name.clone(), mesh_phase(&tags)?)))
            .collect();
        services.retain(|name, _| wanted.contains_key(name));
        failing.retain(|name, _| name.is_empty() || wanted.contains_key(name));
        for (name, phase) in wanted {
            if let Some(w) = services.get_mut(&name) {
                w.phase = phase;
                continue;
            }
            let task = tokio::spawn(watch_health(
                self.client.clone(),
                name.clone(),
                self.params,
                tx.clone(),
            ));
            services.insert(
                name,
                Watched {
                    phase,
                    endpoints: None,
                    _task: AbortOnDrop(task),
                },
            );
        }
    }

    /// Publishes once every service has had its first answer; then on every change.
    fn publish(&self, services: &BTreeMap<String, Watched>, failing: &BTreeMap<String, String>) {
        let stale = !failing.is_empty();
        let last_error = failing.values().next().cloned();
        self.status.send_if_modified(|s| {
            let changed = s.stale != stale || s.last_error != last_error;
            s.stale = stale;
            s.last_error = last_error;
            changed
        });
        ::metrics::gauge!(crate::metrics::CATALOG_STALE).set(if stale { 1.0 } else { 0.0 });
        let complete = services
            .iter()
            .all(|(name, w)| w.endpoints.is_some() || failing.contains_key(name));
        if !complete {
            return;
        }
        let catalog = Catalog::new(
            services
                .iter()
                .map(|(name, w)| CatalogService {
                    name: name.clone(),
                    phase: w.phase,
                    endpoints: w.endpoints.clone().unwrap_or_default(),
                })
                .collect(),
        );
        let first = self.status.borrow().synced_unix_ms == 0;
        let mut published = false;
        self.catalog.send_if_modified(|c| {
            if **c == catalog && !first {
                return false;
            }
            *c = Arc::new(catalog);
            published = true;
            true
        });
        if published {
            self.status
                .send_modify(|s| s.synced_unix_ms = crate::status::unix_ms());
        }
    }
}

async fn list(
    client: ConsulClient,
    index: u64,
    params: Params,
    delay: Duration,
) -> (
    Result<super::client::Indexed<BTreeMap<String, Vec<String>>>, super::ConsulError>,
    Duration,
) {
    tokio::time::sleep(delay).await;
    let started = Instant::now();
    let q = Query {
        index,
        wait: params.wait,
    };
    let res = client.catalog_services(q).await;
    (res, started.elapsed())
}

async fn watch_health(
    client: ConsulClient,
    name: String,
    params: Params,
    tx: mpsc::Sender<Health>,
) {
    let mut index = 0;
    let mut backoff = Backoff::new(params.backoff_base, params.backoff_max);
    loop {
        let started = Instant::now();
        let q = Query {
            index,
            wait: params.wait,
        };
        let (result, delay) = match client.healthy_instances(&name, q).await {
            Ok(r) => {
                backoff.reset();
                let moved = r.index != index;
                index = next_index(index, r.index);
                let eps = r.value.iter().filter_map(|e| e.socket_addr()).collect();
                (
                    Ok(eps),
                    pause(moved, started.elapsed(), params.min_interval),
                )
            }
            Err(e) => (Err(e.to_string()), backoff.next_delay()),
        };
        let health = Health {
            name: name.clone(),
            result,
        };
        if tx.send(health).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_resets_when_it_goes_backwards_or_is_zero() {
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(10, 10), 10);
        // A snapshot restore or a new leader can move the index back: start over.
        assert_eq!(next_index(10, 3), 0);
        assert_eq!(next_index(10, 0), 0);
    }

    #[test]
    fn an_early_return_without_progress_waits_out_the_floor() {
        let floor = Duration::from_secs(1);
        assert_eq!(
            pause(false, Duration::from_millis(10), floor),
            Duration::from_millis(990)
        );
        assert_eq!(pause(false, Duration::from_secs(60), floor), Duration::ZERO);
        assert_eq!(
            pause(true, Duration::from_millis(10), floor),
            Duration::ZERO
        );
    }

    #[test]
    fn mesh_services_are_tagged() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            mesh_phase(&tags(&["mesh", "phase=critical"])),
            Some(Phase::Critical)
        );
        assert_eq!(mesh_phase(&tags(&["mesh"])), Some(Phase::Specialized));
        assert_eq!(mesh_phase(&tags(&["phase=critical"])), None);
    }
}
