//! The control process's HTTP API: snapshot long-poll, sidecar reports, status, metrics.
//!
//! `GET /v1/snapshot?agent=A&phase=P&version=N[&wait=30s][&admin=IP:PORT&mode=app|ollama]`
//! answers at once with the current generation when its version differs from N, else waits up
//! to `wait` for a new one and answers `304` when none came. `admin` and `mode` say where the
//! sidecar's admin listener is and what it fronts, for `/status` and the compliance check.
//! `POST /v1/ack` takes `{"agent", "version", "rejected"?}`. `POST /v1/catalog/confirm` with
//! `Authorization: Bearer <MESH_CONTROL_TOKEN>` publishes a catalog the guard holds back.
//! `POST /v1/certificate` signs a sidecar's CSR (see [`crate::identity`]).
//!
//! With mesh identity on, every call is over TLS ([`crate::identity::channel`]); a plaintext
//! client gets no answer. Without it the channel is plaintext HTTP/1.

use crate::guard::Confirm;
use crate::snapshots::Generation;
use crate::status::{Ack, SidecarMode, Sidecars, Status};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use mesh_config::Phase;
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// Longest wait a long-poll may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Header carrying the version of the snapshot in a response.
pub const VERSION_HEADER: &str = "x-mesh-version";

pub struct Push {
    pub generations: watch::Receiver<Arc<Generation>>,
    pub sidecars: Arc<Sidecars>,
    pub status: Status,
    pub prometheus: &'static PrometheusHandle,
    pub confirm: Confirmer,
    /// The mesh CA; `None` when identity is off.
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// With identity on, the channel is TLS only; `None` serves plaintext (a mesh without
    /// identity).
    pub tls: Option<Arc<crate::identity::channel::ChannelTls>>,
}

/// Who is calling: the address, and the agent its TLS client certificate names.
#[derive(Clone, Debug)]
struct Peer {
    addr: SocketAddr,
    agent: Option<Arc<str>>,
}

/// `POST /v1/catalog/confirm`: an operator publishes a catalog the guard holds back.
pub struct Confirmer {
    /// The bearer token the call must carry; `None` refuses every call.
    pub token: Option<String>,
    pub guard: mpsc::Sender<Confirm>,
}

struct Poll {
    agent: String,
    phase: Option<Phase>,
    version: u64,
    wait: Duration,
    admin: Option<SocketAddr>,
    mode: Option<SidecarMode>,
}

// === impl Push ===

impl Push {
    pub async fn serve(self, listener: TcpListener, stop: watch::Receiver<bool>) {
        let push = Arc::new(self);
        let mut accept_stop = stop.clone();
        // Each connection holds a sender; all dropped means every connection has closed.
        let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            let (stream, peer) = tokio::select! {
                _ = crate::stopped(&mut accept_stop) => break,
                res = listener.accept() => match res {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, most likely: let connections close before retrying.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let push = push.clone();
            let mut stop = stop.clone();
            let open = open.clone();
            tokio::spawn(async move {
                let _open = open;
                match push.tls.clone() {
                    Some(tls) => {
                        let accepted = tokio::select! {
                            a = tls.accept(stream) => a,
                            _ = crate::stopped(&mut stop) => return,
                        };
                        if let Some((stream, agent)) = accepted {
                            let peer = Peer { addr: peer, agent };
                            push.serve_connection(TokioIo::new(stream), peer, stop)
                                .await;
                        }
                    }
                    None => {
                        let peer = Peer {
                            addr: peer,
                            agent: None,
                        };
                        push.serve_connection(TokioIo::new(stream), peer, stop)
                            .await;
                    }
                }
            });
        }
        drop(listener);
        drop(open);
        let _ = all_closed.recv().await;
    }

    async fn serve_connection<I>(
        self: Arc<Self>,
        io: I,
        peer: Peer,
        mut stop: watch::Receiver<bool>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let push = self;
        let svc = hyper::service::service_fn(move |req| {
            let push = push.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(push.handle(req, &peer).await) }
        });
        let conn = http1::Builder::new().serve_connection(io, svc);
        // A stopped control process closes every connection, long-polls included.
        tokio::select! {
            res = conn => if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended");
            },
            _ = crate::stopped(&mut stop) => {}
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/snapshot") => match parse_poll(req.uri().query().unwrap_or("")) {
                Ok(mut poll) => {
                    if let Some(refused) = self.check_agent(req.headers(), &poll.agent, peer).await
                    {
                        return refused;
                    }
                    // A sidecar bound to 0.0.0.0 is reached at the address it polls from.
                    if let Some(admin) = poll.admin.as_mut().filter(|a| a.ip().is_unspecified()) {
                        admin.set_ip(peer.addr.ip());
                    }
                    self.snapshot(poll).await
                }
                Err(reason) => error(StatusCode::BAD_REQUEST, &reason),
            },
            (&Method::POST, "/v1/ack") => {
                let headers = req.headers().clone();
                self.ack(req, &headers, peer).await
            }
            (&Method::POST, "/v1/catalog/confirm") => self.confirm.call(req.headers()).await,
            (&Method::POST, "/v1/certificate") => match &self.identity {
                Some(identity) => identity.certificate(req, peer.agent.as_deref()).await,
                None => error(StatusCode::NOT_FOUND, "mesh identity is off"),
            },
            (&Method::GET, "/status") => match self.confirm.refuse_non_operator(req.headers()) {
                None => json(StatusCode::OK, self.status.render().to_string()),
                Some(refused) => refused,
            },
            (&Method::GET, "/health") => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            (&Method::GET, "/metrics") => {
                let mut rsp = Response::new(Full::new(Bytes::from(self.prometheus.render())));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                rsp
            }
            (
                _,
                "/v1/snapshot"
                | "/v1/ack"
                | "/v1/catalog/confirm"
                | "/v1/certificate"
                | "/status"
                | "/health"
                | "/metrics",
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }

