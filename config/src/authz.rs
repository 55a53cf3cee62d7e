//! `[authorization]` in the policy: who may call whom (Rule 30's `network_policies_applied`).
//!
//! Rules are per target service: a rule allows callers by agent name or by phase, optionally
//! only for some path prefixes and methods. A target with rules admits only what one of its
//! rules allows; a target without rules follows the mesh's `default` (`allow` unless set).
//! The caller is the agent the sidecar verified (its mutual-TLS certificate); its phase is the
//! catalog's.

use crate::snapshot::{invalid, Invalid, PathSeg};
use crate::Phase;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    #[serde(default)]
    pub default: DefaultAction,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Named in refusals and audit lines; `<target>[<index>]` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub target: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<Phase>,
    /// Empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
    /// Empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// What one request is allowed, and by which rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named rule, or by the mesh default (`None`).
    Allow(Option<String>),
    /// Refused; the rule (or default) that decided.
    Deny(String),
}

// === impl Authorization ===

impl Authorization {
    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        for (i, r) in self.rules.iter().enumerate() {
            let at = |k| vec![Key("authorization"), Key("rules"), Index(i), Key(k)];
            if r.target.is_empty() {
                return Err(invalid(at("target"), "a target service is required"));
            }
            if r.agents.is_empty() && r.phases.is_empty() {
                return Err(invalid(
                    at("agents"),
                    "a rule allows at least one agent or phase",
                ));
            }
            if let Some(p) = r.path_prefixes.iter().find(|p| !p.starts_with('/')) {
                return Err(invalid(
                    at("path_prefixes"),
                    format!("{p:?} does not start with '/'"),
                ));
            }
            if let Some(m) = r
                .methods
                .iter()
                .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(invalid(
                    at("methods"),
                    format!("{m:?} is not an upper-case method"),
                ));
            }
        }
        Ok(())
    }

    /// Decides a call to `target` from `caller` (of `phase`), `method` on `path`.
    pub fn decide(
        &self,
        target: &str,
        caller: Option<&str>,
        phase: Option<Phase>,
        method: &str,
        path: &str,
    ) -> Decision {
        let mut has_rules = false;
        for (i, r) in self.rules.iter().enumerate() {
            if r.target != target {
                continue;
            }
            has_rules = true;
            let who = caller.is_some_and(|c| r.agents.iter().any(|a| a == c))
                || phase.is_some_and(|p| r.phases.contains(&p));
            let path_ok =
                r.path_prefixes.is_empty() || r.path_prefixes.iter().any(|p| path.starts_with(p));
            let method_ok = r.methods.is_empty() || r.methods.iter().any(|m| m == method);
            if who && path_ok && method_ok {
                return Decision::Allow(Some(r.label(i)));
            }
        }
        if has_rules {
            return Decision::Deny(format!("{target}: no rule allows this caller"));
        }
        match self.default {
            DefaultAction::Allow => Decision::Allow(None),
            DefaultAction::Deny => Decision::Deny("default deny".into()),
        }
    }
}

// === impl AuthzRule ===

impl AuthzRule {
    fn label(&self, index: usize) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{}[{index}]", self.target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(target: &str, agents: &[&str], phases: &[Phase]) -> AuthzRule {
        AuthzRule {
            name: None,
            target: target.into(),
            agents: agents.iter().map(|a| (*a).into()).collect(),
            phases: phases.to_vec(),
            path_prefixes: vec![],
            methods: vec![],
        }
    }

    #[test]
    fn rules_allow_by_name_or_phase_and_the_default_covers_the_rest() {
        let mut authz = Authorization {
            default: DefaultAction::Allow,
            rules: vec![rule("ollama", &["a"], &[Phase::Critical])],
        };
        let d = |a: &Authorization, t, c, p| a.decide(t, c, p, "GET", "/");
        assert_eq!(
            d(&authz, "ollama", Some("a"), Some(Phase::Specialized)),
            Decision::Allow(Some("ollama[0]".into()))
        );
        assert!(matches!(
            d(&authz, "ollama", Some("b"), Some(Phase::Critical)),
            Decision::Allow(_)
        ));
        assert!(matches!(
            d(&authz, "ollama", Some("b"), Some(Phase::Specialized)),
            Decision::Deny(_)
        ));
        assert!(matches!(d(&authz, "ollama", None, None), Decision::Deny(_)));
        assert_eq!(d(&authz, "other", Some("b"), None), Decision::Allow(None));
        authz.default = DefaultAction::Deny;
        assert_eq!(
            d(&authz, "other", Some("b"), None),
            Decision::Deny("default deny".into())
        );
    }

    #[test]
    fn paths_and_methods_narrow_a_rule() {
        let mut r = rule("t", &["a"], &[]);
        r.name = Some("read-only".into());
        r.path_prefixes = vec!["/api/".into()];
        r.methods = vec!["GET".into()];
        let authz = Authorization {
            default: DefaultAction::Allow,
            rules: vec![r],
        };
        assert_eq!(
            authz.decide("t", Some("a"), None, "GET", "/api/x"),
            Decision::Allow(Some("read-only".into()))
        );
        assert!(matches!(
            authz.decide("t", Some("a"), None, "POST", "/api/x"),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authz.decide("t", Some("a"), None, "GET", "/admin"),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn invalid_rules_are_named() {
        let mut r = rule("t", &[], &[]);
        let a = |r: &AuthzRule| Authorization {
            default: DefaultAction::Deny,
            rules: vec![r.clone()],
        };
        assert!(a(&r).validate().is_err());
        r.agents = vec!["a".into()];
        assert!(a(&r).validate().is_ok());
        r.methods = vec!["get".into()];
        assert!(a(&r).validate().is_err());
        r.methods = vec![];
        r.path_prefixes = vec!["api".into()];
        assert!(a(&r).validate().is_err());
    }
}
