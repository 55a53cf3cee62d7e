//! One request's life at the gateway: read the caller and its limits, buffer and check the
//! body, wait for a slot, send to Ollama, and hold the slot until the response body ends (or
//! the caller goes away, which also drops the request to Ollama).

use super::dispatch::{Admission, Cmd, Handle, Outcome, Reason, Refusal, Slot};
use super::limits::{self, Api};
use super::{Caller, Policy};
use crate::body::{broken_by_upstream, ProxyBody};
use crate::bootstrap::Bootstrap;
use crate::errors::ProxyError;
use crate::outbound::forward::{error_chain, strip_hop_by_hop};
use crate::outbound::CALLER_HEADER;
use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Rule 22: at most 10 connections to Ollama.
const MAX_IDLE_CONNECTIONS: usize = 10;

/// The gateway service. Cloning is cheap; clones share the queue.
#[derive(Clone, Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    policy: Arc<ArcSwap<Policy>>,
    dispatch: Arc<Handle>,
    client: Client<HttpConnector, Full<Bytes>>,
    ollama: Authority,
    /// The name errors and logs give Ollama.
    target: Arc<str>,
}

/// Takes a request out of the queue if its caller goes away while it waits.
struct Queued<'a> {
    dispatch: &'a Handle,
    id: u64,
    armed: bool,
}

// === impl Gateway ===

impl Gateway {
    pub fn new(boot: &Bootstrap, policy: Arc<ArcSwap<Policy>>, dispatch: Arc<Handle>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(boot.upstream.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(boot.upstream.pool_idle_timeout)
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let ollama = Authority::try_from(boot.inbound.app.to_string())
            .expect("a socket address is an authority");
        Self {
            shared: Arc::new(Shared {
                policy,
                dispatch,
                client,
                ollama,
                target: boot.agent.as_str().into(),
            }),
        }
    }
}

impl tower::Service<Request<Incoming>> for Gateway {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.shared.clone().serve(req))
    }
}

// === impl Shared ===

impl Shared {
    async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let policy = self.policy.load_full();
        let api = Api::of(req.uri().path());
        let spans = crate::trace::ollama::GatewaySpans::of(req.extensions());
        let caller = policy.caller(
            req.headers()
                .get(CALLER_HEADER)
                .and_then(|v| v.to_str().ok()),
        );
        let (parts, body) = req.into_parts();
        // Buffered before queueing: a slow upload never holds a slot, and limits are checked
        // before the caller waits.
        let body = self.read_body(body, policy.params.max_body_bytes).await?;
        let body = limits::apply(api, &caller.name, &caller.limits, body).map_err(|reason| {
            ProxyError::BadRequest {
                target: self.target.to_string(),
                reason,
            }
        })?;
        let timeout = caller.limits.timeout.unwrap_or(policy.params.timeout);
        let idle = policy.params.stream_idle_timeout;
        if api == Api::Bypass {
            return self.forward(parts, body, timeout, idle).await;
        }