    async fn snapshot(&self, poll: Poll) -> Response<Full<Bytes>> {
        self.sidecars
            .contact(&poll.agent, poll.phase, poll.version, poll.admin, poll.mode);
        let mut rx = self.generations.clone();
        let current = rx.borrow_and_update().clone();
        // Version 0 is "not synced": never served, so a sidecar keeps what it has.
        if current.version != 0 && current.version != poll.version {
            return self.answer(&poll, &current);
        }
        let gauge = ::metrics::gauge!(crate::metrics::SUBSCRIBERS);
        gauge.increment(1.0);
        let wait = poll.wait + jitter(poll.wait);
        let changed = tokio::time::timeout(
            wait,
            rx.wait_for(|g| g.version != 0 && g.version != poll.version),
        )
        .await;
        gauge.decrement(1.0);
        match changed {
            Ok(Ok(gen)) => {
                let gen = gen.clone();
                self.answer(&poll, &gen)
            }
            _ => {
                let mut rsp = Response::new(Full::default());
                *rsp.status_mut() = StatusCode::NOT_MODIFIED;
                rsp.headers_mut()
                    .insert(VERSION_HEADER, HeaderValue::from(poll.version));
                rsp
            }
        }
    }

    fn answer(&self, poll: &Poll, gen: &Generation) -> Response<Full<Bytes>> {
        // The catalog knows an agent's phase; a sidecar not (yet) in it says its own.
        let phase = gen
            .snapshot
            .service(&poll.agent)
            .map(|s| s.phase)
            .or(poll.phase);
        let mut rsp = json(StatusCode::OK, String::new());
        *rsp.body_mut() = Full::new(gen.view(phase));
        rsp.headers_mut()
            .insert(VERSION_HEADER, HeaderValue::from(gen.version));
        rsp
    }

    /// With mesh identity on, a sidecar proves which agent it is (its bootstrap token) before
    /// it gets that agent's snapshot or reports for it; `None` when it may go on.
    async fn check_agent(
        &self,
        headers: &http::HeaderMap,
        agent: &str,
        peer: &Peer,
    ) -> Option<Response<Full<Bytes>>> {
        let identity = self.identity.as_ref()?;
        identity
            .check_agent(headers, agent, peer.agent.as_deref())
            .await
            .err()
    }

    async fn ack(
        &self,
        req: Request<Incoming>,
        headers: &http::HeaderMap,
        peer: &Peer,
    ) -> Response<Full<Bytes>> {
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB"),
        };
        let ack: Ack = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        if let Some(refused) = self.check_agent(headers, &ack.agent, peer).await {
            return refused;
        }
        if let Some(reason) = &ack.rejected {
            tracing::warn!(agent = %ack.agent, version = ack.version, %reason,
                "sidecar rejected a snapshot");
        }
        self.sidecars.ack(&ack);
        let mut rsp = Response::new(Full::default());
        *rsp.status_mut() = StatusCode::NO_CONTENT;
        rsp
    }
}

