//! The last step: pick an endpoint, rewrite the request for it and send it on a pooled
//! connection. HTTP/1.1 upgrades (WebSocket) are tunnelled byte for byte. The attempt's outcome
//! feeds the endpoint's breaker and outlier ejection.

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::outbound::balance::{InFlight, Picked};
use crate::outbound::breaker::{classify, machine::Class};
use crate::outbound::deadline::Deadline;
use crate::outbound::pool::Pools;
use crate::outbound::replay::{BodyError, RequestBody};
use crate::outbound::retry::{Tried, TryDeadline};
use crate::outbound::settle::Settle;
use crate::outbound::tee::TeeError;
use crate::state::{Backend, Route};
use crate::upload::UploadLimits;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use mesh_config::Protocol;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Sends routed requests upstream. Expects a [`Route`] in the request extensions.
#[derive(Clone, Debug)]
pub struct Forward {
    pools: Arc<Pools>,
    upload: Option<UploadLimits>,
}

impl Forward {
    pub fn new(pools: Arc<Pools>) -> Self {
        Self {
            pools,
            upload: None,
        }
    }

    /// Times callers' request bodies of declared length (`upload.rs`).
    pub fn upload_limits(mut self, limits: UploadLimits) -> Self {
        self.upload = Some(limits);
        self
    }
}

/// An attempt on one endpoint whose outcome has not been recorded. Dropped unanswered (a
/// timeout above cancelled it), it counts as a failure once its deadline has passed.
struct Attempt {
    backend: Arc<Backend>,
    picked: Picked,
    deadline: Option<Instant>,
    done: bool,
}

impl Attempt {
    /// Hands the outcome over to the response body, unless it is already known.
    fn settle_at_end(&mut self) -> Option<Settle> {
        if self.done {
            return None;
        }
        self.done = true;
        Some(Settle::Endpoint(self.backend.clone(), self.picked.clone()))
    }

    fn refused(&mut self) {
        self.done = true;
        self.backend
            .endpoints
            .refused(&self.picked, &self.backend.name);
    }

    fn finish(&mut self, class: Class) {
        self.done = true;
        self.backend
            .endpoints
            .record(&self.picked, class, &self.backend.name);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            let timed_out = self.deadline.is_some_and(|d| d <= Instant::now());
            self.finish(if timed_out {
                Class::Failure
            } else {
                Class::Cancelled
            });
        }
    }
}

