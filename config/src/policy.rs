//! The policy files operators edit: mesh-wide defaults and per-target overrides, route rules,
//! trace sampling, and the host/phase model. A directory of TOML files is read, checked
//! strictly (every error names file, line and reason) and merged into one [`Policy`].
//!
//! A policy section is the same typed value the snapshot carries: [`TargetPolicy`] holds
//! overrides of `Service` fields and [`Policy::snapshot`] writes them into each service, so a
//! new per-target section is one field here plus one line in [`TargetPolicy::apply`].

use crate::budget::{BudgetModel, HostModel, PhaseLimits, Pool, SidecarModel};
use crate::catalog::Catalog;
use crate::load::{self, LoadError, Located};
use crate::ollama::OllamaPolicy;
use crate::resilience::Resilience;
use crate::snapshot::{
    check_name, invalid, Invalid, PathSeg, DEFAULT_STREAM_IDLE_TIMEOUT, DEFAULT_TIMEOUT,
};
use crate::{Defaults, Phase, Protocol, RouteRule, Service, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Overrides for one target (or, as `[defaults]`, for all). Unset fields inherit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetPolicy {
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stream_idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Retries, breakers, ejection, fallback: each set here overrides the one below it.
    #[serde(default)]
    pub resilience: Resilience,
}

/// `[trace]`: the share of new traces sampled (a caller's decision is kept), mesh-wide and,
/// under `[trace.phases]`, per phase of the sidecar that starts the trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    pub sampling: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: BTreeMap<Phase, f64>,
}

// === impl Trace ===

impl Trace {
    /// The ratio for a sidecar of `phase`.
    pub fn ratio(&self, phase: Phase) -> f64 {
        self.phases.get(&phase).copied().unwrap_or(self.sampling)
    }

    /// Every ratio is in [0, 1]; the error names the key.
    pub fn check(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err(invalid(
                vec![Key("trace"), Key("sampling")],
                "must be in [0, 1]",
            ));
        }
        for (phase, r) in &self.phases {
            if !(0.0..=1.0).contains(r) {
                return Err(invalid(
                    vec![Key("trace"), Key("phases"), Name(phase.as_str().to_owned())],
                    "must be in [0, 1]",
                ));
            }
        }
        Ok(())
    }
}

/// The merged, validated policy of a directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub defaults: TargetPolicy,
    pub targets: BTreeMap<String, TargetPolicy>,
    pub routes: Vec<RouteRule>,
    pub trace: Option<Trace>,
    /// The mesh's mutual-TLS mode (`[identity]`).
    pub identity: crate::identity::MeshIdentity,
    /// Who may call whom (`[authorization]`).
    pub authorization: Option<crate::authz::Authorization>,
    pub budget: BudgetModel,
    /// The Ollama gateway, caller rates and per-agent limits (`[ollama]`).
    pub ollama: OllamaPolicy,
    /// How deploy.sh rolls out a phase: canary size, watch, thresholds (`[rollout]`).
    pub rollout: crate::rollout::Rollout,
}

/// One file as written: every section optional; a section may be defined in one file only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    defaults: Option<TargetPolicy>,
    targets: Option<BTreeMap<String, TargetPolicy>>,
    routes: Option<Vec<RouteRule>>,
    trace: Option<Trace>,
    identity: Option<crate::identity::MeshIdentity>,
    authorization: Option<crate::authz::Authorization>,
    host: Option<HostModel>,
    pools: Option<BTreeMap<String, Pool>>,
    phases: Option<BTreeMap<Phase, PhaseLimits>>,
    sidecar: Option<SidecarModel>,
    ollama: Option<OllamaPolicy>,
    rollout: Option<crate::rollout::Rollout>,
}