// === impl Confirmer ===

impl Confirmer {
    /// With `MESH_CONTROL_TOKEN` set, `/status` (which names every sidecar and its admin
    /// address) is for operators only.
    fn refuse_non_operator(&self, headers: &http::HeaderMap) -> Option<Response<Full<Bytes>>> {
        let token = self.token.as_ref()?;
        let offered = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        (!same_secret(offered.as_bytes(), token.as_bytes())).then(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "a valid operator bearer token is required",
            )
        })
    }

    async fn call(&self, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
        let Some(token) = &self.token else {
            return error(
                StatusCode::FORBIDDEN,
                "confirmation is off: start mesh-control with MESH_CONTROL_TOKEN set",
            );
        };
        let offered = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(offered.as_bytes(), token.as_bytes()) {
            tracing::warn!("catalog confirmation refused: wrong or missing token");
            return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        }
        let (tx, rx) = oneshot::channel();
        if self.guard.send(tx).await.is_err() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the control process is stopping",
            );
        }
        match rx.await {
            Ok(Ok(held)) => json(
                StatusCode::OK,
                serde_json::json!({ "published": held }).to_string(),
            ),
            Ok(Err(reason)) => error(StatusCode::CONFLICT, reason),
            Err(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the control process is stopping",
            ),
        }
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess
/// was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Up to 1/16 of the wait, as Consul does, so long-polls that started together do not all
/// come back together.
fn jitter(wait: Duration) -> Duration {
    (wait / 16).mul_f64(fastrand::f64())
}

fn parse_poll(query: &str) -> Result<Poll, String> {
    let mut poll = Poll {
        agent: String::new(),
        phase: None,
        version: 0,
        wait: DEFAULT_WAIT,
        admin: None,
        mode: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "agent" => poll.agent = v.to_owned(),
            "phase" => {
                poll.phase = Some(
                    Phase::ALL
                        .into_iter()
                        .find(|p| p.as_str() == v)
                        .ok_or_else(|| format!("unknown phase {v:?}"))?,
                )
            }
            "version" => {
                poll.version = v
                    .parse()
                    .map_err(|_| format!("version {v:?} is not a number"))?
            }
            "wait" => {
                poll.wait = humantime::parse_duration(v)
                    .map_err(|_| format!("wait {v:?} is not a duration (e.g. 30s)"))?
                    .min(MAX_WAIT)
            }
            "admin" => {
                poll.admin = Some(
                    v.parse()
                        .map_err(|_| format!("admin {v:?} is not ip:port"))?,
                )
            }
            "mode" => {
                poll.mode = Some(match v {
                    "app" => SidecarMode::App,
                    "ollama" => SidecarMode::Ollama,
                    _ => return Err(format!("mode {v:?} is not app or ollama")),
                })
            }
            _ => return Err(format!("unknown parameter {k:?}")),
        }
    }
    let valid = !poll.agent.is_empty()
        && poll.agent.len() <= 63
        && poll
            .agent
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err("agent: a service name is required (lower-case letters, digits, '-')".into());
    }
    Ok(poll)
}

pub(crate) fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

pub(crate) fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": reason }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_parameters_are_checked() {
        let p = parse_poll("agent=a-1&phase=critical&version=7&wait=5s").unwrap();
        assert_eq!((p.agent.as_str(), p.version), ("a-1", 7));
        assert_eq!(p.wait, Duration::from_secs(5));
        assert!(parse_poll("agent=a&phase=urgent").is_err());
        assert!(parse_poll("version=1").is_err());
        assert!(parse_poll("agent=a&bogus=1").is_err());
        assert_eq!(parse_poll("agent=a&wait=1h").unwrap().wait, MAX_WAIT);
        let p = parse_poll("agent=a&admin=0.0.0.0:15090&mode=ollama").unwrap();
        assert_eq!(p.admin, Some("0.0.0.0:15090".parse().unwrap()));
        assert_eq!(p.mode, Some(SidecarMode::Ollama));
        assert!(parse_poll("agent=a&admin=host").is_err());
        assert!(parse_poll("agent=a&mode=proxy").is_err());
    }
}
