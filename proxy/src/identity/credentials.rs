//! One certificate with its key and the CA that verifies peers, as rustls uses them.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::sync::Arc;
use std::time::SystemTime;

/// A certified key in force: what this sidecar presents and whom it trusts.
#[derive(Debug)]
pub struct Credentials {
    pub certified: Arc<CertifiedKey>,
    /// The mesh CA: peers' certificates must chain to it.
    pub roots: Arc<RootCertStore>,
    /// The CA certificate as received, to notice when it changes.
    pub ca_pem: String,
    pub spiffe_id: String,
    /// When it arrived (the renewal clock starts here, on this host's clock).
    pub received: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the certificate is not PEM: {0}")]
    Certificate(String),
    #[error("the CA certificate is not PEM or not usable: {0}")]
    Ca(String),
    #[error("the certificate does not match the key: {0}")]
    Key(String),
    #[error("the certificate names {got}, not {want}")]
    Name { got: String, want: String },
}

// === impl Credentials ===

impl Credentials {
    /// Assembles credentials from the CA's answer, checking that the certificate is for
    /// `key` and names `want_id`.
    pub fn new(
        key_pkcs8: Vec<u8>,
        certificate_pem: &str,
        ca_pem: &str,
        spiffe_id: &str,
        want_id: &str,
        not_after: SystemTime,
    ) -> Result<Self, CredentialsError> {
        if spiffe_id != want_id {
            return Err(CredentialsError::Name {
                got: spiffe_id.to_owned(),
                want: want_id.to_owned(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(certificate_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CredentialsError::Certificate(e.to_string()))?;
        if chain.is_empty() {
            return Err(CredentialsError::Certificate("no certificate".into()));
        }
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| CredentialsError::Ca(e.to_string()))?;
            roots
                .add(ca)
                .map_err(|e| CredentialsError::Ca(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(CredentialsError::Ca("no certificate".into()));
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8));
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| CredentialsError::Key(e.to_string()))?;
        Ok(Self {
            certified: Arc::new(certified),
            roots: Arc::new(roots),
            ca_pem: ca_pem.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            received: SystemTime::now(),
            not_after,
        })
    }

    /// Time left before the certificate expires; zero once it has.
    pub fn time_left(&self) -> std::time::Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

/// The SPIFFE ID a sidecar of `agent` holds in trust domain `domain`.
pub fn spiffe_id(domain: &str, agent: &str) -> String {
    format!("spiffe://{domain}/agent/{agent}")
}

/// The agent a SPIFFE ID names, if it is a mesh agent's ID in `domain`.
pub fn agent_of<'a>(id: &'a str, domain: &str) -> Option<&'a str> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(domain)?;
    let agent = rest.strip_prefix("/agent/")?;
    let valid = !agent.is_empty()
        && agent.len() <= 63
        && agent
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_mesh_agent_id_in_the_domain_names_an_agent() {
        assert_eq!(agent_of("spiffe://mesh/agent/a-1", "mesh"), Some("a-1"));
        assert_eq!(agent_of("spiffe://other/agent/a-1", "mesh"), None);
        assert_eq!(agent_of("spiffe://meshy/agent/a-1", "mesh"), None);
        assert_eq!(agent_of("spiffe://mesh/agent/A", "mesh"), None);
        assert_eq!(agent_of("spiffe://mesh/agent/a/b", "mesh"), None);
        assert_eq!(agent_of("spiffe://mesh/ns/a", "mesh"), None);
        assert_eq!(spiffe_id("mesh", "a"), "spiffe://mesh/agent/a");
    }
}
