//! The last step: pick an endpoint, rewrite the request for it and send it on a pooled
//! connection. HTTP/1.1 upgrades (WebSocket) are tunnelled byte for byte.

use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::outbound::balance::InFlight;
use crate::outbound::pool::Pools;
use crate::state::Route;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_config::Protocol;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Sends routed requests upstream. Expects a [`Route`] in the request extensions.
#[derive(Clone, Debug)]
pub struct Forward {
    pools: Arc<Pools>,
}

impl Forward {
    pub fn new(pools: Arc<Pools>) -> Self {
        Self { pools }
    }
}

impl tower::Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let Some(route) = req.extensions_mut().remove::<Route>() else {
            return Box::pin(async { Err(ProxyError::NoAuthority) });
        };
        let backend = route.backend;
        let Some(endpoint) = backend.endpoints.pick().cloned() else {
            return Box::pin(async move {
                Err(ProxyError::NoEndpoints {
                    target: backend.name.to_string(),
                })
            });
        };

        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        // An upgrade needs an HTTP/1.1 connection whatever the backend prefers.
        let protocol = if upgrade.is_some() {
            Protocol::Http1
        } else {
            backend.protocol
        };
        if let Err(e) = rewrite(&mut req, &endpoint.authority, protocol, upgrade.is_some()) {
            return Box::pin(async move { Err(e) });
        }
        let inflight = InFlight::start(endpoint);
        let sent = self.pools.client(protocol).request(req);
        Box::pin(async move {
            let mut rsp = match sent.await {
                Ok(rsp) => {
                    inflight.responded();
                    rsp
                }
                Err(e) => {
                    inflight.failed();
                    let target = backend.name.to_string();
                    let reason = error_chain(&e);
                    return Err(if e.is_connect() {
                        ProxyError::Unavailable { target, reason }
                    } else {
                        ProxyError::UpstreamFailed { target, reason }
                    });
                }
            };
            match upgrade {
                Some(downstream) if rsp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    let upstream = hyper::upgrade::on(&mut rsp);
                    tokio::spawn(tunnel(downstream, upstream));
                }
                _ => strip_hop_by_hop(rsp.headers_mut(), false),
            }
            Ok(rsp.map(ProxyBody::upstream))
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

/// Points the request at the endpoint, keeping the caller's authority as `Host`.
fn rewrite(
    req: &mut Request<Incoming>,
    endpoint: &http::uri::Authority,
    protocol: Protocol,
    upgrade: bool,
) -> Result<(), ProxyError> {
    if !req.headers().contains_key(header::HOST) {
        if let Some(authority) = req.uri().authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
    }
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint.clone());
    parts.path_and_query = Some(path);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::NoAuthority)?;
    *req.version_mut() = match protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::Http2 => Version::HTTP_2,
    };
    Ok(())
}

/// Removes headers that describe one connection, not the message (RFC 9110 7.6.1).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        if conn.as_bytes() != b"keep-alive" && conn.as_bytes() != b"close" && !upgrade {
            let named: Vec<HeaderName> = conn
                .to_str()
                .unwrap_or("")
                .split(',')
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(te) = headers.get(header::TE) {
        // Only `TE: trailers` may cross a hop; gRPC depends on it.
        if !contains_token(te, "trailers") {
            headers.remove(header::TE);
        } else if te.as_bytes() != b"trailers" {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

fn contains_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
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
