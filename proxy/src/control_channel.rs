//! One HTTP/1 exchange with the control process, over TLS 1.3 when the bootstrap names the
//! mesh CA (`[control] ca_file`), else plaintext (a mesh without identity).
//!
//! Over TLS the control process's certificate must chain to that CA and name the host the
//! sidecar dials (a DNS name or an IP address of `[control] address`). Once the sidecar has a
//! certificate in force it presents it, and the control process knows it by it; an expired
//! one is not presented (the control process would refuse the handshake), so a sidecar whose
//! certificate ran out while control was away can still renew with its token.
//!
//! Each exchange is its own connection: a long-poll lasts up to its wait, the rest are rare,
//! and a fresh handshake always presents the certificate in force.

use crate::bootstrap::Control;
use crate::identity::Identity;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The control process's address and, over TLS, how to reach it.
#[derive(Debug)]
pub struct Channel {
    address: String,
    tls: Option<Tls>,
}

struct Tls {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why the channel cannot be set up (at start).
#[derive(Debug, thiserror::Error)]
pub enum ChannelSetupError {
    #[error("control.ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("control.address {address}: {reason}")]
    Address { address: String, reason: String },
    #[error("control channel TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why one exchange failed; the message says what to fix (a TLS failure names its cause,
/// e.g. an unknown issuer for a wrong `ca_file`).
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("control {addr}: cannot connect: {reason}")]
    Connect { addr: String, reason: String },
    #[error("control {addr}: TLS handshake failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("control {addr}: {reason}")]
    Http { addr: String, reason: String },
    #[error("control {addr}: no answer within {after:?}")]
    Timeout { addr: String, after: Duration },
}

/// Presents this sidecar's certificate while it is in force.
#[derive(Debug)]
struct InForce(Arc<Identity>);

// === impl Channel ===

impl Channel {
    /// Reads the trust anchor, if any: a missing or unusable `ca_file` stops the start.
    pub fn new(cfg: &Control, identity: Option<Arc<Identity>>) -> Result<Self, ChannelSetupError> {
        let tls = match &cfg.ca_file {
            Some(path) => Some(Tls::new(path, &cfg.address, identity)?),
            None => None,
        };
        Ok(Self {
            address: cfg.address.clone(),
            tls,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Sends `req` (its URI's path and query; the authority is the control address) and
    /// reads at most `max_body` bytes of the answer, all within `limit`.
    pub async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        max_body: usize,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), ExchangeError> {
        let addr = &self.address;
        let http = |reason: String| ExchangeError::Http {
            addr: addr.clone(),
            reason,
        };
        let exchange = async {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| ExchangeError::Connect {
                    addr: addr.clone(),
                    reason: format!("no connection within {CONNECT_TIMEOUT:?}"),
                })?
                .map_err(|e| ExchangeError::Connect {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            let rsp = match &self.tls {
                Some(tls) => {
                    let stream = tls
                        .connector
                        .connect(tls.server_name.clone(), tcp)
                        .await
                        .map_err(|e| ExchangeError::Handshake {
                            addr: addr.clone(),
                            reason: e.to_string(),
                        })?;
                    send(TokioIo::new(stream), req).await.map_err(http)?
                }
                None => send(TokioIo::new(tcp), req).await.map_err(http)?,
            };
            let status = rsp.status();
            let body = Limited::new(rsp.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| http(format!("reading the body failed: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ExchangeError::Timeout {
                    addr: addr.clone(),
                    after: limit,
                })
            })
    }
}

async fn send<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

// === impl Tls ===

impl Tls {
    fn new(
        ca_file: &Path,
        address: &str,
        identity: Option<Arc<Identity>>,
    ) -> Result<Self, ChannelSetupError> {
        let ca_error = |reason: String| ChannelSetupError::CaFile {
            path: ca_file.to_owned(),
            reason,
        };
        let pem = std::fs::read(ca_file).map_err(|e| ca_error(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ca_error(format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ca_error(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ca_error("no certificate in it".into()));
        }
        let host = address
            .parse::<http::uri::Authority>()
            .map(|a| {
                a.host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            })
            .map_err(|e| ChannelSetupError::Address {
                address: address.to_owned(),
                reason: e.to_string(),
            })?;
        let server_name = ServerName::try_from(host).map_err(|e| ChannelSetupError::Address {
            address: address.to_owned(),
            reason: format!("not a DNS name or IP address: {e}"),
        })?;
        let builder = ClientConfig::builder_with_provider(crate::identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(identity) => builder.with_client_cert_resolver(Arc::new(InForce(identity))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![crate::identity::tls::ALPN_HTTP1.to_vec()];
        // A resumed session keeps the identity of the one it resumes: the first, made before
        // this sidecar had a certificate, would hide the certificate from every later call.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

// === impl InForce ===

impl InForce {
    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .current()
            .filter(|c| !c.time_left().is_zero())
            .map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for InForce {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }

    fn has_certs(&self) -> bool {
        self.certified().is_some()
    }
}
