//! `[rollout]`: how `deploy/deploy.sh` rolls out an agent phase (Rules 2 and 25). A canary of
//! `canary_percent` of the phase's agents starts first and is watched for `watch`: its
//! sidecars' error rate and p99 must stay at or under the thresholds, or the phase is rolled
//! back. Each phase may override any value under `[rollout.phases.<phase>]`. Loading
//! guarantees every value is usable; errors name file and line like the rest of the policy.

use crate::snapshot::{invalid, Invalid, PathSeg};
use crate::Phase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The mesh-wide values and the per-phase overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    #[serde(default = "default_canary_percent")]
    pub canary_percent: u8,
    #[serde(with = "humantime_serde", default = "default_watch")]
    pub watch: Duration,
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    #[serde(with = "humantime_serde", default = "default_max_p99")]
    pub max_p99: Duration,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: BTreeMap<Phase, RolloutOverride>,
}

/// `[rollout.phases.<phase>]`: unset values inherit the mesh-wide ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub watch: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_p99: Option<Duration>,
}

/// The values in force for one phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Canary {
    pub percent: u8,
    pub watch: Duration,
    pub max_error_rate: f64,
    pub max_p99: Duration,
}

fn default_canary_percent() -> u8 {
    10
}
fn default_watch() -> Duration {
    Duration::from_secs(60)
}
fn default_max_error_rate() -> f64 {
    0.05
}
fn default_max_p99() -> Duration {
    Duration::from_secs(2)
}

// === impl Rollout ===

impl Default for Rollout {
    fn default() -> Self {
        Self {
            canary_percent: default_canary_percent(),
            watch: default_watch(),
            max_error_rate: default_max_error_rate(),
            max_p99: default_max_p99(),
            phases: BTreeMap::new(),
        }
    }
}

impl Rollout {
    /// The canary of `phase`: its overrides over the mesh-wide values.
    pub fn canary(&self, phase: Phase) -> Canary {
        let o = self.phases.get(&phase).copied().unwrap_or_default();
        Canary {
            percent: o.canary_percent.unwrap_or(self.canary_percent),
            watch: o.watch.unwrap_or(self.watch),
            max_error_rate: o.max_error_rate.unwrap_or(self.max_error_rate),
            max_p99: o.max_p99.unwrap_or(self.max_p99),
        }
    }

    /// Every value in range; paths start at `rollout`.
    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        check(
            Some(self.canary_percent),
            Some(self.max_error_rate),
            Some(self.max_p99),
            |k| vec![Key("rollout"), Key(k)],
        )?;
        for (phase, o) in &self.phases {
            check(o.canary_percent, o.max_error_rate, o.max_p99, |k| {
                vec![
                    Key("rollout"),
                    Key("phases"),
                    Name(phase.as_str().to_owned()),
                    Key(k),
                ]
            })?;
        }
        Ok(())
    }
}

fn check(
    percent: Option<u8>,
    error_rate: Option<f64>,
    p99: Option<Duration>,
    at: impl Fn(&'static str) -> Vec<PathSeg>,
) -> Result<(), Invalid> {
    if percent.is_some_and(|p| !(1..=100).contains(&p)) {
        return Err(invalid(at("canary_percent"), "must be in 1..=100"));
    }
    if error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
        return Err(invalid(at("max_error_rate"), "must be in [0, 1]"));
    }
    if p99.is_some_and(|d| d.is_zero()) {
        return Err(invalid(at("max_p99"), "must be greater than zero"));
    }
    Ok(())
}

// === impl Canary ===

impl Canary {
    /// The watch in whole seconds, rounded up (deploy.sh counts seconds).
    pub fn watch_seconds(&self) -> u64 {
        self.watch.as_secs() + u64::from(self.watch.subsec_nanos() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_override_wins_and_the_rest_inherits() {
        let mut r = Rollout::default();
        r.phases.insert(
            Phase::Critical,
            RolloutOverride {
                max_error_rate: Some(0.01),
                watch: Some(Duration::from_millis(1500)),
                ..Default::default()
            },
        );
        let c = r.canary(Phase::Critical);
        assert_eq!((c.max_error_rate, c.percent), (0.01, 10));
        assert_eq!(c.watch_seconds(), 2);
        assert_eq!(c.max_p99, Duration::from_secs(2));
        assert_eq!(r.canary(Phase::Specialized).max_error_rate, 0.05);
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let mut r = Rollout {
            canary_percent: 0,
            ..Rollout::default()
        };
        assert_eq!(
            r.validate().unwrap_err().to_string(),
            "rollout.canary_percent: must be in 1..=100"
        );
        r.canary_percent = 10;
        r.phases.insert(
            Phase::Performance,
            RolloutOverride {
                max_error_rate: Some(1.5),
                ..Default::default()
            },
        );
        assert_eq!(
            r.validate().unwrap_err().to_string(),
            "rollout.phases.performance.max_error_rate: must be in [0, 1]"
        );
    }
}
