//! Ollama policy: how the gateway in front of the one shared Ollama server queues requests
//! (Rule 22), what each agent may ask of it (Rules 23-24), and how fast each caller's sidecar
//! lets its agent call it.
//!
//! ```toml
//! [ollama.gateway]
//! parallel = 1
//! queue_timeout = "60s"
//! # A generation whose stream sends nothing for this long is cut, freeing its slot.
//! stream_idle_timeout = "60s"
//! queue = { critical = 64, performance = 64, specialized = 128 }
//!
//! # Generations Ollama completes per period with `parallel` slots. The control process splits
//! # it among agents by their CPU budgets (see [`budget_rate`]).
//! capacity = "60/m"
//!
//! # Calls per agent, by the agent's phase: explicit values override the budget-derived rates.
//! [ollama.rate_limit]
//! critical = "2/s"
//! specialized = "10/m"
//!
//! [ollama.agents.senior-ai-engineer]
//! max_context_size = 4096
//! max_tokens = 512
//! timeout = "120s"
//! ```

use crate::budget::{AgentBudget, BudgetReport};
use crate::snapshot::{check_name, invalid, Invalid, PathSeg};
use crate::Phase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

/// Everything the mesh knows about calling Ollama. The default queues one request at a time and
/// limits nobody.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OllamaPolicy {
    /// The service whose calls the caller-side rate limit applies to.
    #[serde(default = "default_service")]
    pub service: String,
    #[serde(default)]
    pub gateway: GatewayParams,
    /// Calls per agent per phase; a phase without a rate is not limited.
    #[serde(default)]
    pub rate_limit: PhaseRates,
    /// Limits of agents that have no entry in `agents`.
    #[serde(default)]
    pub defaults: AgentLimits,
    #[serde(default)]
    pub agents: BTreeMap<String, AgentLimits>,
}

/// How the gateway admits requests to Ollama.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayParams {
    /// Requests Ollama serves at once (`OLLAMA_NUM_PARALLEL`).
    #[serde(default = "one")]
    pub parallel: usize,
    /// Longest wait in the queue before 503.
    #[serde(with = "humantime_serde", default = "default_queue_timeout")]
    pub queue_timeout: Duration,
    /// Queue length per phase; beyond it, 503.
    #[serde(default)]
    pub queue: PhaseQueues,
    /// Requests one agent may have queued; beyond it, 429 (its own quota).
    #[serde(default = "default_per_agent_queue")]
    pub per_agent_queue: usize,
    /// Wait for Ollama's response head once admitted, unless the agent has its own `timeout`.
    #[serde(with = "humantime_serde", default = "default_generate_timeout")]
    pub timeout: Duration,
    /// Longest silence inside a generation's streamed body: a stalled Ollama would otherwise
    /// hold the slot, and with it every caller, for ever.
    #[serde(with = "humantime_serde", default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: Duration,
    /// Largest request body accepted (prompts are buffered to apply the agent's limits).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub breaker: BreakerParams,
    /// Generations Ollama completes per `per` with `parallel` slots: the rate the control
    /// process splits among callers by budget.
    #[serde(default = "default_capacity")]
    pub capacity: Rate,
}

/// Queue lengths by phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseQueues {
    #[serde(default = "default_queue_len")]
    pub critical: usize,
    #[serde(default = "default_queue_len")]
    pub performance: usize,
    #[serde(default = "default_queue_len")]
    pub specialized: usize,
}

/// When Ollama is unreachable: after `failures` consecutive failures the gateway refuses and
/// flushes its queue for `cooldown`, then lets one probe through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerParams {
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    #[serde(with = "humantime_serde", default = "default_breaker_cooldown")]
    pub cooldown: Duration,
}

/// Caller-side rates by phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseRates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specialized: Option<Rate>,
}

/// One agent's limits (Rules 23-24). Absent values are not limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLimits {
    /// Fills `options.num_ctx` when a request omits it; a larger `num_ctx` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_size: Option<u32>,
    /// Fills `options.num_predict` (`max_tokens` on the OpenAI API) when omitted; a larger
    /// value is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Wait for the response head once admitted.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// This agent's own caller-side rate, instead of its phase's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Rate>,
}

/// `count` calls per `per`, with bursts of up to `count`. Written `"2/s"`, `"30/m"`, `"100/h"`
/// or `"5/10s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