/// Every problem found in a policy directory, one per line when displayed.
#[derive(Debug, thiserror::Error)]
pub struct PolicyErrors(pub Vec<LoadError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl PolicyErrors {
    /// The first located error, for status reports.
    pub fn first(&self) -> Option<&Located> {
        self.0.iter().find_map(|e| e.located())
    }
}

// === impl TargetPolicy ===

impl TargetPolicy {
    /// `self` over `base`: each field set here wins.
    pub fn or(&self, base: &TargetPolicy) -> TargetPolicy {
        TargetPolicy {
            timeout: self.timeout.or(base.timeout),
            stream_idle_timeout: self.stream_idle_timeout.or(base.stream_idle_timeout),
            protocol: self.protocol.or(base.protocol),
            resilience: self.resilience.or(&base.resilience),
        }
    }

    /// Writes the policy into a service of the snapshot.
    pub fn apply(&self, svc: &mut Service) {
        svc.timeout = self.timeout;
        svc.stream_idle_timeout = self.stream_idle_timeout;
        svc.protocol = self.protocol.unwrap_or_default();
        svc.resilience = self.resilience.clone();
    }

    fn validate(&self, at: impl Fn(&'static str) -> Vec<PathSeg>) -> Result<(), Invalid> {
        for (key, value) in [
            ("timeout", self.timeout),
            ("stream_idle_timeout", self.stream_idle_timeout),
        ] {
            if value.is_some_and(|t| t.is_zero()) {
                return Err(invalid(at(key), "must be greater than zero"));
            }
        }
        // Whether a fallback target exists depends on the catalog; the sidecar checks that.
        self.resilience.validate(&at("resilience"), None, &|_| true)
    }
}

// === impl Policy ===

impl Policy {
    /// The effective policy for a target: its overrides over the mesh-wide defaults.
    pub fn target(&self, name: &str) -> TargetPolicy {
        match self.targets.get(name) {
            Some(t) => t.or(&self.defaults),
            None => self.defaults.clone(),
        }
    }

    /// The snapshot every sidecar shares (budget not yet set): the catalog's services with
    /// their policy applied, and the route rules whose backend is currently discovered.
    /// Returns the rules left out, so the caller can report them.
    pub fn snapshot(&self, catalog: &Catalog, version: u64) -> (Snapshot, Vec<String>) {
        let services = catalog
            .services
            .iter()
            .map(|c| {
                let mut svc = Service {
                    name: c.name.clone(),
                    phase: c.phase,
                    protocol: Protocol::default(),
                    endpoints: c.endpoints.clone(),
                    timeout: None,
                    stream_idle_timeout: None,
                    resilience: Resilience::default(),
                };
                self.target(&c.name).apply(&mut svc);
                svc
            })
            .collect();
        let mut skipped = Vec::new();
        let routes = self
            .routes
            .iter()
            .filter(|r| {
                let known = catalog.service(&r.backend).is_some();
                if !known {
                    skipped.push(format!(
                        "route for {:?} skipped: backend {:?} is not discovered",
                        r.authority, r.backend
                    ));
                }
                known
            })
            .cloned()
            .collect();
        let snap = Snapshot {
            version,
            defaults: Defaults {
                timeout: self.defaults.timeout.unwrap_or(DEFAULT_TIMEOUT),
                stream_idle_timeout: self
                    .defaults
                    .stream_idle_timeout
                    .unwrap_or(DEFAULT_STREAM_IDLE_TIMEOUT),
                resilience: self.defaults.resilience.clone(),
            },
            services,
            routes,
            budget: None,
            trace: self.trace.clone(),
            identity: self.identity,
            authorization: self.authorization.clone(),
            ollama: self.ollama.clone(),
        };
        (snap, skipped)
    }

    fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        self.defaults.validate(|k| vec![Key("defaults"), Key(k)])?;
        for (name, t) in &self.targets {
            check_name(name).map_err(|r| invalid(vec![Key("targets"), Name(name.clone())], r))?;
            t.validate(|k| vec![Key("targets"), Name(name.clone()), Key(k)])?;
        }
        if let Some(a) = &self.authorization {
            a.validate()?;
        }
        if let Some(t) = &self.trace {
            t.check()?;
        }
        self.rollout.validate()?;
        // Route syntax is checked against a stand-in service per backend; whether a backend
        // exists is decided per catalog, not here.
        let mut backends = BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            check_name(&r.backend)
                .map_err(|e| invalid(vec![Key("routes"), Index(i), Key("backend")], e))?;
            backends.insert(r.backend.clone());
        }
        let probe = Snapshot {
            services: backends
                .into_iter()
                .map(|name| Service {
                    name,
                    phase: Phase::Specialized,
                    protocol: Protocol::default(),
                    endpoints: vec![],
                    timeout: None,
                    stream_idle_timeout: None,
                    resilience: Resilience::default(),
                })
                .collect(),
            routes: self.routes.clone(),
            ..Snapshot::default()
        };
        probe.validate()?;
        self.ollama.validate()?;
        self.budget.validate()
    }
}

