//! What the mesh needs to know of gRPC: which requests are gRPC, the caller's `grpc-timeout`,
//! the answer a gRPC client can read when the mesh itself fails a call (HTTP 200 with
//! `grpc-status` and `grpc-message` in a trailers-only response, as Envoy and linkerd answer),
//! and what such an answer from upstream means to breakers and ejection: its gRPC status read
//! as the HTTP status Envoy maps it to, so a peer sidecar's `UNAVAILABLE` for a dead app counts
//! like its 502 would.

use crate::body::ProxyBody;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use std::time::Duration;

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC status codes the mesh answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

/// A gRPC call: HTTP/2 with `content-type: application/grpc` or `application/grpc+...`.
/// HTTP/1.1 requests are never gRPC, so they cost one version compare.
#[inline]
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.version() == Version::HTTP_2 && has_grpc_content_type(req.headers())
}

pub fn has_grpc_content_type(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// The caller's `grpc-timeout` (1 to 8 digits and a unit: `H M S m u n`), if well formed.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// In an answer's extensions when its head carried a gRPC status: the HTTP status it stands
/// for, which breakers and ejection judge instead of the 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadStatus(pub u16);

/// For the answer to a gRPC call: records a trailers-only status as [`HeadStatus`] and returns
/// the status breakers and ejection judge.
pub fn judge<B>(rsp: &mut Response<B>) -> u16 {
    let status = rsp.status().as_u16();
    if status != 200 {
        return status;
    }
    let Some(mapped) = trailer_status(rsp.headers()) else {
        return status;
    };
    rsp.extensions_mut().insert(HeadStatus(mapped));
    mapped
}

/// The HTTP status a gRPC answer's trailers stand for, when they carry a `grpc-status`: the
/// status of a call that failed after its 200 head (the common way a gRPC server fails).
pub fn trailer_status(trailers: &HeaderMap) -> Option<u16> {
    let code = trailers.get(GRPC_STATUS)?;
    Some(
        std::str::from_utf8(code.as_bytes())
            .ok()
            .and_then(|c| c.parse::<u8>().ok())
            .map_or(500, http_equivalent),
    )
}

/// The status breakers and ejection judge an answer by: its gRPC one when [`judge`] found one.
#[inline]
pub fn judged_status<B>(rsp: &Response<B>) -> u16 {
    match rsp.extensions().get::<HeadStatus>() {
        Some(s) => s.0,
        None => rsp.status().as_u16(),
    }
}

/// gRPC status to HTTP status, as Envoy maps them (`grpcToHttpStatus`).
fn http_equivalent(code: u8) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// A trailers-only gRPC answer: HTTP 200, no message, the status in the head.
pub fn error_response(code: Code, message: &str) -> Response<ProxyBody> {
    let mut rsp = Response::new(ProxyBody::empty());
    *rsp.status_mut() = StatusCode::OK;
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    rsp
}

/// `grpc-message` is percent-encoded UTF-8: bytes outside printable ASCII, and `%`, escaped.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn grpc_content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;x=1",
        ] {
            assert!(
                has_grpc_content_type(&headers(header::CONTENT_TYPE, ct)),
                "{ct}"
            );
        }
        for ct in [
            "application/grpc-web",
            "application/json",
            "application/grp",
        ] {
            assert!(
                !has_grpc_content_type(&headers(header::CONTENT_TYPE, ct)),
                "{ct}"
            );
        }
        let req = http::Request::post("/")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert!(!is_grpc(&req), "HTTP/1.1 is never gRPC");
    }

    #[test]
    fn grpc_timeouts_parse_by_unit() {
        let t = |v| timeout(&headers(GRPC_TIMEOUT, v));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(t("123456789m"), None, "at most 8 digits");
        assert_eq!(t("m"), None);
        assert_eq!(t("10x"), None);
        assert_eq!(t("-1S"), None);
    }

    #[test]
    fn a_grpc_status_in_the_head_is_judged_as_its_http_equivalent() {
        let mut rsp = error_response(Code::Unavailable, "down");
        assert_eq!(judge(&mut rsp), 503);
        assert_eq!(judged_status(&rsp), 503);
        let mut rsp = error_response(Code::DeadlineExceeded, "slow");
        assert_eq!(judge(&mut rsp), 504);
        // A head without a status (the status will come in trailers) stays a 200.
        let mut rsp = Response::new(());
        assert_eq!(judge(&mut rsp), 200);
        assert_eq!(judged_status(&rsp), 200);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("no route to \"b\""), "no route to \"b\"");
        assert_eq!(percent_encode("100% é"), "100%25 %C3%A9");
    }
}
