//! Watches Consul with blocking queries: the service list, and for each mesh service its
//! instances. Follows Consul's rules for blocking queries: the index is reset when it goes
//! backwards or is 0, errors back off with jitter, and a query whose index did not move is not
//! repeated faster than `min_interval`. After a failure the next query asks for the current
//! state (index 0), so a Consul that recovers clears the staleness with its first answer; the
//! liveness [`probe`](super::probe) reports a hung or failing Consul within seconds and cuts
//! backoffs short when it returns.
//!
//! Nothing is published before the service list and every listed service have been read once:
//! a control process started while Consul is down publishes no catalog at all. Afterwards a
//! failing service keeps its last endpoints, and the status says the catalog is stale. What
//! the model cannot carry is left out per entry by [`admit`](super::admit) and reported.

use super::admit::{self, Admitted, HealthPolicy, Listed, Rejected};
use super::client::{ConsulClient, ConsulError, Indexed, Query};
use super::probe::{self, Liveness};
use crate::status::DiscoveryStatus;
use mesh_config::backoff::Backoff;
use mesh_config::{Catalog, Phase};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Timing of the watch, and which check states count as healthy.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// `wait` sent with each blocking query; a query is abandoned after it plus a margin.
    pub wait: Duration,
    /// Floor between two queries when the index did not move.
    pub min_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often Consul's liveness is probed, and how long a probe may take.
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub health: HealthPolicy,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(60),
            min_interval: Duration::from_secs(1),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(2),
            health: HealthPolicy::default(),
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

pub struct ConsulWatch {
    pub client: ConsulClient,
    pub params: Params,
    /// The catalog read from Consul; `None` until it has been read once.
    pub catalog: watch::Sender<Option<Arc<Catalog>>>,
    pub status: watch::Sender<DiscoveryStatus>,
}

enum Event {
    List(Result<Listed, String>),
    Service {
        name: String,
        result: Result<Admitted, String>,
    },
}

/// A per-service watch, stopped when the service leaves the list.
struct Watched {
    phase: Phase,
    /// The last answer read; `None` until the first one.
    admitted: Option<Admitted>,
    /// Its last failure, while failing.
    failing: Option<String>,
    _task: AbortOnDrop,
}

