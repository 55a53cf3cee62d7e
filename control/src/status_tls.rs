//! `GET` over TLS 1.3 to the control process, trusting only the mesh CA: how an operator's
//! tool (`mesh-control compliance`) reaches `/status` of a control process with identity on.
//! One connection per call; the bearer token goes only to a server the CA vouches for.

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// A TLS client trusting the mesh CA.
pub struct StatusTls {
    connector: tokio_rustls::TlsConnector,
}

/// An answer: status, content type, body.
pub type Answer = (StatusCode, String, Bytes);

// === impl StatusTls ===

impl StatusTls {
    /// Reads the CA certificate (PEM); the error says what is wrong with the file.
    pub fn from_ca_file(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// `GET uri` (an `https://` URI with a host), reading at most `max_body` bytes.
    pub async fn get(
        &self,
        uri: &Uri,
        bearer: Option<&str>,
        max_body: usize,
    ) -> Result<Answer, String> {
        let host = uri.host().ok_or("no host")?;
        let port = uri.port_u16().unwrap_or(443);
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((name, port))
            .await
            .map_err(|e| e.to_string())?;
        let tls = self
            .connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req =
            Request::get(pq).header(header::HOST, uri.authority().map_or(name, |a| a.as_str()));
        if let Some(t) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let rsp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = rsp.status();
        let content_type = rsp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = Limited::new(rsp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, content_type, body))
    }
}
