//! The mesh model: what a sidecar knows about the world (services, endpoints, routes and the
//! policies that apply to them) and how operators' TOML files become that model.

pub mod authz;
pub mod backoff;
pub mod budget;
pub mod catalog;
pub mod consul_service;
pub mod identity;
pub mod load;
pub mod ollama;
pub mod phase;
pub mod policy;
pub mod registry;
pub mod resilience;
pub mod rollout;
pub mod snapshot;
pub mod units;

pub use budget::{AgentBudget, BudgetModel, BudgetReport};
pub use catalog::{Catalog, CatalogService};
pub use load::LoadError;
pub use ollama::OllamaPolicy;
pub use phase::Phase;
pub use policy::{Policy, PolicyErrors, TargetPolicy};
pub use registry::{Agent, Registry};
pub use resilience::Resilience;
pub use snapshot::{Defaults, Protocol, RouteRule, Service, Snapshot};
