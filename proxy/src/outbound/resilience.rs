//! A target's resilience policies compiled from the snapshot, and the state that must outlive
//! a snapshot swap (breakers, retry budgets): a reload with unchanged parameters keeps an open
//! breaker open rather than closing it.

use crate::outbound::breaker::consecutive_failures;
use crate::outbound::breaker::failure_ratio;
use crate::outbound::breaker::machine::{self, Breaker};
use crate::outbound::classify::StatusSet;
use crate::outbound::eject;
use crate::outbound::fallback::Fallback;
use crate::outbound::retry::{self, budget};
use mesh_config::resilience::Resolved;
use std::collections::HashMap;
use std::sync::Arc;

/// What the outbound layers apply to one target. The default (inbound) applies nothing.
#[derive(Debug, Default)]
pub struct Policies {
    /// Statuses that count as failures for breakers and ejection.
    pub failures: StatusSet,
    pub retry: Option<Arc<retry::Policy>>,
    pub breaker: Option<Arc<Breaker>>,
    /// Parameters for each endpoint's own breaker.
    pub endpoint_breaker: Option<machine::Params>,
    pub ejection: Option<eject::Params>,
    pub fallback: Fallback,
}

/// Breakers and budgets by target name, kept across compilations.
#[derive(Debug, Default)]
pub struct Memory {
    breakers: HashMap<Arc<str>, Arc<Breaker>>,
    budgets: HashMap<Arc<str>, Arc<retry::Policy>>,
}

/// The breaker parameters a resolved policy asks for, if it is enabled.
pub fn breaker_params(r: &Resolved) -> Option<machine::Params> {
    let b = &r.breaker;
    b.enabled.then(|| machine::Params {
        consecutive: (b.consecutive_failures > 0).then_some(consecutive_failures::Params {
            threshold: b.consecutive_failures,
        }),
        ratio: (b.failure_ratio > 0.0).then_some(failure_ratio::Params {
            ratio: b.failure_ratio,
            window: b.window,
            min_requests: b.min_requests,
        }),
        cooldown: b.cooldown,
        max_cooldown: b.max_cooldown,
        probes: b.probes,
    })
}

impl Memory {
    /// Compiles one target's policies, reusing its breaker and budget when unchanged.
    pub fn compile(&mut self, name: &Arc<str>, r: &Resolved) -> Policies {
        let breaker = breaker_params(r).map(|params| match self.breakers.get(name) {
            Some(b) if *b.params() == params => b.clone(),
            _ => Arc::new(Breaker::new(params, name, "")),
        });
        let retry = (r.retry.max_attempts > 1).then(|| {
            let params = retry::Params {
                max_attempts: r.retry.max_attempts,
                backoff: r.retry.backoff,
                max_backoff: r.retry.max_backoff,
                per_try_timeout: r.retry.per_try_timeout,
                max_body_bytes: r.retry.max_body_bytes,
                statuses: StatusSet::new(&r.retry.statuses),
                non_idempotent: r.retry.non_idempotent,
            };
            let budget = budget::Params {
                ratio: r.retry.budget_ratio,
                min_per_second: r.retry.budget_min_per_second,
            };
            match self.budgets.get(name) {
                Some(p) if p.params == params && *p.budget.params() == budget => p.clone(),
                _ => Arc::new(retry::Policy {
                    params,
                    budget: budget::Budget::new(budget),
                }),
            }
        });
        let e = &r.ejection;
        Policies {
            failures: StatusSet::new(&r.breaker.statuses),
            endpoint_breaker: breaker.as_ref().map(|b| *b.params()),
            ejection: e.enabled.then_some(eject::Params {
                consecutive_failures: e.consecutive_failures,
                interval: e.interval,
                max_interval: e.max_interval,
                max_ejected_percent: e.max_ejected_percent,
            }),
            fallback: Fallback::compile(&r.fallback),
            retry,
            breaker,
        }
    }

    /// Forgets targets not in the latest compilation (their breakers' tasks then end).
    pub fn retain(&mut self, live: &dyn Fn(&str) -> bool) {
        self.breakers.retain(|k, _| live(k));
        self.budgets.retain(|k, _| live(k));
    }

    /// Remembers what a compilation produced for the next one.
    pub fn keep(&mut self, name: &Arc<str>, p: &Policies) {
        if let Some(b) = &p.breaker {
            self.breakers.insert(name.clone(), b.clone());
        }
        if let Some(r) = &p.retry {
            self.budgets.insert(name.clone(), r.clone());
        }
    }
}