// === impl OllamaPolicy ===

impl Default for OllamaPolicy {
    fn default() -> Self {
        Self {
            service: default_service(),
            gateway: GatewayParams::default(),
            rate_limit: PhaseRates::default(),
            defaults: AgentLimits::default(),
            agents: BTreeMap::new(),
        }
    }
}

impl OllamaPolicy {
    /// Takes each registry agent's Rule 23 declaration (`max_context_size`, `timeout`) as its
    /// limits where `[ollama.agents.<name>]` does not set them: the policy overrides, the
    /// registry declares.
    pub fn declare(&mut self, registry: &crate::Registry) {
        for a in &registry.agents {
            let limits = self.agents.entry(a.name.clone()).or_insert(self.defaults);
            limits
                .max_context_size
                .get_or_insert(a.capabilities.max_context_size);
            limits.timeout.get_or_insert(a.capabilities.timeout);
        }
    }

    /// The limits that apply to `agent`.
    pub fn limits(&self, agent: &str) -> &AgentLimits {
        self.agents.get(agent).unwrap_or(&self.defaults)
    }

    /// The caller-side rate for `agent` in `phase`: its own, else the one its budget carries
    /// (set by the control process), else its phase's.
    pub fn rate(&self, agent: &str, phase: Phase, budget: Option<&AgentBudget>) -> Option<Rate> {
        self.limits(agent)
            .rate_limit
            .or_else(|| budget.and_then(|b| b.ollama_rate))
            .or_else(|| self.rate_limit.get(phase))
    }

    /// Sets each phase's agent rate in `report`: the phase's explicit `rate_limit`, else the
    /// gateway's capacity shared by CPU budget ([`budget_rate`]).
    pub fn size_rates(&self, report: &mut BudgetReport) {
        let granted: f64 = report.phases.values().map(|b| b.granted_cpus).sum();
        for (phase, b) in report.phases.iter_mut() {
            b.agent.ollama_rate = self
                .rate_limit
                .get(*phase)
                .or_else(|| budget_rate(self.gateway.capacity, b.agent.cpus, granted));
        }
    }

    /// Checks values serde accepts but the gateway cannot use. Paths start at `ollama`.
    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        let at = |keys: &[&'static str]| {
            let mut p = vec![Key("ollama")];
            p.extend(keys.iter().map(|k| Key(k)));
            p
        };
        if let Err(reason) = check_name(&self.service) {
            return Err(invalid(at(&["service"]), reason));
        }
        let g = &self.gateway;
        if g.parallel == 0 {
            return Err(invalid(at(&["gateway", "parallel"]), "must be at least 1"));
        }
        for (key, zero) in [
            ("queue_timeout", g.queue_timeout.is_zero()),
            ("timeout", g.timeout.is_zero()),
            ("stream_idle_timeout", g.stream_idle_timeout.is_zero()),
        ] {
            if zero {
                return Err(invalid(at(&["gateway", key]), "must be greater than zero"));
            }
        }
        if g.per_agent_queue == 0 {
            return Err(invalid(
                at(&["gateway", "per_agent_queue"]),
                "must be at least 1",
            ));
        }
        if g.max_body_bytes < 1024 {
            return Err(invalid(
                at(&["gateway", "max_body_bytes"]),
                "must be at least 1024",
            ));
        }
        if g.breaker.failures == 0 {
            return Err(invalid(
                at(&["gateway", "breaker", "failures"]),
                "must be at least 1",
            ));
        }
        if g.breaker.cooldown.is_zero() {
            return Err(invalid(
                at(&["gateway", "breaker", "cooldown"]),
                "must be greater than zero",
            ));
        }
        check_limits(&self.defaults, || at(&["defaults"]))?;
        for (name, limits) in &self.agents {
            let path = || vec![Key("ollama"), Key("agents"), Name(name.clone())];
            if let Err(reason) = check_name(name) {
                return Err(invalid(path(), reason));
            }
            check_limits(limits, path)?;
        }
        Ok(())
    }
}

