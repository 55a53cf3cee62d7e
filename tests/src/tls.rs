//! A TLS client for the inbound listener, presenting whatever certificate a test gives it (or
//! none), and certificates made on the spot: from the mesh CA (valid, expired) or another CA.

use crate::body::BoxError;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A certificate chain and key, PEM.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Signs a leaf for `agent` (`spiffe://mesh/agent/<agent>`) with the CA `ca_pem`/`ca_key_pem`,
/// valid from `not_before` to `not_after`.
pub fn leaf(
    ca_pem: &str,
    ca_key_pem: &str,
    agent: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> ClientCert {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).expect("the CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key).expect("the CA");
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://mesh/agent/{agent}")
            .try_into()
            .expect("a URI"),
    )];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &issuer).expect("a leaf");
    ClientCert {
        chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A CA of its own (not the mesh's): (certificate PEM, key PEM).
pub fn other_ca() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("a CA");
    (cert.pem(), key.serialize_pem())
}

pub fn valid_for(d: Duration) -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (now - Duration::from_secs(60), now + d)
}

/// `GET path` over TLS (HTTP/1.1) to `addr` with `headers`; the status and body, or the error
/// that ended the exchange (a refused handshake surfaces here in TLS 1.3).
pub async fn get(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, bytes::Bytes), BoxError> {
    exchange(addr, cert, http::Method::GET, path, headers, "").await
}

/// `POST path` with `body`, as [`get`].
pub async fn post(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Result<(u16, bytes::Bytes), BoxError> {
    exchange(addr, cert, http::Method::POST, path, headers, body).await
}

/// A request to the control process over TLS, verifying its certificate against `ca_pem` for
/// the name `127.0.0.1`, presenting `cert` if given: the status and body, or the error that
/// ended the exchange.
pub async fn control(
    addr: SocketAddr,
    ca_pem: &str,
    cert: Option<&ClientCert>,
    req: Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(u16, bytes::Bytes), BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    send_tls(addr, "127.0.0.1", builder, cert, req).await
}

/// Completes a TLS handshake with the control process, verifying it against `ca_pem` for the
/// name `127.0.0.1`; answers the leaf certificate it served (DER).
pub async fn control_leaf(addr: SocketAddr, ca_pem: &str) -> Result<Vec<u8>, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = crate::bounded(
        "a TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp),
    )
    .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no server certificate")?;
    Ok(leaf.as_ref().to_vec())
}

async fn exchange(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Result<(u16, bytes::Bytes), BoxError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://b{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from_static(
        body.as_bytes(),
    )))?;
    send_tls(addr, "b", builder, cert, req).await
}

async fn send_tls(
    addr: SocketAddr,
    server_name: &str,
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    cert: Option<&ClientCert>,
    req: Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(u16, bytes::Bytes), BoxError> {
    let mut config = match cert {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server_name)?.to_owned(), tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    // An error rather than a panic when nothing answers within the wait: in TLS 1.3 the server
    // refuses a bad client certificate after the client has finished its side of the
    // handshake, so a refused caller learns it only by reading; tests check the refusal by the
    // server's count of it.
    let rsp = tokio::time::timeout(crate::WAIT, send.send_request(req))
        .await
        .map_err(|_| format!("no answer over TLS within {:?}", crate::WAIT))??;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Accepts any server certificate: these tests examine the server's checks of the client.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
