//! What `/status` reports: whether a snapshot is published (and why not), the discovery
//! source and whether it is stale, what it failed to read, the entries it left out and a
//! catalog held back; the policy in force and the last rejection, the budgets, and every
//! sidecar with its version, ack state and last contact.

use crate::consul::admit::Rejected;
use crate::guard::Held;
use crate::snapshots::Generation;
use mesh_config::Phase;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The state of the catalog source.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiscoveryStatus {
    pub source: &'static str,
    /// The catalog served is the last known one; the source is failing.
    pub stale: bool,
    pub last_error: Option<String>,
    /// What is failing now, one `what: error` each (the service list, single services).
    pub failing: Vec<String>,
    /// Entries left out of the catalog, with the reason.
    pub rejected: Vec<Rejected>,
    /// When the catalog last changed (0: never read).
    pub synced_unix_ms: u64,
}

/// The policy files' state: when the policy in force was applied, and the last rejection.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyStatus {
    pub applied_unix_ms: u64,
    pub rejected: Option<Rejection>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejection {
    pub file: String,
    pub line: usize,
    pub reason: String,
    /// Every error found, one `file:line: reason` each.
    pub errors: Vec<String>,
    pub at_unix_ms: u64,
}

/// A sidecar's report about a version: applied, or rejected with a reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub agent: String,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// What a sidecar fronts: its agent's app, or Ollama (the gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    App,
    Ollama,
}

#[derive(Debug)]
struct Sidecar {
    phase: Option<Phase>,
    /// Its admin listener (`/health`, `/metrics`), as it reported it.
    admin: Option<SocketAddr>,
    mode: Option<SidecarMode>,
    applied: u64,
    rejected: Option<(u64, String)>,
    last_contact: Instant,
}

/// Every sidecar that has polled or reported. Touched per poll and per ack, never on a
/// data path.
#[derive(Debug)]
pub struct Sidecars {
    inner: Mutex<HashMap<Box<str>, Sidecar>>,
    acks: watch::Sender<u64>,
}

// === impl Sidecars ===

impl Default for Sidecars {
    fn default() -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            acks: watch::Sender::new(0),
        }
    }
}

impl Sidecars {
    fn with<R>(&self, agent: &str, f: impl FnOnce(&mut Sidecar) -> R) -> R {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match map.get_mut(agent) {
            Some(e) => e,
            None => map.entry(agent.into()).or_insert(Sidecar {
                phase: None,
                admin: None,
                mode: None,
                applied: 0,
                rejected: None,
                last_contact: Instant::now(),
            }),
        };
        f(entry)
    }

    /// A long-poll arrived; `version` is what the sidecar has in force.
    pub fn contact(
        &self,
        agent: &str,
        phase: Option<Phase>,
        version: u64,
        admin: Option<SocketAddr>,
        mode: Option<SidecarMode>,
    ) {
        self.with(agent, |s| {
            s.last_contact = Instant::now();
            s.phase = phase.or(s.phase);
            s.admin = admin.or(s.admin);
            s.mode = mode.or(s.mode);
            if version > 0 {
                s.applied = version;
            }
        });
    }

    pub fn ack(&self, ack: &Ack) {
        self.with(&ack.agent, |s| {
            s.last_contact = Instant::now();
            match &ack.rejected {
                None => s.applied = ack.version,
                Some(reason) => s.rejected = Some((ack.version, reason.clone())),
            }
        });
        let result = if ack.rejected.is_some() {
            "rejected"
        } else {
            "applied"
        };
        ::metrics::counter!(crate::metrics::ACKS, "result" => result).increment(1);
        self.acks.send_modify(|n| *n += 1);
    }

    /// Bumps on every ack, so callers can wait for a condition without polling.
    pub fn acks(&self) -> watch::Receiver<u64> {
        self.acks.subscribe()
    }

    /// Sidecars that have applied `version`.
    pub fn applied(&self, version: u64) -> usize {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.values().filter(|s| s.applied == version).count()
    }

    fn report(&self, current: u64) -> Vec<serde_json::Value> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = map
            .iter()
            .map(|(agent, s)| {
                let (ack, reason) = match &s.rejected {
                    Some((v, reason)) if *v == current => ("rejected", Some(reason.clone())),
                    _ if s.applied == current => ("applied", None),
                    _ => ("pending", None),
                };
                json!({
                    "agent": &**agent,
                    "phase": s.phase,
                    "admin": s.admin.map(|a| a.to_string()),
                    "mode": s.mode,
                    "version": s.applied,
                    "ack": ack,
                    "reason": reason,
                    "last_contact_ms_ago": s.last_contact.elapsed().as_millis() as u64,
                })
            })
            .collect();
        rows.sort_by(|a, b| a["agent"].as_str().cmp(&b["agent"].as_str()));
        rows
    }
}

/// The views `/status` renders.
#[derive(Clone, Debug)]
pub struct Status {
    pub discovery: watch::Receiver<DiscoveryStatus>,
    pub policy: watch::Receiver<PolicyStatus>,
    pub generations: watch::Receiver<Arc<Generation>>,
    pub held: watch::Receiver<Option<Held>>,
    /// Why the last snapshot built was not served, while it is not.
    pub invalid: watch::Receiver<Option<String>>,
    pub sidecars: Arc<Sidecars>,
}

// === impl Status ===

impl Status {
    pub fn render(&self) -> serde_json::Value {
        let gen = self.generations.borrow().clone();
        let discovery = self.discovery.borrow().clone();
        let policy = self.policy.borrow().clone();
        let held = self.held.borrow().clone();
        // Version 0 is never served: say why, so an operator knows sidecars run on their own.
        let not_published = (gen.version == 0).then(|| match (&held, &discovery.last_error) {
            (Some(h), _) => format!("catalog held back: {}", h.reason),
            _ if self.invalid.borrow().is_some() => {
                "the snapshot built fails validation (see snapshot_invalid)".to_owned()
            }
            (None, Some(e)) if discovery.synced_unix_ms == 0 => format!(
                "no catalog read from {} yet; sidecars keep their last snapshot: {e}",
                discovery.source
            ),
            _ => format!(
                "waiting for the first catalog from {}; sidecars keep their last snapshot",
                discovery.source
            ),
        });
        json!({
            "snapshot_version": gen.version,
            "published": gen.version != 0,
            "not_published": not_published,
            "snapshot_invalid": *self.invalid.borrow(),
            "catalog": {
                "source": discovery.source,
                "stale": discovery.stale,
                "last_error": discovery.last_error,
                "failing": discovery.failing,
                "synced_unix_ms": discovery.synced_unix_ms,
                "services": gen.snapshot.services.len(),
                "held": held,
                "rejected": discovery.rejected,
                "skipped_routes": gen.skipped,
            },
            "policy": policy,
            "budget": gen.budget,
            "sidecars": self.sidecars.report(gen.version),
        })
    }
}