impl<B> tower::Service<Request<B>> for Forward
where
    B: Into<RequestBody>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut req: Request<RequestBody> = req.map(Into::into);
        if let Some(limits) = self.upload {
            req.body_mut().time_upload(limits);
        }
        let Some(route) = req.extensions_mut().remove::<Route>() else {
            return Box::pin(async { Err(ProxyError::NoAuthority) });
        };
        let backend = route.backend;
        let tried = req.extensions_mut().remove::<Tried>();
        let avoid = tried.as_ref().and_then(Tried::last);
        let Some(picked) = backend.endpoints.pick_usable(avoid) else {
            let target = backend.name.to_string();
            return Box::pin(async move {
                Err(if backend.endpoints.is_empty() {
                    ProxyError::NoEndpoints { target }
                } else {
                    // Every endpoint is ejected or behind an open breaker.
                    ProxyError::BreakerOpen {
                        target,
                        retry_after: std::time::Duration::from_secs(1),
                    }
                })
            });
        };
        if let Some(t) = &tried {
            t.0.store(picked.index, Relaxed);
        }
        let per_try = req.extensions_mut().remove::<TryDeadline>().map(|d| d.0);
        let overall = req.extensions_mut().remove::<Deadline>();
        let deadline = per_try.into_iter().chain(overall.map(|d| d.at)).min();
        let endpoint = picked.endpoint.clone();
        let (protocol, upgrade) = match prepare(
            &mut req,
            overall.as_ref(),
            &endpoint.authority,
            backend.protocol,
        ) {
            Ok(ready) => ready,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let grpc = crate::grpc::is_grpc(&req);
        let inflight = InFlight::start(endpoint.clone());
        let pools = (*self.pools).clone();
        let sent = async move {
            match protocol {
                Protocol::Http1 => pools.send_http1(endpoint, req).await,
                Protocol::Http2 => Ok((pools.send_http2(endpoint, req).await?, None)),
            }
        };
        let failures = backend.resilience.failures;
        let mut attempt = Attempt {
            backend,
            picked,
            deadline,
            done: false,
        };
        Box::pin(async move {
            let (mut rsp, conn) = match sent.await {
                Ok((mut rsp, conn)) => {
                    inflight.responded();
                    if crate::refusal::take(&mut rsp, grpc) {
                        // The mesh shed load: nothing learned about the endpoint.
                        attempt.finish(Class::Cancelled);
                    } else if failures.contains(match grpc {
                        true => crate::grpc::judge(&mut rsp),
                        false => rsp.status().as_u16(),
                    }) {
                        attempt.finish(Class::Failure);
                    }
                    (rsp, conn)
                }
                Err(e) => {
                    inflight.failed();
                    let backend = &attempt.backend;
                    let target = backend.name.to_string();
                    let reason = error_chain(&e);
                    if let Some(slow) = too_slow(&e) {
                        // The caller's upload did not keep its minimum pace: a 408, nothing
                        // held against the endpoint.
                        attempt.finish(Class::Cancelled);
                        let reason = slow.to_string();
                        return Err(ProxyError::BodyTimeout { target, reason });
                    }
                    if caller_body_failed(&e) {
                        // The caller's own body broke (bad framing, the caller left): nothing
                        // to hold against the endpoint, and a 400 for the caller.
                        attempt.finish(Class::Cancelled);
                        return Err(ProxyError::RequestBody { target, reason });
                    }
                    if e.is_connect() {
                        // Nothing listens there (or nothing answers the handshake): the
                        // endpoint is out at once rather than after a run of failures.
                        attempt.refused();
                        return Err(ProxyError::Unavailable { target, reason });
                    }
                    // Either way the request never left: a retry is safe for any method.
                    let err = if never_sent(&e) {
                        ProxyError::Unavailable { target, reason }
                    } else {
                        ProxyError::UpstreamFailed { target, reason }
                    };
                    let res = Err(err);
                    attempt.finish(classify(&res, &failures));
                    return res;
                }
            };
            match upgrade {
                Some(downstream) if rsp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    if !attempt.done {
                        attempt.finish(Class::Success);
                    }
                    let upstream = hyper::upgrade::on(&mut rsp);
                    tokio::spawn(tunnel(downstream, upstream));
                    if let Some(conn) = conn {
                        conn.upgraded();
                    }
                    Ok(rsp.map(ProxyBody::upstream))
                }
                _ => {
                    strip_hop_by_hop(rsp.headers_mut(), false);
                    let mut rsp = rsp.map(ProxyBody::upstream);
                    rsp.body_mut().idle_timeout(attempt.backend.stream_idle);
                    if let Some(outcome) = attempt.settle_at_end() {
                        rsp.body_mut().settle_at_end(outcome);
                    }
                    if let Some(conn) = conn {
                        rsp.body_mut().return_conn(conn);
                    }
                    Ok(rsp)
                }
            }
        })
    }
}

async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "tunnel closed"),
        Err(e) => tracing::debug!(error = %e, "tunnel reset"),
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| contains_token(v, "upgrade"))
}

