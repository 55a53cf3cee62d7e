//! The sidecar's side of the control channel: long-polls the control process for a newer
//! snapshot, applies it through [`State::apply`], reports applied or rejected, and persists the
//! last good snapshot so a restart while control is unreachable starts from it. When control is
//! unreachable the snapshot in force stays and the client retries with jittered backoff.
//!
//! With mesh identity the exchanges go over TLS ([`crate::control_channel`]); the sidecar is
//! known by its certificate once it has one, and by its bootstrap token before that. The
//! token is never sent over a plaintext channel.

use crate::bootstrap::Control;
use crate::control_channel::{Channel, ExchangeError};
use crate::identity::Identity;
use crate::state::State;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use mesh_config::backoff::Backoff;
use mesh_config::{Phase, Snapshot};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Largest snapshot body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Why one exchange with the control process failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("control {addr}: status {status}: {body}")]
    Status {
        addr: String,
        status: StatusCode,
        body: String,
    },
}

pub struct ControlClient {
    cfg: Control,
    agent: String,
    phase: Phase,
    state: Arc<State>,
    channel: Arc<Channel>,
    /// The highest version received, applied or rejected: the next poll waits for a newer one
    /// instead of fetching a rejected version again.
    seen: u64,
    /// `&admin=..&mode=..` for each poll: where control (and the compliance check) finds this
    /// sidecar's `/health` and `/metrics`, and whether it is the Ollama gateway.
    report: String,
    /// The agent's bootstrap token and certificate: with mesh identity on, the control
    /// process serves an agent's snapshot only to the holder of its certificate or token.
    proof: Option<(std::path::PathBuf, Arc<Identity>)>,
    /// What `/health` reports of the channel.
    link: Option<Arc<crate::health::ControlLink>>,
}

/// Reads a persisted snapshot; a missing or unreadable file is `None` (and logged).
pub fn load_persisted(path: &Path) -> Option<Snapshot> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the persisted snapshot");
            return None;
        }
    };
    match serde_json::from_slice::<Snapshot>(&bytes).map(|s| (s.validate(), s)) {
        Ok((Ok(()), snap)) => Some(snap),
        Ok((Err(e), _)) => {
            tracing::warn!(file = %path.display(), error = %e, "persisted snapshot is invalid; ignoring it");
            None
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "persisted snapshot is not JSON; ignoring it");
            None
        }
    }
}

/// Writes `body` next to `path` and renames it into place, so a crash leaves either the old
/// file or the new one, never half of one.
async fn persist(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tokio::fs::write(&tmp, body).await?;
    tokio::fs::rename(&tmp, path).await
}

// === impl ControlClient ===

impl ControlClient {
    pub fn new(
        cfg: Control,
        channel: Arc<Channel>,
        agent: &str,
        phase: Phase,
        state: Arc<State>,
    ) -> Self {
        let seen = state.load().version();
        Self {
            cfg,
            agent: agent.to_owned(),
            phase,
            state,
            channel,
            seen,
            report: String::new(),
            proof: None,
            link: None,
        }
    }

    /// Reports each exchange's outcome to `/health`.
    pub fn with_link(mut self, link: Arc<crate::health::ControlLink>) -> Self {
        self.link = Some(link);
        self
    }

    /// Proves the agent with its certificate in force (presented in the TLS handshake) or,
    /// while it has none, its bootstrap token (read at every call). Over a plaintext
    /// channel the token is never sent.
    pub fn with_identity(
        mut self,
        token_file: std::path::PathBuf,
        identity: Arc<Identity>,
    ) -> Self {
        self.proof = Some((token_file, identity));
        self
    }

