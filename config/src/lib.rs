//! The mesh model: what a sidecar knows about the world (services, endpoints, routes and the
//! policies that apply to them) and how operators' TOML files become that model.

pub mod load;
pub mod phase;
pub mod resilience;
pub mod snapshot;

pub use load::LoadError;
pub use phase::Phase;
pub use resilience::Resilience;
pub use snapshot::{Defaults, Protocol, RouteRule, Service, Snapshot};
