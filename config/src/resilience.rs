//! Per-target resilience policy: retries with a budget, circuit breakers, outlier ejection and
//! the fallback answered while a breaker is open. Each policy has defaults (Rule 18: three
//! attempts with exponential backoff); a service overrides any of them, whole, in its
//! `resilience` table, and `[defaults.resilience]` sets them mesh-wide.
//!
//! ```toml
//! [[services]]
//! name = "b"
//! [services.resilience]
//! retry = { max_attempts = 2, backoff = "50ms" }
//! breaker = { consecutive_failures = 3, cooldown = "2s" }
//! fallback = { kind = "static", status = 200, body = { answer = "cached" } }
//! ```

use crate::snapshot::{Invalid, PathSeg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Statuses that count as failures for retries and breakers unless configured otherwise.
pub const DEFAULT_FAILURE_STATUSES: [u16; 3] = [502, 503, 504];
/// The largest request body a policy may buffer for replay.
pub const MAX_REPLAY_BYTES: u64 = 16 * 1024 * 1024;

/// Policy overrides for one service, or the mesh-wide defaults. A missing policy falls back to
/// the mesh default and then to the built-in default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resilience {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<Breaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejection: Option<Ejection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

impl Resilience {
    /// `self` over `base`: each policy set here wins.
    pub fn or(&self, base: &Resilience) -> Resilience {
        Resilience {
            retry: self.retry.clone().or_else(|| base.retry.clone()),
            breaker: self.breaker.clone().or_else(|| base.breaker.clone()),
            ejection: self.ejection.clone().or_else(|| base.ejection.clone()),
            fallback: self.fallback.clone().or_else(|| base.fallback.clone()),
        }
    }
}

/// The policies in force for one service after defaults are applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    pub retry: Retry,
    pub breaker: Breaker,
    pub ejection: Ejection,
    pub fallback: Fallback,
}

/// Retries: bounded attempts with exponential backoff and full jitter, limited by a budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in total, the first included; 1 turns retries off.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The first backoff's upper bound; it doubles per retry up to `max_backoff`.
    #[serde(with = "humantime_serde", default = "default_backoff")]
    pub backoff: Duration,
    #[serde(with = "humantime_serde", default = "default_max_backoff")]
    pub max_backoff: Duration,
    /// Bounds each attempt on its own; the caller's deadline still bounds them all.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Retries may add at most this share of the target's requests...
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    /// ...plus this many retries per second.
    #[serde(default = "default_budget_min_per_second")]
    pub budget_min_per_second: u32,
    /// Request bodies up to this size are kept for replay; larger ones are never retried.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Response statuses that are retried.
    #[serde(default = "default_statuses")]
    pub statuses: Vec<u16>,
    /// Retries non-idempotent methods (POST, PATCH) too; without it a request opts in with the
    /// `x-mesh-retryable: true` header.
    #[serde(default)]
    pub non_idempotent: bool,
}

/// A circuit breaker, per target and per endpoint: it opens on consecutive failures or on a
/// failure ratio over a sliding window, stays open for `cooldown`, then lets `probes` requests
/// through; their success closes it. After a failed probe it waits `cooldown` again, or half the
/// time it has been open when that is longer (up to `max_cooldown`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Breaker {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// 0 turns this trigger off.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// Failures over requests in `window`; 0 turns this trigger off.
    #[serde(default = "default_failure_ratio")]
    pub failure_ratio: f64,
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    /// The ratio is judged only once the window holds this many requests.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(with = "humantime_serde", default = "default_cooldown")]
    pub cooldown: Duration,
    #[serde(with = "humantime_serde", default = "default_max_cooldown")]
    pub max_cooldown: Duration,
    /// Requests let through while half-open; all must succeed to close.
    #[serde(default = "default_probes")]
    pub probes: u32,
    /// Response statuses that count as failures (connect errors, resets and timeouts always do).
    #[serde(default = "default_statuses")]
    pub statuses: Vec<u16>,
}

/// Outlier ejection: an endpoint with consecutive failures leaves the balancer for an interval
/// that grows with each ejection, never more than `max_ejected_percent` of a target at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ejection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde", default = "default_eject_interval")]
    pub interval: Duration,
    #[serde(with = "humantime_serde", default = "default_max_eject_interval")]
    pub max_interval: Duration,
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u8,
}

/// What a caller gets while the target's breaker is open. No connect is attempted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fallback {
    /// 503 with `Retry-After` and a JSON body naming the open breaker.
    /// A struct variant so that unknown keys beside `kind` are rejected.
    Unavailable {},
    /// A fixed answer.
    Static {
        status: u16,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<serde_json::Value>,
    },
    /// The same request, sent to another service.
    Target { service: String },
}