/// A policy directory's `*.toml` files, in name order, as (path, text). The agent registry
/// (`agents.toml`) is among them: [`load_files`] reads it as the registry, whose Rule 23
/// declarations bound each agent's Ollama calls.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|source| LoadError::Read {
                path: p.clone(),
                source,
            })?;
            Ok((p, text))
        })
        .collect()
}

/// Reads, checks and merges a policy directory.
pub fn load_dir(dir: &Path) -> Result<Policy, PolicyErrors> {
    let files = read_dir(dir).map_err(|e| PolicyErrors(vec![e]))?;
    if files.is_empty() {
        return Err(PolicyErrors(vec![LoadError::Invalid(Located {
            file: dir.to_owned(),
            line: 0,
            reason: "no policy files (*.toml) in this directory".into(),
        })]));
    }
    load_files(&files)
}

/// Checks and merges policy texts; `files` are (origin, text) in precedence-free order.
pub fn load_files(files: &[(PathBuf, String)]) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut policy = Policy::default();
    // Which file defined each section, to place semantic errors and duplicates.
    let mut origin: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut registry = None;
    for (i, (path, text)) in files.iter().enumerate() {
        if path.file_name() == Some(std::ffi::OsStr::new(crate::registry::FILE_NAME)) {
            match crate::registry::load_str(path, text) {
                Ok(r) => registry = Some(r),
                Err(e) => errors.push(e),
            }
            continue;
        }
        let file: PolicyFile = match load::toml_str(path, text) {
            Ok(f) => f,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let mut claim = |section: &'static str| -> bool {
            if let Some(&first) = origin.get(section) {
                let err = invalid(
                    vec![PathSeg::Key(section)],
                    format!("section already defined in {}", files[first].0.display()),
                );
                errors.push(LoadError::Invalid(load::locate(path, text, &err)));
                return false;
            }
            origin.insert(section, i);
            true
        };
        if let Some(v) = file.defaults {
            if claim("defaults") {
                policy.defaults = v;
            }
        }
        if let Some(v) = file.targets {
            if claim("targets") {
                policy.targets = v;
            }
        }
        if let Some(v) = file.routes {
            if claim("routes") {
                policy.routes = v;
            }
        }
        if let Some(v) = file.authorization {
            if claim("authorization") {
                policy.authorization = Some(v);
            }
        }
        if let Some(v) = file.identity {
            if claim("identity") {
                policy.identity = v;
            }
        }
        if let Some(v) = file.trace {
            if claim("trace") {
                policy.trace = Some(v);
            }
        }
        if let Some(v) = file.host {
            if claim("host") {
                policy.budget.host = v;
            }
        }
        if let Some(v) = file.pools {
            if claim("pools") {
                policy.budget.pools = v;
            }
        }
        if let Some(v) = file.phases {
            if claim("phases") {
                policy.budget.phases = v;
            }
        }
        if let Some(v) = file.sidecar {
            if claim("sidecar") {
                policy.budget.sidecar = v;
            }
        }
        if let Some(v) = file.ollama {
            if claim("ollama") {
                policy.ollama = v;
            }
        }
        if let Some(v) = file.rollout {
            if claim("rollout") {
                policy.rollout = v;
            }
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    if let Some(registry) = &registry {
        policy.ollama.declare(registry);
    }
    if let Err(e) = policy.validate() {
        let section = match e.path.first() {
            Some(PathSeg::Key(k)) => *k,
            _ => "",
        };
        let err = match origin.get(section) {
            Some(&i) => LoadError::Invalid(load::locate(&files[i].0, &files[i].1, &e)),
            None => LoadError::Invalid(Located {
                file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
                line: 0,
                reason: e.to_string(),
            }),
        };
        return Err(PolicyErrors(vec![err]));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogService;

    fn load(files: &[(&str, &str)]) -> Result<Policy, PolicyErrors> {
        let files: Vec<_> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        load_files(&files)
    }

    fn err(files: &[(&str, &str)]) -> String {
        load(files).unwrap_err().to_string()
    }

    #[test]
    fn trace_sampling_has_per_phase_overrides_that_reach_the_snapshot() {
        let policy = load(&[(
            "t.toml",
            "[trace]\nsampling = 0.1\n[trace.phases]\ncritical = 1.0\n",
        )])
        .unwrap();
        let (snap, _) = policy.snapshot(&Catalog::default(), 1);
        let trace = snap.trace.expect("the snapshot carries [trace]");
        assert_eq!(trace.ratio(Phase::Critical), 1.0);
        assert_eq!(trace.ratio(Phase::Specialized), 0.1);
        let e = err(&[(
            "t.toml",
            "[trace]\nsampling = 0.1\n[trace.phases]\ncritical = 2.0\n",
        )]);
        assert!(
            e.contains("trace.phases.critical: must be in [0, 1]"),
            "{e}"
        );
    }

    #[test]
    fn rollout_and_sidecar_errors_name_file_and_line() {
        let e = err(&[(
            "rollout.toml",
            "[rollout]\nmax_error_rate = 0.05\n\n[rollout.phases.critical]\nmax_p99 = \"0s\"\n",
        )]);
        assert_eq!(
            e,
            "rollout.toml:5: rollout.phases.critical.max_p99: must be greater than zero"
        );
        let e = err(&[("r.toml", "[sidecar]\ncpus = 0.05\nshare = 1.5\n")]);
        assert_eq!(e, "r.toml:3: sidecar.share: must be in [0, 1)");
        let e = err(&[("rollout.toml", "[rollout.phases.urgent]\nwatch = \"1s\"\n")]);
        assert!(e.starts_with("rollout.toml:1"), "{e}");
    }

    #[test]
    fn registry_declarations_bound_ollama_calls_unless_the_policy_overrides_them() {
        let registry = "[[agents]]\nname = \"a\"\nphase = \"critical\"\nport = 10300\n\
            image = \"x/a:1\"\nprotocol = \"http1\"\ncapabilities = { cognitive = [\"r\"], \
            ollama_priority = \"high\", max_context_size = 2048, timeout = \"90s\" }\n";
        let ollama = "[ollama.agents.a]\ntimeout = \"30s\"\n";
        let p = load(&[("agents.toml", registry), ("ollama.toml", ollama)]).unwrap();
        let a = p.ollama.limits("a");
        assert_eq!(a.max_context_size, Some(2048), "declared in the registry");
        assert_eq!(
            a.timeout,
            Some(Duration::from_secs(30)),
            "the policy overrides"
        );
        // A registry error is a policy error, with its file and line.
        let e = err(&[("agents.toml", &registry.replace("10300", "10399"))]);
        assert!(e.starts_with("agents.toml:4: agents[0].port"), "{e}");
    }

    #[test]
    fn the_shipped_policy_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mesh");
        let policy = load_dir(&dir).unwrap();
        assert_eq!(policy.budget.phases.len(), 3);
    }

    #[test]
    fn target_overrides_merge_into_each_service() {
        let policy = load(&[(
            "mesh.toml",
            "[defaults]\ntimeout = \"10s\"\nprotocol = \"http2\"\n\
             [targets.slow]\ntimeout = \"60s\"\nstream_idle_timeout = \"20m\"\n",
        )])
        .unwrap();
        let catalog = Catalog::new(vec![
            CatalogService {
                name: "slow".into(),
                phase: Phase::Critical,
                endpoints: vec![],
            },
            CatalogService {
                name: "fast".into(),
                phase: Phase::Critical,
                endpoints: vec![],
            },
        ]);
        let (snap, _) = policy.snapshot(&catalog, 3);
        snap.validate().unwrap();
        let slow = snap.service("slow").unwrap();
        assert_eq!(slow.timeout, Some(Duration::from_secs(60)));
        assert_eq!(slow.protocol, Protocol::Http2);
        assert_eq!(
            snap.service("fast").unwrap().timeout,
            Some(Duration::from_secs(10))
        );
        assert_eq!(snap.defaults.timeout, Duration::from_secs(10));
        assert_eq!(slow.stream_idle_timeout, Some(Duration::from_secs(1200)));
        assert_eq!(snap.service("fast").unwrap().stream_idle_timeout, None);
        assert_eq!(
            snap.defaults.stream_idle_timeout,
            DEFAULT_STREAM_IDLE_TIMEOUT
        );
    }

    #[test]
    fn unknown_key_wrong_type_and_range_name_file_and_line() {
        assert_eq!(
            err(&[("a.toml", "[defaults]\ntimeout = \"1s\"\nretries = 3\n")])
                .split(':')
                .take(2)
                .collect::<Vec<_>>(),
            ["a.toml", "3"]
        );
        assert!(err(&[("a.toml", "[trace]\nsampling = \"often\"\n")]).starts_with("a.toml:2:"));
        let e = err(&[("a.toml", "[trace]\n\nsampling = 1.5\n")]);
        assert_eq!(e, "a.toml:3: trace.sampling: must be in [0, 1]");
        let e = err(&[("a.toml", "[targets.x]\n\nstream_idle_timeout = \"0s\"\n")]);
        assert_eq!(
            e,
            "a.toml:3: targets.x.stream_idle_timeout: must be greater than zero"
        );
    }

    #[test]
    fn unknown_phase_is_an_error_with_its_line() {
        let e = err(&[(
            "phases.toml",
            "[phases.critical]\ncpus = 8\nmemory = \"16Gi\"\nagent_cpus = 2\nagent_memory = \"4Gi\"\n\
             [pools.agent-x]\nmemory = \"1Gi\"\nphases = [\"urgent\"]\n",
        )]);
        assert!(e.starts_with("phases.toml:8:"), "{e}");
        assert!(e.contains("urgent"), "{e}");
    }

    #[test]
    fn semantic_errors_are_placed_in_the_file_that_defines_the_section() {
        let e = err(&[
            ("a.toml", "[defaults]\ntimeout = \"1s\"\n"),
            ("b.toml", "[host]\ncpus = 12\n\n[phases.critical]\ncpus = 2\nmemory = \"1Gi\"\nagent_cpus = 4\nagent_memory = \"1Gi\"\n"),
        ]);
        assert_eq!(
            e,
            "b.toml:7: phases.critical.agent_cpus: exceeds the phase's cpus"
        );
    }

    #[test]
    fn a_section_in_two_files_is_rejected() {
        let e = err(&[
            ("a.toml", "[trace]\nsampling = 0.1\n"),
            ("b.toml", "\n[trace]\nsampling = 0.2\n"),
        ]);
        assert!(
            e.starts_with("b.toml:2: trace: section already defined in a.toml"),
            "{e}"
        );
    }

    #[test]
    fn routes_to_undiscovered_backends_are_left_out_and_reported() {
        let policy = load(&[(
            "r.toml",
            "[[routes]]\nauthority = \"a\"\nbackend = \"gone\"\n",
        )])
        .unwrap();
        let (snap, skipped) = policy.snapshot(&Catalog::default(), 1);
        assert!(snap.routes.is_empty());
        assert_eq!(skipped.len(), 1);
    }
}
