//! Host hygiene, on both listeners before anything reads the request's authority: a request
//! with more than one `Host` is refused (RFC 9112 3.2, as nginx answers), and when the target
//! URI carries an authority (HTTP/2 `:authority`, or HTTP/1.1 absolute form) a `Host` that
//! disagrees is replaced by it (RFC 9113 8.3.1, RFC 9112 3.2.2), so the next hop and the app
//! see the authority that routed the request. `CONNECT` is answered 501: the mesh opens no
//! tunnels.

use crate::errors::ProxyError;
use http::{header, HeaderValue, Request};

/// What a request names as its target, after the hygiene checks.
#[derive(Debug, PartialEq, Eq)]
pub struct Named<'a> {
    /// The URI authority, else the one `Host` (non-empty), else `None`.
    pub authority: Option<&'a str>,
    /// A `Host` disagrees with the URI authority: [`align`] must replace it.
    pub misaligned: bool,
}

/// Reads the request's authority with one `Host` lookup; more than one `Host` is the 400 the
/// caller gets.
#[inline]
pub fn inspect<B>(req: &Request<B>) -> Result<Named<'_>, ProxyError> {
    if req.method() == http::Method::CONNECT {
        // A tunnel to wherever the caller names: the mesh forwards requests, it opens no
        // tunnels (and an origin-form `CONNECT /` would mean nothing to the app).
        return Err(ProxyError::NotImplemented {
            reason: "CONNECT tunnels are not offered",
        });
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::Malformed {
            reason: "more than one Host header",
        });
    }
    Ok(match req.uri().authority() {
        Some(authority) => Named {
            authority: Some(authority.as_str()),
            misaligned: host.is_some_and(|h| h.as_bytes() != authority.as_str().as_bytes()),
        },
        None => Named {
            authority: host.and_then(|h| h.to_str().ok()).filter(|h| !h.is_empty()),
            misaligned: false,
        },
    })
}

/// Replaces `Host` with the URI authority.
pub fn align<B>(req: &mut Request<B>) {
    let Some(authority) = req.uri().authority() else {
        return;
    };
    // An authority hyper parsed is a valid header value.
    if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// [`inspect`] and [`align`] for a listener that does not route by authority (inbound).
#[inline]
pub fn check<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    if inspect(req)?.misaligned {
        align(req);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_is_not_implemented() {
        let mut req = Request::connect("b:80").body(()).unwrap();
        assert_eq!(check(&mut req).unwrap_err().status(), 501);
    }

    #[test]
    fn two_hosts_are_refused() {
        let mut req = Request::get("/")
            .header("host", "b")
            .header("host", "c")
            .body(())
            .unwrap();
        let err = check(&mut req).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.kind(), "bad_request");
    }

    #[test]
    fn the_authority_wins_over_a_host_that_disagrees() {
        let mut req = Request::get("http://b/x")
            .header("host", "c")
            .body(())
            .unwrap();
        check(&mut req).unwrap();
        assert_eq!(req.headers()["host"], "b");
        let mut req = Request::get("/x").header("host", "c").body(()).unwrap();
        check(&mut req).unwrap();
        assert_eq!(req.headers()["host"], "c");
        assert_eq!(inspect(&req).unwrap().authority, Some("c"));
        let req = Request::get("/x").header("host", "").body(()).unwrap();
        assert_eq!(inspect(&req).unwrap().authority, None);
    }
}
