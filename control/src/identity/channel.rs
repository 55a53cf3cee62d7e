//! The control channel over TLS 1.3 (rustls, ring): what the control process serves its API
//! with when it is the mesh CA, so bootstrap tokens, operator tokens and certificates never
//! cross the network in clear.
//!
//! The serving certificate comes from the mesh CA itself, for the names and addresses
//! sidecars dial (`--tls-name`, `--tls-ip`), and is renewed at two thirds of its lifetime;
//! sidecars trust the CA certificate (`[control] ca_file`). A client may present a mesh
//! certificate: verified against the same CA, its SPIFFE ID names the sidecar, and the
//! connection speaks for that agent only. A client without one (a sidecar's first CSR, an
//! operator) is accepted and proves itself with a bearer token per request.

use super::ca::Ca;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry interval of a failed renewal (the certificate in force still has a third to run).
const RETRY: Duration = Duration::from_secs(5);

/// The names the serving certificate carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot issue the control channel's certificate: {0}")]
    Issue(#[from] super::ca::SignError),
    #[error("the control channel's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the CA certificate cannot be a trust anchor: {0}")]
    Anchor(String),
}

/// The TLS acceptor of the control channel and the certificate it serves.
pub struct ChannelTls {
    acceptor: tokio_rustls::TlsAcceptor,
    serving: Arc<Serving>,
    names: ServerNames,
    trust_domain: String,
}

/// The serving certificate in force, swapped whole at renewal: connections already made keep
/// their handshake.
#[derive(Debug)]
struct Serving {
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ChannelTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelTls")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

// === impl ChannelTls ===

impl ChannelTls {
    /// Issues a first serving certificate and builds the configuration: TLS 1.3 only, ALPN
    /// `http/1.1`, client certificates optional and, when present, chained to the mesh CA.
    pub fn new(ca: &Ca, trust_domain: &str, names: ServerNames) -> Result<Self, ChannelError> {
        let (key, not_after) = issue(ca, &names)?;
        log_issued(&names, not_after);
        let serving = Arc::new(Serving {
            current: ArcSwap::from_pointee(key),
        });
        let mut roots = RootCertStore::empty();
        for anchor in CertificateDer::pem_slice_iter(ca.ca_pem().as_bytes()) {
            let anchor = anchor.map_err(|e| ChannelError::Anchor(e.to_string()))?;
            roots
                .add(anchor)
                .map_err(|e| ChannelError::Anchor(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| ChannelError::Anchor(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(serving.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No resumption: a resumed session would carry a client certificate checked when it
        // was first presented, perhaps since expired; every call is a full handshake.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            serving,
            names,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Completes the handshake; answers the stream and the agent a client certificate
    /// names, if one was presented. A plaintext client, a certificate from another CA or an
    /// expired one ends here, counted.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<Arc<str>>)> {
        let refused = |reason: String| {
            tracing::debug!(%reason, "control channel handshake failed");
            ::metrics::counter!(crate::metrics::CHANNEL_HANDSHAKE_FAILURES).increment(1);
            None
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return refused(e.to_string()),
            Err(_) => return refused("timeout".into()),
        };
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        let agent = match leaf {
            None => None,
            Some(leaf) => match agent_named(leaf, &self.trust_domain) {
                Some(agent) => Some(agent),
                // Chained to the mesh CA but naming no agent: not a sidecar's certificate.
                None => return refused("a certificate naming no mesh agent".into()),
            },
        };
        Some((tls, agent))
    }

    /// Renews the serving certificate at two thirds of its lifetime until `stop`.
    pub async fn renew(self: Arc<Self>, ca: Arc<super::Identity>, mut stop: watch::Receiver<bool>) {
        let every = ca.ca.lifetime() * 2 / 3;
        let mut wait = every;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::stopped(&mut stop) => return,
            }
            wait = match issue(&ca.ca, &self.names) {
                Ok((key, not_after)) => {
                    self.serving.current.store(Arc::new(key));
                    log_issued(&self.names, not_after);
                    every
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the control channel's certificate");
                    RETRY
                }
            };
        }
    }
}

impl ResolvesServerCert for Serving {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn issue(ca: &Ca, names: &ServerNames) -> Result<(CertifiedKey, SystemTime), ChannelError> {
    let issued = ca.issue_server(&names.dns, &names.ips)?;
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ChannelError::Anchor(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_pkcs8));
    let certified = CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())?;
    Ok((certified, issued.not_after))
}

fn log_issued(names: &ServerNames, not_after: SystemTime) {
    let valid_s = not_after
        .duration_since(SystemTime::now())
        .map_or(0, |d| d.as_secs());
    tracing::info!(dns = ?names.dns, ips = ?names.ips, valid_s,
        "control channel certificate issued");
}

/// The agent a client certificate's URI SAN names (`spiffe://<domain>/agent/<name>`); a
/// certificate naming two agents names none.
fn agent_named(leaf: &CertificateDer<'_>, trust_domain: &str) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let prefix = format!("spiffe://{trust_domain}/agent/");
    let mut agents = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()),
        _ => None,
    });
    let agent = agents.next()?;
    let valid = !agent.is_empty()
        && agent.len() <= 63
        && agent
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (valid && agents.next().is_none()).then(|| agent.into())
}
