//! Mesh identity: the control process as the mesh's certificate authority.
//!
//! `POST /v1/certificate` with `Authorization: Bearer <the agent's bootstrap token>` and
//! `{"agent": NAME, "csr": PEM}` answers `{"certificate", "ca", "spiffe_id",
//! "not_after_unix_ms"}`. The token must be the one the tokens file holds for NAME: one
//! agent's token cannot get another agent's certificate. Refusals are logged and counted in
//! `mesh_control_identity_refused_total{reason}`; issues in `mesh_control_identity_issued_total`.
//!
//! With identity on, the control channel is TLS ([`channel`]) and the long-poll and the ack
//! need the agent's certificate (presented in the handshake) or, before it has one, its
//! token: a sidecar gets only its own agent's snapshot and reports only for itself. A
//! connection with a certificate speaks for that agent only, whatever token it sends.

pub mod ca;
pub mod channel;
pub mod tokens;

use crate::push::{error, json};
use bytes::Bytes;
use ca::Ca;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;
use tokens::Tokens;

/// Largest CSR request body: a P-256 or RSA-4096 CSR is well under this.
const MAX_BODY: usize = 16 * 1024;

/// Refusal reasons, the bounded label set of `mesh_control_identity_refused_total`.
pub const REFUSAL_REASONS: [&str; 5] = [
    "no_token",
    "wrong_token",
    "wrong_certificate",
    "bad_request",
    "bad_csr",
];

/// The CA and who may ask it.
#[derive(Debug)]
pub struct Identity {
    pub ca: Ca,
    pub tokens: PathBuf,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CsrRequest {
    agent: String,
    csr: String,
}

// === impl Identity ===

impl Identity {
    /// Signs a CSR for the agent the request's token names. `peer` is the agent the
    /// connection's certificate names, if it presented one.
    pub async fn certificate(
        &self,
        req: Request<Incoming>,
        peer: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let offered = bearer(req.headers()).map(str::to_owned);
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return refuse("bad_request", None, StatusCode::PAYLOAD_TOO_LARGE),
        };
        let ask: CsrRequest = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(_) => return refuse("bad_request", None, StatusCode::BAD_REQUEST),
        };
        if peer.is_some_and(|p| p != ask.agent) {
            return refuse("wrong_certificate", Some(&ask.agent), StatusCode::FORBIDDEN);
        }
        let Some(offered) = offered else {
            return refuse("no_token", Some(&ask.agent), StatusCode::UNAUTHORIZED);
        };
        let tokens = match Tokens::read(&self.tokens).await {
            Ok(t) => t,
            Err(e) => {
                // Fail closed: an unreadable tokens file admits nobody.
                tracing::error!(error = %e, "cannot read the bootstrap tokens");
                return error(StatusCode::SERVICE_UNAVAILABLE, "tokens unavailable");
            }
        };
        if !tokens.admits(&ask.agent, &offered) {
            return refuse("wrong_token", Some(&ask.agent), StatusCode::FORBIDDEN);
        }
        match self.ca.sign(&ask.agent, &ask.csr) {
            Ok(issued) => {
                ::metrics::counter!(crate::metrics::IDENTITY_ISSUED).increment(1);
                let not_after_unix_ms = issued
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                tracing::info!(agent = %ask.agent, spiffe_id = %issued.spiffe_id,
                    not_after_unix_ms, "certificate issued");
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "certificate": issued.certificate_pem,
                        "ca": issued.ca_pem,
                        "spiffe_id": issued.spiffe_id,
                        "not_after_unix_ms": not_after_unix_ms,
                    })
                    .to_string(),
                )
            }
            Err(e) => {
                tracing::warn!(agent = %ask.agent, error = %e, "certificate refused");
                ::metrics::counter!(crate::metrics::IDENTITY_REFUSED, "reason" => "bad_csr")
                    .increment(1);
                error(StatusCode::BAD_REQUEST, &e.to_string())
            }
        }
    }
}

// === impl Identity (the control channel) ===

impl Identity {
    /// Admits a control-channel call for `agent` when its connection's certificate names
    /// that agent (`peer`) or, without a certificate, when it carries that agent's token.
    pub async fn check_agent(
        &self,
        headers: &http::HeaderMap,
        agent: &str,
        peer: Option<&str>,
    ) -> Result<(), Response<Full<Bytes>>> {
        match peer {
            Some(p) if p == agent => return Ok(()),
            Some(_) => {
                return Err(refuse(
                    "wrong_certificate",
                    Some(agent),
                    StatusCode::FORBIDDEN,
                ))
            }
            None => {}
        }
        let Some(offered) = bearer(headers) else {
            return Err(refuse("no_token", Some(agent), StatusCode::UNAUTHORIZED));
        };
        match Tokens::read(&self.tokens).await {
            Ok(t) if t.admits(agent, offered) => Ok(()),
            Ok(_) => Err(refuse("wrong_token", Some(agent), StatusCode::FORBIDDEN)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the bootstrap tokens");
                Err(error(StatusCode::SERVICE_UNAVAILABLE, "tokens unavailable"))
            }
        }
    }
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .filter(|t| !t.is_empty())
}

fn refuse(reason: &'static str, agent: Option<&str>, status: StatusCode) -> Response<Full<Bytes>> {
    // The agent name as asked is in the log, never a label (any caller could mint series).
    tracing::warn!(
        reason,
        agent = agent.unwrap_or(""),
        "control channel call refused"
    );
    ::metrics::counter!(crate::metrics::IDENTITY_REFUSED, "reason" => reason).increment(1);
    let text = match reason {
        "no_token" => "a bearer token is required",
        "wrong_token" => "this token does not name this agent",
        "wrong_certificate" => "this connection's certificate names another agent",
        _ => "expected {\"agent\": NAME, \"csr\": PEM}",
    };
    error(status, text)
}
