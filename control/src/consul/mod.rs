//! Discovery from Consul: a typed client and the blocking-query watch built on it.

pub mod client;
pub mod watch;

pub use client::{ConsulClient, ConsulError};

/// Tag that marks a Consul service as a mesh agent.
pub const MESH_TAG: &str = "mesh";
/// Tag prefix carrying the agent's phase, e.g. `phase=critical`.
pub const PHASE_TAG: &str = "phase=";
