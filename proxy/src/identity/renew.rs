//! Gets this sidecar's certificate from the control process and keeps it fresh.
//!
//! Each round makes a new key, sends a CSR with the agent's bootstrap token
//! (`POST /v1/certificate`), and installs the answer. The next round starts at two thirds of
//! the certificate's lifetime, leaving a third for retries: while the control process is away
//! the sidecar keeps serving on the certificate in force, retrying with backoff, and every
//! failure logs the time the certificate has left.

use super::credentials::{spiffe_id, Credentials};
use super::Identity;
use crate::bootstrap::IdentityBootstrap;
use crate::control_channel::Channel;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use mesh_config::backoff::Backoff;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Longest answer read from the CA.
const MAX_BODY: usize = 64 * 1024;
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("cannot read the bootstrap token {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("the control channel is not TLS: the token is not sent in clear")]
    Plaintext,
    #[error("control {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error(transparent)]
    Exchange(#[from] crate::control_channel::ExchangeError),
    #[error("control {addr} refused the CSR: {status} {body}")]
    Refused {
        addr: String,
        status: StatusCode,
        body: String,
    },
    #[error("control {addr}: the answer is not a certificate: {reason}")]
    Answer { addr: String, reason: String },
    #[error(transparent)]
    Credentials(#[from] super::credentials::CredentialsError),
}

#[derive(serde::Deserialize)]
struct Answer {
    certificate: String,
    ca: String,
    spiffe_id: String,
    not_after_unix_ms: u64,
}

pub struct Renewer {
    channel: Arc<Channel>,
    agent: String,
    cfg: IdentityBootstrap,
    identity: Arc<Identity>,
}

/// When to start renewing a certificate received at `received` that expires at `not_after`:
/// after two thirds of the lifetime it had on arrival.
pub fn renew_after(received: SystemTime, not_after: SystemTime) -> Duration {
    not_after.duration_since(received).unwrap_or_default() * 2 / 3
}

// === impl Renewer ===

impl Renewer {
    pub fn new(
        channel: Arc<Channel>,
        agent: &str,
        cfg: IdentityBootstrap,
        identity: Arc<Identity>,
    ) -> Self {
        Self {
            channel,
            agent: agent.to_owned(),
            cfg,
            identity,
        }
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let wait = match self.renew_once().await {
                Ok(creds) => {
                    backoff.reset();
                    let after = renew_after(creds.received, creds.not_after);
                    tracing::info!(spiffe_id = %creds.spiffe_id,
                        valid_s = creds.time_left().as_secs(),
                        renew_in_s = after.as_secs(), "certificate installed");
                    ::metrics::counter!(crate::metrics::IDENTITY_RENEWALS, "result" => "ok")
                        .increment(1);
                    self.identity.install(creds);
                    after
                }
                Err(e) => {
                    ::metrics::counter!(crate::metrics::IDENTITY_RENEWALS, "result" => "error")
                        .increment(1);
                    match self.identity.current() {
                        Some(c) if !c.time_left().is_zero() => {
                            tracing::warn!(error = %e, time_left_s = c.time_left().as_secs(),
                                "cannot renew the certificate; serving on the current one")
                        }
                        Some(_) => tracing::error!(error = %e,
                            "cannot renew the certificate and the current one has expired"),
                        None => tracing::warn!(error = %e, "cannot get a certificate yet"),
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::drain::stopped(&mut stop) => return,
            }
        }
    }

    async fn renew_once(&self) -> Result<Credentials, RenewError> {
        let token = tokio::fs::read_to_string(&self.cfg.token_file)
            .await
            .map_err(|source| RenewError::Token {
                path: self.cfg.token_file.display().to_string(),
                source,
            })?;
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let body = serde_json::json!({ "agent": self.agent, "csr": csr }).to_string();
        let answer = self.exchange(token.trim(), body).await?;
        let not_after = UNIX_EPOCH + Duration::from_millis(answer.not_after_unix_ms);
        let want = spiffe_id(&self.cfg.trust_domain, &self.agent);
        Ok(Credentials::new(
            key.serialize_der(),
            &answer.certificate,
            &answer.ca,
            &answer.spiffe_id,
            &want,
            not_after,
        )?)
    }

    async fn exchange(&self, token: &str, body: String) -> Result<Answer, RenewError> {
        if !self.channel.is_tls() {
            return Err(RenewError::Plaintext);
        }
        let addr = self.channel.address().to_owned();
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/certificate")
            .header(http::header::HOST, addr.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RenewError::Transport {
                addr: addr.clone(),
                reason: format!("the token is not a valid header value: {e}"),
            })?;
        let (status, body) = self
            .channel
            .exchange(req, MAX_BODY, EXCHANGE_TIMEOUT)
            .await?;
        if status != StatusCode::OK {
            return Err(RenewError::Refused {
                addr,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        serde_json::from_slice::<Answer>(&body).map_err(|e| RenewError::Answer {
            addr,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_starts_at_two_thirds_of_the_lifetime() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renew_after(t0, t0 + Duration::from_secs(3 * 3600)),
            Duration::from_secs(2 * 3600)
        );
        assert_eq!(
            renew_after(t0, t0 + Duration::from_secs(3)),
            Duration::from_secs(2)
        );
        // Received already expired (a clock far ahead): renew at once.
        assert_eq!(renew_after(t0, t0 - Duration::from_secs(1)), Duration::ZERO);
    }
}
