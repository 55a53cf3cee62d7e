//! The mesh model: what a sidecar knows about the world (services, endpoints, routes and the
//! policies that apply to them) and how operators' TOML files become that model.

pub mod load;
pub mod ollama;
pub mod phase;
pub mod snapshot;

pub use load::LoadError;
pub use ollama::OllamaPolicy;
pub use phase::Phase;
pub use snapshot::{Defaults, Protocol, RouteRule, Service, Snapshot};
