//! Mutual TLS between sidecars: TLS 1.3 only, client certificates required, ALPN `h2` and
//! `http/1.1`, certificates from [`super::Identity`] at every handshake.
//!
//! A server (inbound) accepts a client whose certificate chains to the mesh CA and names a
//! mesh agent (`spiffe://<domain>/agent/<name>`); that name is the caller. A client
//! (outbound) accepts a server whose certificate chains to the mesh CA and names the agent it
//! dialled, so an endpoint cannot pass itself off as another service.

use super::credentials::{agent_of, spiffe_id};
use super::resolver::Resolver;
use super::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::sync::Arc;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Bounded label set of `agent_tls_handshake_failures_total{reason}`.
pub const FAILURE_REASONS: [&str; 8] = [
    "no_local_certificate",
    "timeout",
    "no_certificate",
    "unknown_ca",
    "expired",
    "bad_certificate",
    "not_a_mesh_agent",
    "other",
];

/// The TLS configurations for one set of trust anchors.
#[derive(Debug)]
pub struct TlsConfigs {
    pub server: Arc<ServerConfig>,
    /// Dialling an HTTP/2 peer.
    pub client_h2: Arc<ClientConfig>,
    /// Dialling an HTTP/1.1 peer.
    pub client_http1: Arc<ClientConfig>,
}

/// Checks a peer sidecar's certificate: the mesh CA, then the SPIFFE ID of the dialled agent.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    trust_domain: String,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server and client configurations trusting `roots`.
pub fn configs(
    identity: &Arc<Identity>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<TlsConfigs, rustls::Error> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(identity.clone())));
    server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    let peer = Arc::new(PeerVerifier {
        roots,
        algs: provider.signature_verification_algorithms,
        trust_domain: trust_domain.to_owned(),
    });
    let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut c = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(peer.clone())
            .with_client_cert_resolver(Arc::new(Resolver(identity.clone())));
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(c))
    };
    Ok(TlsConfigs {
        server: Arc::new(server),
        client_h2: client(ALPN_H2)?,
        client_http1: client(ALPN_HTTP1)?,
    })
}

/// The URI SAN of a certificate that names a mesh agent in `trust_domain`: the agent.
pub fn peer_agent(cert: &CertificateDer<'_>, trust_domain: &str) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut agents = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => agent_of(uri, trust_domain),
        _ => None,
    });
    let agent = agents.next()?;
    // A certificate naming two agents names none.
    agents.next().is_none().then(|| agent.to_owned())
}

/// Names a failed handshake for the metric.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "other";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | Error::InvalidCertificate(CertificateError::BadSignature) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::NotValidForName)
        | Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "not_a_mesh_agent"
        }
        Error::InvalidCertificate(_) => "bad_certificate",
        _ => "other",
    }
}

// === impl PeerVerifier ===

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        // The dialled agent's name travels as the server name.
        let ServerName::DnsName(want) = server_name else {
            return Err(rustls::CertificateError::NotValidForName.into());
        };
        match peer_agent(end_entity, &self.trust_domain) {
            Some(agent) if agent == want.as_ref() => Ok(ServerCertVerified::assertion()),
            _ => {
                tracing::debug!(want = %spiffe_id(&self.trust_domain, want.as_ref()),
                    "peer certificate names another agent");
                Err(rustls::CertificateError::NotValidForName.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
