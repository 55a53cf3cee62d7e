//! A listener's service made for one connection, knowing the address at the other end: the
//! inbound side counts each client address's requests (`inbound/clients.rs`); the outbound side
//! serves only its own agent and needs no such thing. (What the connection proved about the
//! caller, its certificate, is `peer.rs`.)

use std::net::SocketAddr;

/// Builds the service for one accepted connection.
pub trait ForPeer {
    fn for_peer(&self, peer: SocketAddr) -> Self;
}

impl<S: Clone> ForPeer for crate::outbound::route::RouteService<S> {
    fn for_peer(&self, _: SocketAddr) -> Self {
        self.clone()
    }
}

impl ForPeer for crate::inbound::Stack {
    fn for_peer(&self, peer: SocketAddr) -> Self {
        match self {
            crate::inbound::Stack::App(s) => crate::inbound::Stack::App(s.for_peer(peer)),
            // The Ollama gateway is fair between agents by name already.
            crate::inbound::Stack::Ollama(s) => crate::inbound::Stack::Ollama(s.clone()),
        }
    }
}