#[derive(Default)]
struct World {
    /// The last service list read; `None` until the first one.
    listed: Option<Listed>,
    list_failing: Option<String>,
    services: BTreeMap<String, Watched>,
    live: Liveness,
    /// Rejections already logged and counted, so a steady one is reported once.
    reported: BTreeSet<(String, Option<String>, admit::Reason)>,
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
        let (live_tx, mut live) = watch::channel(Liveness::default());
        let _probe = AbortOnDrop(tokio::spawn(probe::run(
            self.client.clone(),
            self.params,
            live_tx,
            stop.clone(),
        )));
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        let client = self.client.clone();
        let _list = AbortOnDrop(tokio::spawn(follow(
            self.params,
            live.clone(),
            move |q| {
                let client = client.clone();
                async move { client.catalog_services(q).await }
            },
            tx.clone(),
            |r| Event::List(r.map(|listed| admit::services(&listed))),
        )));
        let mut world = World::default();
        loop {
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                Some(event) = rx.recv() => match event {
                    Event::List(Ok(listed)) => {
                        if let Some(error) = world.list_failing.take() {
                            tracing::info!(%error, "consul service list answers again");
                        }
                        self.reconcile(&mut world, listed, &tx, &live);
                    }
                    Event::List(Err(error)) => {
                        ::metrics::counter!(crate::metrics::CONSUL_ERRORS).increment(1);
                        if world.list_failing.is_none() && live.borrow().up {
                            tracing::warn!(%error, "consul service list failed; serving the last catalog");
                        }
                        world.list_failing = Some(error);
                    }
                    Event::Service { name, result } => {
                        let Some(w) = world.services.get_mut(&name) else { continue };
                        match result {
                            Ok(admitted) => {
                                if let Some(error) = w.failing.take() {
                                    tracing::info!(service = %name, %error, "consul health query answers again");
                                }
                                w.admitted = Some(admitted);
                            }
                            Err(error) => {
                                ::metrics::counter!(crate::metrics::CONSUL_ERRORS).increment(1);
                                // While Consul is down the probe has said so once; one line per
                                // service would bury it.
                                if w.failing.is_none() && live.borrow().up {
                                    tracing::warn!(service = %name, %error,
                                        "consul health query failed; keeping the service's last endpoints");
                                }
                                w.failing = Some(error);
                            }
                        }
                    }
                },
                res = live.changed() => {
                    if res.is_err() { return }
                    world.live = live.borrow_and_update().clone();
                }
            }
            self.publish(&mut world);
        }
    }

    fn reconcile(
        &self,
        world: &mut World,
        listed: Listed,
        tx: &mpsc::Sender<Event>,
        live: &watch::Receiver<Liveness>,
    ) {
        world
            .services
            .retain(|name, _| listed.services.contains_key(name));
        for (name, phase) in &listed.services {
            if let Some(w) = world.services.get_mut(name) {
                w.phase = *phase;
                continue;
            }
            let client = self.client.clone();
            let health = self.params.health;
            let service = name.clone();
            let task = tokio::spawn(follow(
                self.params,
                live.clone(),
                move |q| {
                    let client = client.clone();
                    let service = service.clone();
                    async move { client.instances(&service, q).await }
                },
                tx.clone(),
                {
                    let name = name.clone();
                    move |r: Result<Vec<serde_json::Value>, String>| Event::Service {
                        name: name.clone(),
                        result: r.map(|entries| admit::instances(&name, &entries, health)),
                    }
                },
            ));
            world.services.insert(
                name.clone(),
                Watched {
                    phase: *phase,
                    admitted: None,
                    failing: None,
                    _task: AbortOnDrop(task),
                },
            );
        }
        world.listed = Some(listed);
    }

    /// Reports the state, and publishes the catalog once the list and every listed service
    /// have been read (or have failed) once; then on every change.
    fn publish(&self, world: &mut World) {
        let mut failing: Vec<String> = Vec::new();
        if let Some(e) = &world.list_failing {
            failing.push(format!("service list: {e}"));
        }
        for (name, w) in &world.services {
            if let Some(e) = &w.failing {
                failing.push(format!("{name}: {e}"));
            }
        }
        let stale = !world.live.up || !failing.is_empty();
        let last_error = world
            .live
            .error
            .clone()
            .or_else(|| failing.first().cloned());
        let rejected = self.rejections(world);
        self.status.send_if_modified(|s| {
            let changed = s.stale != stale
                || s.last_error != last_error
                || s.failing != failing
                || s.rejected != rejected;
            s.stale = stale;
            s.last_error = last_error;
            s.failing = failing;
            s.rejected = rejected;
            changed
        });
        ::metrics::gauge!(crate::metrics::CATALOG_STALE).set(if stale { 1.0 } else { 0.0 });

        if world.listed.is_none() {
            return;
        }
        let complete = world
            .services
            .values()
            .all(|w| w.admitted.is_some() || w.failing.is_some());
        if !complete {
            return;
        }
        // A service Consul failed to answer for since the start is not known yet.
        let catalog = admit::catalog(
            world
                .services
                .iter()
                .filter_map(|(name, w)| Some((name.as_str(), w.phase, w.admitted.as_ref()?))),
        );
        let mut published = false;
        self.catalog.send_if_modified(|c| {
            if c.as_deref() == Some(&catalog) {
                return false;
            }
            *c = Some(Arc::new(catalog));
            published = true;
            true
        });
        if published {
            self.status
                .send_modify(|s| s.synced_unix_ms = crate::status::unix_ms());
        }
    }

    /// Everything left out now; new ones are logged and counted.
    fn rejections(&self, world: &mut World) -> Vec<Rejected> {
        let mut all: Vec<Rejected> = world
            .listed
            .iter()
            .flat_map(|l| l.rejected.iter().cloned())
            .chain(
                world
                    .services
                    .values()
                    .filter_map(|w| w.admitted.as_ref())
                    .flat_map(|a| a.rejected.iter().cloned()),
            )
            .collect();
        all.sort();
        let now: BTreeSet<_> = all
            .iter()
            .map(|r| (r.service.clone(), r.instance.clone(), r.reason))
            .collect();
        for r in &all {
            if world
                .reported
                .contains(&(r.service.clone(), r.instance.clone(), r.reason))
            {
                continue;
            }
            ::metrics::counter!(crate::metrics::CATALOG_REJECTED, "reason" => r.reason.as_str())
                .increment(1);
            let instance = r.instance.as_deref().unwrap_or("");
            if r.reason == admit::Reason::NotAnAgent {
                tracing::info!(service = %r.service, instance, reason = r.reason.as_str(),
                    detail = %r.detail, "consul entry is not an agent; left out of the catalog");
            } else {
                tracing::warn!(service = %r.service, instance, reason = r.reason.as_str(),
                    detail = %r.detail, "consul entry rejected; left out of the catalog");
            }
        }
        world.reported = now;
        all
    }
}

/// Follows one blocking query for as long as the receiver lives: waits while the probe finds
/// Consul down, abandons a query in flight when it goes down, resets the index after a
/// failure, and backs off (cut short when Consul comes back).
async fn follow<T, F, Fut>(
    params: Params,
    mut live: watch::Receiver<Liveness>,
    mut query: F,
    tx: mpsc::Sender<Event>,
    wrap: impl Fn(Result<T, String>) -> Event,
) where
    F: FnMut(Query) -> Fut,
    Fut: Future<Output = Result<Indexed<T>, ConsulError>>,
{
    let mut index = 0;
    let mut backoff = Backoff::new(params.backoff_base, params.backoff_max);
    loop {
        if live.wait_for(|l| l.up).await.is_err() {
            return;
        }
        let recoveries = live.borrow().recoveries;
        let started = Instant::now();
        let q = Query {
            index,
            wait: params.wait,
        };
        let result = tokio::select! {
            r = query(q) => r,
            down = live.wait_for(|l| !l.up) => match down {
                Ok(l) => Err(ConsulError::Down(l.error.clone().unwrap_or_default())),
                Err(_) => return,
            },
        };
        let (event, delay) = match result {
            Ok(r) => {
                backoff.reset();
                let moved = r.index != index;
                index = next_index(index, r.index);
                (
                    wrap(Ok(r.value)),
                    pause(moved, started.elapsed(), params.min_interval),
                )
            }
            Err(e) => {
                index = 0;
                (wrap(Err(e.to_string())), backoff.next_delay())
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            back = live.wait_for(|l| l.recoveries != recoveries) => if back.is_err() { return },
        }
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
    fn a_blocking_query_is_abandoned_soon_after_its_wait() {
        use super::super::client::blocking_limit;
        assert_eq!(
            blocking_limit(Duration::from_secs(60)),
            Duration::from_secs(64) + Duration::from_millis(750)
        );
        assert_eq!(
            blocking_limit(Duration::from_secs(5)),
            Duration::from_millis(6312) + Duration::from_micros(500)
        );
    }
}