    /// Reports the admin listener and what the sidecar fronts with every poll.
    pub fn with_admin(mut self, admin: std::net::SocketAddr, ollama_gateway: bool) -> Self {
        let mode = if ollama_gateway { "ollama" } else { "app" };
        self.report = format!("&admin={admin}&mode={mode}");
        self
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(50), self.cfg.max_backoff);
        let mut failing = false;
        loop {
            let delay = tokio::select! {
                res = self.poll_once() => match res {
                    Ok(()) => {
                        if let Some(link) = &self.link {
                            link.reachable();
                        }
                        if failing {
                            tracing::info!(control = %self.cfg.address, "control reachable again");
                        }
                        failing = false;
                        backoff.reset();
                        None
                    }
                    Err(e) => {
                        if let Some(link) = &self.link {
                            link.failed(e.to_string());
                        }
                        if !failing {
                            tracing::warn!(error = %e, version = self.state.load().version(),
                                "control unreachable; keeping the snapshot in force");
                        }
                        failing = true;
                        Some(backoff.next_delay())
                    }
                },
                _ = crate::drain::stopped(&mut stop) => return,
            };
            if let Some(delay) = delay {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = crate::drain::stopped(&mut stop) => return,
                }
            }
        }
    }

    async fn poll_once(&mut self) -> Result<(), ControlError> {
        let pq = format!(
            "/v1/snapshot?agent={}&phase={}&version={}&wait={}ms{}",
            self.agent,
            self.phase,
            self.seen,
            self.cfg.wait.as_millis(),
            self.report,
        );
        let limit = self.cfg.wait + self.cfg.wait / 16 + Duration::from_secs(5);
        let (status, body) = self.call(Method::GET, &pq, Bytes::new(), limit).await?;
        match status {
            StatusCode::NOT_MODIFIED => Ok(()),
            StatusCode::OK => {
                self.receive(body).await;
                Ok(())
            }
            status => Err(ControlError::Status {
                addr: self.cfg.address.clone(),
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned(),
            }),
        }
    }

    async fn receive(&mut self, body: Bytes) {
        let parsed = serde_json::from_slice::<Snapshot>(&body)
            .map_err(|e| (0, format!("not a snapshot: {e}")))
            .and_then(|s| match s.validate() {
                Ok(()) => Ok(s),
                Err(e) => Err((s.version, e.to_string())),
            });
        match parsed {
            Ok(snap) => {
                let version = snap.version;
                self.seen = version;
                self.state.apply(snap);
                tracing::info!(version, "snapshot from control applied");
                if let Some(path) = &self.cfg.persist {
                    if let Err(e) = persist(path, &body).await {
                        tracing::warn!(file = %path.display(), error = %e,
                            "cannot persist the snapshot; a restart will not start from it");
                    }
                }
                self.ack(version, None).await;
            }
            Err((version, reason)) => {
                tracing::error!(version, %reason, in_force = self.state.load().version(),
                    "snapshot from control rejected; keeping the snapshot in force");
                self.state.reject();
                self.seen = self.seen.max(version);
                self.ack(version, Some(reason)).await;
            }
        }
    }

    /// Best effort: a lost report is repeated implicitly by the next poll's `version`.
    async fn ack(&self, version: u64, rejected: Option<String>) {
        let body = serde_json::json!({
            "agent": self.agent,
            "version": version,
            "rejected": rejected,
        });
        let res = self
            .call(
                Method::POST,
                "/v1/ack",
                Bytes::from(body.to_string()),
                Duration::from_secs(5),
            )
            .await;
        if let Err(e) = res {
            tracing::debug!(error = %e, version, "report to control failed");
        }
    }

    async fn call(
        &self,
        method: Method,
        pq: &str,
        body: Bytes,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), ControlError> {
        let mut req = Request::builder()
            .method(method)
            .uri(pq)
            .header(http::header::HOST, self.cfg.address.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a request from valid parts");
        if let Some((path, identity)) = &self.proof {
            let has_cert = identity.current().is_some_and(|c| !c.time_left().is_zero());
            // Unreadable: the call goes without, and control's refusal says why.
            if !has_cert && self.channel.is_tls() {
                if let Ok(token) = tokio::fs::read_to_string(path).await {
                    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    {
                        req.headers_mut().insert(http::header::AUTHORIZATION, v);
                    }
                }
            }
        }
        Ok(self.channel.exchange(req, MAX_BODY, limit).await?)
    }
}
