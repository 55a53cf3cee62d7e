//! Accepting connections and serving HTTP on them, shared by the inbound and outbound
//! listeners: protocol detection, hyper's HTTP/1.1 + HTTP/2 server, and drain.

mod accept;
pub(crate) mod detect;
mod for_peer;
mod head_timeout;
mod in_flight;
mod limit;
mod peer;

pub use accept::{server_builder, Accept};
pub use for_peer::ForPeer;
pub use peer::Caller;
