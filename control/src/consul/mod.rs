//! Discovery from Consul: a client, the admission of what it answers (validated per entry),
//! a liveness probe, and the blocking-query watch built on them.

pub mod admit;
pub mod client;
pub mod probe;
pub mod watch;

pub use client::{ConsulClient, ConsulError};

/// Tag that marks a Consul service as a mesh agent.
pub const MESH_TAG: &str = "mesh";
/// Tag prefix carrying the agent's phase, e.g. `phase=critical`.
pub const PHASE_TAG: &str = "phase=";