/// An agent's share of the gateway: `capacity × agent_cpus / granted_cpus`, where
/// `granted_cpus` is what every phase was granted together. An agent's CPU share is capped by
/// its phase's per-agent limit and its phase's slice split among its agents, so the rates of
/// all agents add up to at most `capacity`. Bursts are the calls allowed per `capacity.per`
/// (at least one); a share under one call per period stretches the period instead.
pub fn budget_rate(capacity: Rate, agent_cpus: f64, granted_cpus: f64) -> Option<Rate> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !(positive(agent_cpus) && positive(granted_cpus)) {
        return None;
    }
    let calls = f64::from(capacity.count.get()) * (agent_cpus / granted_cpus).min(1.0);
    let count = calls.floor().max(1.0);
    // `count` calls take `count / calls` periods: exact for whole shares, stretched otherwise.
    let millis = (capacity.per.as_secs_f64() * 1000.0 * count / calls).round();
    Some(Rate {
        count: NonZeroU32::new(count as u32)?,
        per: Duration::from_millis(millis.max(1.0) as u64),
    })
}

fn check_limits(l: &AgentLimits, path: impl Fn() -> Vec<PathSeg>) -> Result<(), Invalid> {
    let at = |k| {
        let mut p = path();
        p.push(PathSeg::Key(k));
        p
    };
    if l.max_context_size == Some(0) {
        return Err(invalid(at("max_context_size"), "must be at least 1"));
    }
    if l.max_tokens == Some(0) {
        return Err(invalid(at("max_tokens"), "must be at least 1"));
    }
    if l.timeout.is_some_and(|t| t.is_zero()) {
        return Err(invalid(at("timeout"), "must be greater than zero"));
    }
    Ok(())
}

// === impl GatewayParams ===

impl Default for GatewayParams {
    fn default() -> Self {
        Self {
            parallel: 1,
            queue_timeout: default_queue_timeout(),
            queue: PhaseQueues::default(),
            per_agent_queue: default_per_agent_queue(),
            timeout: default_generate_timeout(),
            stream_idle_timeout: default_stream_idle_timeout(),
            max_body_bytes: default_max_body_bytes(),
            breaker: BreakerParams::default(),
            capacity: default_capacity(),
        }
    }
}

// === impl PhaseQueues ===

impl Default for PhaseQueues {
    fn default() -> Self {
        Self {
            critical: default_queue_len(),
            performance: default_queue_len(),
            specialized: default_queue_len(),
        }
    }
}

impl PhaseQueues {
    pub fn get(&self, phase: Phase) -> usize {
        match phase {
            Phase::Critical => self.critical,
            Phase::Performance => self.performance,
            Phase::Specialized => self.specialized,
        }
    }
}

// === impl BreakerParams ===

impl Default for BreakerParams {
    fn default() -> Self {
        Self {
            failures: default_breaker_failures(),
            cooldown: default_breaker_cooldown(),
        }
    }
}

// === impl PhaseRates ===

impl PhaseRates {
    pub fn get(&self, phase: Phase) -> Option<Rate> {
        match phase {
            Phase::Critical => self.critical,
            Phase::Performance => self.performance,
            Phase::Specialized => self.specialized,
        }
    }
}

// === impl Rate ===

/// Why a rate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a rate (write \"2/s\", \"30/m\", \"100/h\" or \"5/10s\")")]
pub struct BadRate(String);

impl FromStr for Rate {
    type Err = BadRate;

    fn from_str(s: &str) -> Result<Self, BadRate> {
        let bad = || BadRate(s.to_owned());
        let (count, per) = s.split_once('/').ok_or_else(bad)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| bad())?;
        let per = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if per.is_zero() {
            return Err(bad());
        }
        Ok(Rate { count, per })
    }
}

impl TryFrom<String> for Rate {
    type Error = BadRate;

    fn try_from(s: String) -> Result<Self, BadRate> {
        s.parse()
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        r.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        }
    }
}

