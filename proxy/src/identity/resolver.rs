//! rustls certificate resolvers that read the credentials in force at each handshake, so a
//! renewal needs no new TLS configuration and disturbs no connection.

use super::Identity;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use std::sync::Arc;

/// Presents this sidecar's certificate, whichever side of the handshake it is on.
#[derive(Debug)]
pub struct Resolver(pub Arc<Identity>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}