/// Everything done to a routed request's head before it leaves: the budget left written for
/// the next hop (over whatever the caller sent), upgrades the mesh does not carry stripped,
/// then hop-by-hop headers removed and the target rewritten for `endpoint`. Returns the
/// protocol to send with (an upgrade needs HTTP/1.1 whatever the backend prefers) and the
/// caller's side of an upgrade.
pub(crate) fn prepare<B>(
    req: &mut Request<B>,
    deadline: Option<&Deadline>,
    endpoint: &http::uri::Authority,
    preferred: Protocol,
) -> Result<(Protocol, Option<hyper::upgrade::OnUpgrade>), ProxyError> {
    if let Some(d) = deadline {
        d.propagate(req.headers_mut());
    }
    crate::outbound::upgrade::strip_unknown(req);
    let upgrade = is_upgrade(req).then(|| hyper::upgrade::on(&mut *req));
    let protocol = if upgrade.is_some() {
        Protocol::Http1
    } else {
        preferred
    };
    rewrite(req, endpoint, protocol, upgrade.is_some())?;
    Ok((protocol, upgrade))
}

/// Readies the request for the endpoint's connection (the connection, not the URI, says where
/// it goes). The caller's authority stays the request's authority: HTTP/1.1 gets origin-form
/// (`GET /path`) with the caller's `Host`, since a server must prefer an absolute-form target's
/// authority over `Host` (RFC 9112 3.2.2); HTTP/2 gets it as `:authority` and no `Host`, which
/// a server may refuse when the two differ (RFC 9113 8.3.1).
fn rewrite<B>(
    req: &mut Request<B>,
    endpoint: &http::uri::Authority,
    protocol: Protocol,
    upgrade: bool,
) -> Result<(), ProxyError> {
    let authority = match req.headers().get(header::HOST) {
        Some(host) => http::uri::Authority::try_from(host.as_bytes()).ok(),
        None => req.uri().authority().cloned(),
    };
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    match protocol {
        Protocol::Http1 => {
            if !req.headers().contains_key(header::HOST) {
                // HTTP/1.1 requires a Host: an HTTP/1.0 caller's request without one gets the
                // endpoint's.
                let authority = authority.as_ref().unwrap_or(endpoint);
                if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                    req.headers_mut().insert(header::HOST, host);
                }
            }
            *req.version_mut() = Version::HTTP_11;
        }
        Protocol::Http2 => {
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(match authority {
                Some(authority) => {
                    req.headers_mut().remove(header::HOST);
                    authority
                }
                // A `Host` that is no valid authority goes as it came, beside the endpoint's.
                None => endpoint.clone(),
            });
            *req.version_mut() = Version::HTTP_2;
        }
    }
    parts.path_and_query = Some(path);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::NoAuthority)?;
    Ok(())
}