fn yes() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_millis(25)
}
fn default_max_backoff() -> Duration {
    Duration::from_millis(250)
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min_per_second() -> u32 {
    10
}
fn default_max_body_bytes() -> u64 {
    64 * 1024
}
fn default_statuses() -> Vec<u16> {
    DEFAULT_FAILURE_STATUSES.to_vec()
}
fn default_consecutive() -> u32 {
    5
}
fn default_failure_ratio() -> f64 {
    0.5
}
fn default_window() -> Duration {
    Duration::from_secs(10)
}
fn default_min_requests() -> u32 {
    20
}
fn default_cooldown() -> Duration {
    Duration::from_secs(5)
}
fn default_max_cooldown() -> Duration {
    Duration::from_secs(60)
}
fn default_probes() -> u32 {
    1
}
fn default_eject_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_max_eject_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejected_percent() -> u8 {
    50
}

// === impl Resilience ===

impl Resilience {
    /// This service's policies over the mesh defaults.
    pub fn resolve(&self, defaults: &Resilience) -> Resolved {
        Resolved {
            retry: pick(&self.retry, &defaults.retry),
            breaker: pick(&self.breaker, &defaults.breaker),
            ejection: pick(&self.ejection, &defaults.ejection),
            fallback: pick(&self.fallback, &defaults.fallback),
        }
    }

    /// Checks ranges serde cannot; `at` is the path of this table. `services` answers whether a
    /// fallback target exists.
    pub fn validate(
        &self,
        at: &[PathSeg],
        this: Option<&str>,
        services: &dyn Fn(&str) -> bool,
    ) -> Result<(), Invalid> {
        let path = |policy: &'static str, key: &'static str| {
            let mut p = at.to_vec();
            p.push(PathSeg::Key(policy));
            p.push(PathSeg::Key(key));
            p
        };
        let fail = |policy, key, reason: &str| Err(Invalid::new(path(policy, key), reason));
        if let Some(r) = &self.retry {
            if !(1..=10).contains(&r.max_attempts) {
                return fail("retry", "max_attempts", "must be 1 to 10");
            }
            if r.backoff.is_zero() {
                return fail("retry", "backoff", "must be greater than zero");
            }
            if r.max_backoff < r.backoff {
                return fail("retry", "max_backoff", "must be at least backoff");
            }
            if r.per_try_timeout.is_some_and(|t| t.is_zero()) {
                return fail("retry", "per_try_timeout", "must be greater than zero");
            }
            if !(0.0..=1.0).contains(&r.budget_ratio) {
                return fail("retry", "budget_ratio", "must be between 0 and 1");
            }
            if r.max_body_bytes > MAX_REPLAY_BYTES {
                return fail("retry", "max_body_bytes", "must be at most 16 MiB");
            }
            if let Some(s) = bad_status(&r.statuses) {
                return fail("retry", "statuses", &format!("{s} is not a status code"));
            }
        }
        if let Some(b) = &self.breaker {
            if !(0.0..=1.0).contains(&b.failure_ratio) {
                return fail("breaker", "failure_ratio", "must be between 0 and 1");
            }
            if b.enabled && b.consecutive_failures == 0 && b.failure_ratio == 0.0 {
                return fail(
                    "breaker",
                    "consecutive_failures",
                    "an enabled breaker needs consecutive_failures or failure_ratio",
                );
            }
            if b.window < Duration::from_millis(100) {
                return fail("breaker", "window", "must be at least 100ms");
            }
            if b.min_requests == 0 {
                return fail("breaker", "min_requests", "must be at least 1");
            }
            if b.cooldown.is_zero() {
                return fail("breaker", "cooldown", "must be greater than zero");
            }
            if b.max_cooldown < b.cooldown {
                return fail("breaker", "max_cooldown", "must be at least cooldown");
            }
            if b.probes == 0 {
                return fail("breaker", "probes", "must be at least 1");
            }
            if let Some(s) = bad_status(&b.statuses) {
                return fail("breaker", "statuses", &format!("{s} is not a status code"));
            }
        }
        if let Some(e) = &self.ejection {
            if e.enabled && e.consecutive_failures == 0 {
                return fail("ejection", "consecutive_failures", "must be at least 1");
            }
            if e.interval.is_zero() {
                return fail("ejection", "interval", "must be greater than zero");
            }
            if e.max_interval < e.interval {
                return fail("ejection", "max_interval", "must be at least interval");
            }
            if e.max_ejected_percent > 100 {
                return fail("ejection", "max_ejected_percent", "must be 0 to 100");
            }
        }
        match &self.fallback {
            Some(Fallback::Static {
                status, headers, ..
            }) => {
                if !(200..=599).contains(status) {
                    return fail("fallback", "status", "must be 200 to 599");
                }
                for (name, value) in headers {
                    let bad_name = name.is_empty()
                        || !name.bytes().all(|b| {
                            b.is_ascii_lowercase()
                                || b.is_ascii_digit()
                                || b"!#$%&'*+-.^_`|~".contains(&b)
                        });
                    let bad_value = value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f);
                    if bad_name || bad_value {
                        let mut p = path("fallback", "headers");
                        p.push(PathSeg::Name(name.clone()));
                        return Err(Invalid::new(p, "not a valid lower-case header"));
                    }
                }
            }
            Some(Fallback::Target { service }) => {
                if this == Some(service.as_str()) {
                    return fail(
                        "fallback",
                        "service",
                        "a service cannot fall back to itself",
                    );
                }
                if !services(service) {
                    return fail(
                        "fallback",
                        "service",
                        &format!("unknown service {service:?}"),
                    );
                }
            }
            Some(Fallback::Unavailable {}) | None => {}
        }
        Ok(())
    }
}

