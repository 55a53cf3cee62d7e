//! Host hygiene, on both listeners before anything reads the request's authority: a request
//! with more than one `Host` is refused (RFC 9112 3.2, as nginx answers), and when the target
//! URI carries an authority (HTTP/2 `:authority`, or HTTP/1.1 absolute form) a `Host` that
//! disagrees is replaced by it (RFC 9113 8.3.1, RFC 9112 3.2.2), so the next hop and the app
//! see the authority that routed the request.

use crate::errors::ProxyError;
use http::{header, HeaderValue, Request};

/// Checks and reconciles `Host`; an error is the 400 the caller gets.
#[inline]
pub fn check<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::Malformed {
            reason: "more than one Host header",
        });
    }
    let disagrees = match (req.uri().authority(), first) {
        (Some(authority), Some(host)) => authority.as_str().as_bytes() != host.as_bytes(),
        _ => false,
    };
    if disagrees {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default();
        // An authority hyper parsed is a valid header value.
        if let Ok(v) = HeaderValue::from_str(authority) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