        let queued_at = std::time::SystemTime::now();
        let admitted = self.admit(&caller, policy.params.queue_timeout).await;
        if let Some(spans) = &spans {
            let entry = admitted.as_ref().map(|slot| slot.entry());
            spans.queued(queued_at, &caller.name, caller.phase.as_str(), entry);
        }
        let mut slot = admitted?;
        let mut generation = spans
            .as_ref()
            .map(|s| s.generation(parts.uri.path(), &body, self.ollama.as_str()));
        match self.forward(parts, body, timeout, idle).await {
            Ok(mut rsp) => {
                slot.set_outcome(Outcome::Succeeded);
                if let Some(g) = generation.as_mut() {
                    g.answered(rsp.status().as_u16());
                    g.watch(rsp.body_mut());
                }
                rsp.body_mut().on_end(move |error| {
                    let mut slot = slot;
                    match error {
                        None => {}
                        Some(kind) if broken_by_upstream(kind) => slot.set_outcome(Outcome::Failed),
                        Some(_) => slot.set_outcome(Outcome::Cancelled),
                    }
                    if let Some(g) = generation {
                        g.end(error.map(str::to_owned));
                    }
                });
                Ok(rsp)
            }
            Err(e) => {
                if let Some(g) = generation {
                    g.end(Some(e.kind().to_owned()));
                }
                let outcome = match e {
                    ProxyError::Unavailable { .. } | ProxyError::UpstreamFailed { .. } => {
                        Outcome::Failed
                    }
                    _ => Outcome::Cancelled,
                };
                slot.set_outcome(outcome);
                Err(e)
            }
        }
    }

    async fn read_body(&self, body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::TooLarge {
                target: self.target.to_string(),
                limit,
            }),
            Err(e) => Err(ProxyError::BadRequest {
                target: self.target.to_string(),
                reason: format!("request body did not arrive: {e}"),
            }),
        }
    }

    /// Waits for a slot. Leaving (the caller disconnects and this future is dropped) takes the
    /// request out of the queue at once.
    async fn admit(&self, caller: &Caller, queue_timeout: Duration) -> Result<Slot, ProxyError> {
        let started = Instant::now();
        let id = self.dispatch.next_id();
        let (reply, mut admission) = oneshot::channel();
        let sent = self.dispatch.send(Cmd::Enqueue {
            id,
            phase: caller.phase,
            caller: caller.name.clone(),
            reply,
        });
        if !sent {
            return Err(self.refused(caller, started, None));
        }
        let mut queued = Queued {
            dispatch: &self.dispatch,
            id,
            armed: true,
        };
        let admission = match tokio::time::timeout(queue_timeout, &mut admission).await {
            Ok(answer) => answer.ok(),
            Err(_) => {
                let (tx, rx) = oneshot::channel();
                self.dispatch.send(Cmd::Leave {
                    id,
                    reply: Some(tx),
                });
                match rx.await {
                    Ok(Some(refusal)) => {
                        queued.armed = false;
                        return Err(self.refused(caller, started, Some(refusal)));
                    }
                    // Admitted while the timeout fired: take the slot.
                    _ => admission.await.ok(),
                }
            }
        };
        queued.armed = false;
        match admission {
            Some(Admission::Granted(slot)) => Ok(slot),
            Some(Admission::Refused(refusal)) => Err(self.refused(caller, started, Some(refusal))),
            None => Err(self.refused(caller, started, None)),
        }
    }

    /// The caller's answer for a refusal; `None` means the dispatcher is gone (shutting down).
    fn refused(&self, caller: &Caller, started: Instant, refusal: Option<Refusal>) -> ProxyError {
        let refusal = refusal.unwrap_or(Refusal {
            reason: Reason::Unavailable,
            position: 0,
            retry_after: Duration::from_secs(1),
        });
        ProxyError::Queue {
            target: self.target.to_string(),
            reason: refusal.reason.as_str(),
            over_quota: refusal.reason == Reason::OverQuota,
            phase: caller.phase,
            position: refusal.position,
            waited: started.elapsed(),
            retry_after: refusal.retry_after,
        }
    }

    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Bytes,
        timeout: Duration,
        idle: Duration,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        strip_hop_by_hop(&mut parts.headers, false);
        parts.headers.remove(CALLER_HEADER);
        if !body.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.ollama.clone());
        uri.path_and_query = Some(path);
        parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::NoAuthority)?;
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, Full::new(body));

        let target = || self.target.to_string();
        let mut rsp = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(rsp)) => rsp,
            Ok(Err(e)) if e.is_connect() => {
                return Err(ProxyError::Unavailable {
                    target: target(),
                    reason: error_chain(&e),
                })
            }
            Ok(Err(e)) => {
                return Err(ProxyError::UpstreamFailed {
                    target: target(),
                    reason: error_chain(&e),
                })
            }
            Err(_) => {
                return Err(ProxyError::Timeout {
                    target: target(),
                    timeout,
                })
            }
        };
        strip_hop_by_hop(rsp.headers_mut(), false);
        let mut rsp = rsp.map(ProxyBody::upstream);
        rsp.body_mut().idle_timeout(idle);
        Ok(rsp)
    }
}

// === impl Queued ===

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.dispatch.send(Cmd::Leave {
                id: self.id,
                reply: None,
            });
        }
    }
}