/// Removes headers that describe one connection, not the message (RFC 9110 7.6.1).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none or only `Connection: keep-alive`: one pass over the names finds
    // which are present, and only those pay for a hashed remove.
    let present = headers.keys().fold(0u8, |acc, name| acc | hop_by_hop(name));
    if present == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 && !upgrade {
        // Every `Connection` line counts, not only the first.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter(|conn| conn.as_bytes() != b"keep-alive" && conn.as_bytes() != b"close")
            .flat_map(|conn| conn.to_str().unwrap_or("").split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        // The mesh's own headers (`x-mesh-caller`, `x-mesh-timeout-ms`) are set by the
        // sidecar before this strip: a caller cannot name them away.
        for name in named.iter().filter(|n| !n.as_str().starts_with("x-mesh-")) {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if !upgrade && present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
    if present & HOP_KEEP_ALIVE != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if present & HOP_PROXY_CONNECTION != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if present & HOP_PROXY_AUTHORIZATION != 0 {
        headers.remove(header::PROXY_AUTHORIZATION);
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & HOP_TE != 0 {
        // Only `TE: trailers` may cross a hop (gRPC depends on it), once, whatever other
        // codings and lines came with it.
        let tes = headers.get_all(header::TE);
        if !tes.iter().any(|te| contains_token(te, "trailers")) {
            headers.remove(header::TE);
        } else if tes.iter().ne([HeaderValue::from_static("trailers")].iter()) {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

const HOP_CONNECTION: u8 = 1;
const HOP_UPGRADE: u8 = 1 << 1;
const HOP_KEEP_ALIVE: u8 = 1 << 2;
const HOP_PROXY_CONNECTION: u8 = 1 << 3;
const HOP_PROXY_AUTHORIZATION: u8 = 1 << 4;
const HOP_TRANSFER_ENCODING: u8 = 1 << 5;
const HOP_TE: u8 = 1 << 6;

/// Which hop-by-hop header `name` is, as a bit of the mask `strip_hop_by_hop` builds.
fn hop_by_hop(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        HOP_CONNECTION
    } else if name == header::UPGRADE {
        HOP_UPGRADE
    } else if name == header::TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if name == header::TE {
        HOP_TE
    } else if name == header::PROXY_AUTHORIZATION {
        HOP_PROXY_AUTHORIZATION
    } else if name == KEEP_ALIVE {
        HOP_KEEP_ALIVE
    } else if name == PROXY_CONNECTION {
        HOP_PROXY_CONNECTION
    } else {
        0
    }
}

fn contains_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// Whether the request is known not to have been acted on: hyper cancelled it before writing
/// any of it (the connection it was queued on closed), or an HTTP/2 peer turned its stream away
/// unprocessed (RFC 9113 8.7). The pool resends a request cancelled on a reused connection
/// itself; this catches the rest.
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(err) = src {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if err.downcast_ref::<h2::Error>().is_some_and(unprocessed) {
            return true;
        }
        src = err.source();
    }
    false
}

/// The request body the caller sent failed while it was being sent upstream.
fn caller_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(err) = src {
        if matches!(
            err.downcast_ref::<BodyError>(),
            Some(TeeError::Source(_) | TeeError::TooSlow(_))
        ) {
            return true;
        }
        // Over HTTP/2 hyper does not pass the body's error on: it resets the stream itself
        // with INTERNAL_ERROR, which is the only reset it sends while a request is in flight.
        if err.downcast_ref::<h2::Error>().is_some_and(|h| {
            !h.is_remote() && h.is_reset() && h.reason() == Some(h2::Reason::INTERNAL_ERROR)
        }) {
            return true;
        }
        src = err.source();
    }
    false
}

/// The caller's body was cut for its pace (see `upload.rs`).
fn too_slow<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a crate::upload::TooSlow> {
    let mut src = Some(e);
    while let Some(err) = src {
        if let Some(TeeError::TooSlow(slow)) = err.downcast_ref::<BodyError>() {
            return Some(slow);
        }
        src = err.source();
    }
    None
}

/// `REFUSED_STREAM` from the peer, or the peer's GOAWAY naming a last stream below this one:
/// h2 reports the streams above the last id with the GOAWAY itself, while a stream at or below
/// it that the connection's end cuts short fails with an I/O error instead.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && ((e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)) || e.is_go_away())
}

pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-hop, keep-alive"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(h.contains_key("x-end"));
        assert_eq!(h[header::TE], "trailers");
    }

    /// Found by the property test in `front_door_props.rs`: only the first line was read.
    #[test]
    fn every_connection_and_te_line_counts() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-hop"), "{h:?}");
        assert_eq!(
            h.get_all(header::TE).iter().collect::<Vec<_>>(),
            ["trailers"]
        );
    }

    #[test]
    fn each_hop_by_hop_header_present_is_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("close"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[header::CONTENT_TYPE], "text/plain");
    }

    #[tokio::test]
    async fn a_request_cancelled_on_a_closed_connection_was_never_sent() {
        let (io, _peer) = tokio::io::duplex(64);
        let (mut tx, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(TokioIo::new(io))
        .await
        .unwrap();
        // The connection is gone before the request is queued on it.
        drop(conn);
        let err = tx
            .send_request(Request::new(http_body_util::Empty::new()))
            .await
            .unwrap_err();
        assert!(never_sent(&err), "{err}");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!never_sent(&reset));
    }

    #[test]
    fn upgrade_keeps_connection_and_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "Upgrade");
    }
}