fn pick<T: Clone + Default>(own: &Option<T>, mesh: &Option<T>) -> T {
    own.as_ref().or(mesh.as_ref()).cloned().unwrap_or_default()
}

fn bad_status(statuses: &[u16]) -> Option<u16> {
    statuses.iter().copied().find(|s| !(100..=599).contains(s))
}

// === impl Retry ===

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            per_try_timeout: None,
            budget_ratio: default_budget_ratio(),
            budget_min_per_second: default_budget_min_per_second(),
            max_body_bytes: default_max_body_bytes(),
            statuses: default_statuses(),
            non_idempotent: false,
        }
    }
}

// === impl Breaker ===

impl Default for Breaker {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: default_consecutive(),
            failure_ratio: default_failure_ratio(),
            window: default_window(),
            min_requests: default_min_requests(),
            cooldown: default_cooldown(),
            max_cooldown: default_max_cooldown(),
            probes: default_probes(),
            statuses: default_statuses(),
        }
    }
}

// === impl Fallback ===

impl Default for Fallback {
    fn default() -> Self {
        Fallback::Unavailable {}
    }
}

// === impl Ejection ===

impl Default for Ejection {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: default_consecutive(),
            interval: default_eject_interval(),
            max_interval: default_max_eject_interval(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::snapshot_str;
    use std::path::Path;

    fn load(text: &str) -> Result<crate::Snapshot, crate::load::Located> {
        snapshot_str(Path::new("mesh.toml"), text).map_err(|e| e.located().unwrap().clone())
    }

    #[test]
    fn service_overrides_mesh_defaults_per_policy() {
        let snap = load(
            r#"
version = 1
[defaults.resilience]
retry = { max_attempts = 2 }

[[services]]
name = "a"
[services.resilience]
breaker = { consecutive_failures = 3, cooldown = "2s" }
fallback = { kind = "static", status = 200, headers = { x-cached = "1" }, body = { answer = "cached" } }

[[services]]
name = "b"
[services.resilience.fallback]
kind = "target"
service = "a"
"#,
        )
        .unwrap();
        let a = snap.services[0]
            .resilience
            .resolve(&snap.defaults.resilience);
        // The mesh default applies where the service says nothing...
        assert_eq!(a.retry.max_attempts, 2);
        // ...and the service's own policy where it does, with built-in defaults for the rest.
        assert_eq!(a.breaker.consecutive_failures, 3);
        assert_eq!(a.breaker.cooldown, Duration::from_secs(2));
        assert_eq!(a.breaker.probes, 1);
        assert!(matches!(a.fallback, Fallback::Static { status: 200, .. }));
        let b = snap.services[1]
            .resilience
            .resolve(&snap.defaults.resilience);
        assert_eq!(
            b.fallback,
            Fallback::Target {
                service: "a".into()
            }
        );
        assert_eq!(b.ejection, Ejection::default());
    }

    #[test]
    fn defaults_follow_rule_18() {
        let r = Resilience::default().resolve(&Resilience::default());
        assert_eq!(r.retry.max_attempts, 3);
        assert_eq!(r.retry.max_body_bytes, 64 * 1024);
        assert_eq!(r.breaker.statuses, vec![502, 503, 504]);
        assert_eq!(r.fallback, Fallback::Unavailable {});
    }

    #[test]
    fn out_of_range_value_names_its_line() {
        let err = load(
            "version = 1\n[[services]]\nname = \"a\"\n[services.resilience.retry]\nmax_attempts = 0\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert_eq!(
            err.reason,
            "services[0].resilience.retry.max_attempts: must be 1 to 10"
        );
    }

    #[test]
    fn unknown_fallback_target_names_its_line() {
        let err = load(
            "version = 1\n[[services]]\nname = \"a\"\n[services.resilience]\nfallback = { kind = \"target\", service = \"zz\" }\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.reason.contains("unknown service \"zz\""), "{err}");
    }

    #[test]
    fn unknown_policy_key_names_its_line() {
        let err = load(
            "version = 1\n[[services]]\nname = \"a\"\n[services.resilience.breaker]\nthreshold = 3\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.reason.contains("threshold"), "{err}");
    }

    #[test]
    fn unknown_fallback_field_is_rejected() {
        let err = load(
            "version = 1\n[[services]]\nname = \"a\"\n[services.resilience]\nfallback = { kind = \"unavailable\", status = 200 }\n",
        )
        .unwrap_err();
        assert!(err.reason.contains("status"), "{err}");
    }
}
