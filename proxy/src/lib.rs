//! The agent mesh sidecar proxy. Read the request path in file order:
//! `serve` (accept, detect) -> `outbound::{route, timeout, forward, balance, pool}`, and
//! `inbound::{target, concurrency}` -> the same forward. `app` wires it all.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod bootstrap;
pub mod consul_register;
pub mod control_channel;
pub mod control_client;
pub mod drain;
pub mod errors;
#[cfg(test)]
mod front_door_props;
pub mod grpc;
pub mod health;
pub mod host;
pub mod identity;
pub mod idle;
pub mod inbound;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod refusal;
pub mod serve;
pub mod snapshot_file;
pub mod state;
pub mod trace;
pub mod upload;