fn default_capacity() -> Rate {
    Rate {
        count: NonZeroU32::MIN.saturating_add(59),
        per: Duration::from_secs(60),
    }
}
fn default_service() -> String {
    "ollama".into()
}
fn one() -> usize {
    1
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_queue_len() -> usize {
    128
}
fn default_per_agent_queue() -> usize {
    16
}
fn default_generate_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_body_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        for (text, count, secs) in [
            ("2/s", 2, 1),
            ("30/m", 30, 60),
            ("100/h", 100, 3600),
            ("5/10s", 5, 10),
        ] {
            let r: Rate = text.parse().unwrap();
            assert_eq!(
                (r.count.get(), r.per),
                (count, Duration::from_secs(secs)),
                "{text}"
            );
            assert_eq!(r.to_string(), text);
        }
        for bad in ["", "2", "0/s", "x/s", "2/fortnight", "2/0s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_rate_overrides_phase_rate() {
        let mut p = OllamaPolicy::default();
        p.rate_limit.specialized = Some("10/m".parse().unwrap());
        p.agents.insert(
            "chatty".into(),
            AgentLimits {
                rate_limit: Some("1/s".parse().unwrap()),
                ..Default::default()
            },
        );
        assert_eq!(
            p.rate("quiet", Phase::Specialized, None)
                .unwrap()
                .to_string(),
            "10/m"
        );
        assert_eq!(
            p.rate("chatty", Phase::Specialized, None)
                .unwrap()
                .to_string(),
            "1/s"
        );
        assert_eq!(p.rate("quiet", Phase::Critical, None), None);
    }

    #[test]
    fn budget_rate_shares_capacity_by_cpu() {
        let cap: Rate = "72/m".parse().unwrap();
        // 2 of 12 granted CPUs: a sixth of 72 a minute.
        assert_eq!(budget_rate(cap, 2.0, 12.0).unwrap().to_string(), "12/m");
        assert_eq!(budget_rate(cap, 0.5, 12.0).unwrap().to_string(), "3/m");
        // 0.1 of 12 CPUs is 0.6 calls a minute: one call every 100 s.
        let thin = budget_rate(cap, 0.1, 12.0).unwrap();
        assert_eq!((thin.count.get(), thin.per), (1, Duration::from_secs(100)));
        // 2.5 calls a minute: bursts of 2, refilled at the exact rate.
        let odd = budget_rate("30/m".parse().unwrap(), 1.0, 12.0).unwrap();
        assert_eq!((odd.count.get(), odd.per), (2, Duration::from_secs(48)));
        // A share cannot exceed the whole gateway; no budget means no derived rate.
        assert_eq!(budget_rate(cap, 24.0, 12.0), Some(cap));
        assert_eq!(budget_rate(cap, 0.0, 12.0), None);
        assert_eq!(budget_rate(cap, 1.0, 0.0), None);
    }

    #[test]
    fn explicit_rates_override_budget_rates() {
        use crate::budget::{BudgetModel, PhaseLimits};
        use crate::units::ByteSize;
        let phase = |cpus, acpu| PhaseLimits {
            cpus,
            memory: ByteSize::gib(8),
            agent_cpus: acpu,
            agent_memory: ByteSize::gib(1),
        };
        let model = BudgetModel {
            phases: [
                (Phase::Critical, phase(8.0, 2.0)),
                (Phase::Performance, phase(6.0, 1.0)),
                (Phase::Specialized, phase(4.0, 0.5)),
            ]
            .into(),
            ..Default::default()
        };
        let mut report = model.compute(12.0, ByteSize::gib(64), |_| 1);
        let mut p = OllamaPolicy::default();
        p.gateway.capacity = "72/m".parse().unwrap();
        p.rate_limit.performance = Some("1/s".parse().unwrap());
        p.agents.insert(
            "chatty".into(),
            AgentLimits {
                rate_limit: Some("1/h".parse().unwrap()),
                ..Default::default()
            },
        );
        p.size_rates(&mut report);
        let rate = |phase| {
            report
                .agent(phase)
                .unwrap()
                .ollama_rate
                .unwrap()
                .to_string()
        };
        // Derived from budgets: 2 and 0.5 of the 12 CPUs granted.
        assert_eq!(rate(Phase::Critical), "12/m");
        assert_eq!(rate(Phase::Specialized), "3/m");
        // The phase's explicit rate wins over the derived one.
        assert_eq!(rate(Phase::Performance), "1/s");
        // At the sidecar the agent's own rate wins over what its budget carries.
        let spec = report.agent(Phase::Specialized);
        let at_sidecar = |agent| p.rate(agent, Phase::Specialized, spec.as_ref()).unwrap();
        assert_eq!(at_sidecar("quiet").to_string(), "3/m");
        assert_eq!(at_sidecar("chatty").to_string(), "1/h");
    }
}
