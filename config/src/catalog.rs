//! The discovered world: which mesh services exist, their phase and their healthy endpoints.
//! Consul discovery and the catalog file both produce this one type; everything after
//! discovery (budgets, snapshots) reads only it.

use crate::load::{self, LoadError};
use crate::snapshot::{check_name, invalid, Invalid, PathSeg};
use crate::Phase;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

/// Services sorted by name, each with its endpoints sorted: two catalogs describing the same
/// world compare equal, so an unchanged discovery round does not produce a new version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub services: Vec<CatalogService>,
}

/// One mesh service (an agent) as discovered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogService {
    pub name: String,
    #[serde(default = "default_phase")]
    pub phase: Phase,
    /// Healthy instances only.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

fn default_phase() -> Phase {
    Phase::Specialized
}

// === impl Catalog ===

impl Catalog {
    /// Builds a catalog in canonical order.
    pub fn new(mut services: Vec<CatalogService>) -> Self {
        for s in &mut services {
            s.endpoints.sort_unstable();
            s.endpoints.dedup();
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Self { services }
    }

    pub fn service(&self, name: &str) -> Option<&CatalogService> {
        self.services
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.services[i])
    }

    /// Agents per phase, for budget shares.
    pub fn agents_in(&self, phase: Phase) -> usize {
        self.services.iter().filter(|s| s.phase == phase).count()
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        let mut names = HashSet::with_capacity(self.services.len());
        for (i, svc) in self.services.iter().enumerate() {
            let at = |k| vec![Key("services"), Index(i), Key(k)];
            check_name(&svc.name).map_err(|r| invalid(at("name"), r))?;
            if !names.insert(svc.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("duplicate service {:?}", svc.name),
                ));
            }
            let mut seen = HashSet::with_capacity(svc.endpoints.len());
            for ep in &svc.endpoints {
                if !seen.insert(ep) {
                    return Err(invalid(at("endpoints"), format!("duplicate endpoint {ep}")));
                }
            }
        }
        Ok(())
    }
}

/// Reads and validates a catalog file (the local-run and test stand-in for Consul).
pub fn catalog_str(origin: &Path, text: &str) -> Result<Catalog, LoadError> {
    let cat: Catalog = load::toml_str(origin, text)?;
    cat.validate()
        .map_err(|e| LoadError::Invalid(load::locate(origin, text, &e)))?;
    Ok(Catalog::new(cat.services))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_loads_in_canonical_order() {
        let cat = catalog_str(
            Path::new("catalog.toml"),
            "[[services]]\nname = \"b\"\nendpoints = [\"127.0.0.1:2\", \"127.0.0.1:1\"]\n\
             [[services]]\nname = \"a\"\nphase = \"critical\"\n",
        )
        .unwrap();
        assert_eq!(cat.services[0].name, "a");
        assert_eq!(cat.services[1].endpoints[0].port(), 1);
        assert_eq!(cat.agents_in(Phase::Critical), 1);
        assert!(cat.service("b").is_some());
    }

    #[test]
    fn unknown_phase_names_its_line() {
        let err = catalog_str(
            Path::new("catalog.toml"),
            "[[services]]\nname = \"a\"\nphase = \"urgent\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("catalog.toml:3:"), "{err}");
    }
}
