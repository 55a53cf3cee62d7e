//! Refusals are not failures. When the mesh sheds load itself (the inbound concurrency queue,
//! the Ollama gateway's queue, a rate limit, a drain), the answering sidecar marks its answer
//! with `x-mesh-refused: <reason>`. The caller's sidecar takes the marker off before the agent
//! sees it and counts the answer as neither a success nor a failure of the endpoint or the
//! target: a busy, healthy upstream must not be ejected or have its breaker opened. An app
//! cannot forge the marker: the inbound side takes it off the app's answers the same way.

use http::{header, HeaderName, HeaderValue, Response, StatusCode, Version};
use std::time::Duration;

pub const REFUSED_HEADER: HeaderName = HeaderName::from_static("x-mesh-refused");

/// In a response's extensions once its marker was taken off: the reason the mesh gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused(pub HeaderValue);

/// Marks an answer this sidecar made to shed load.
pub fn mark<B>(rsp: &mut Response<B>, reason: &'static str) {
    rsp.headers_mut()
        .insert(REFUSED_HEADER, HeaderValue::from_static(reason));
}

/// Takes the marker off an upstream's answer and records it as [`Refused`]; true when the
/// answer was a refusal. Only the statuses a refusal has are looked at: 429, 503, and for a
/// gRPC call (`grpc`) a 200 over HTTP/2, so most answers cost a compare.
#[inline]
pub fn take<B>(rsp: &mut Response<B>, grpc: bool) -> bool {
    let status = rsp.status();
    let candidate = status == StatusCode::SERVICE_UNAVAILABLE
        || status == StatusCode::TOO_MANY_REQUESTS
        || (grpc && status == StatusCode::OK && rsp.version() == Version::HTTP_2);
    if !candidate {
        return false;
    }
    match rsp.headers_mut().remove(REFUSED_HEADER) {
        Some(reason) => {
            rsp.extensions_mut().insert(Refused(reason));
            true
        }
        None => false,
    }
}

/// Whether an answer was marked as a refusal (after [`take`]).
#[inline]
pub fn is_refused<B>(rsp: &Response<B>) -> bool {
    rsp.extensions().get::<Refused>().is_some()
}

/// How long a refused answer asks the caller to wait (`Retry-After`, in seconds): a retry of
/// a refusal waits this long instead of its backoff, or not at all when the deadline is nearer.
pub fn retry_after<B>(rsp: &Response<B>) -> Option<Duration> {
    if !is_refused(rsp) {
        return None;
    }
    let secs = rsp.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    secs.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, version: Version) -> Response<()> {
        let mut rsp = Response::new(());
        *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
        *rsp.version_mut() = version;
        mark(&mut rsp, "queue_full");
        rsp
    }

    #[test]
    fn a_marked_refusal_is_taken_off_and_remembered() {
        for (status, version) in [
            (503, Version::HTTP_11),
            (429, Version::HTTP_2),
            (200, Version::HTTP_2),
        ] {
            let mut rsp = answer(status, version);
            assert!(take(&mut rsp, true), "{status}");
            assert!(!rsp.headers().contains_key(REFUSED_HEADER));
            assert_eq!(rsp.extensions().get::<Refused>().unwrap().0, "queue_full");
            assert!(is_refused(&rsp));
            assert_eq!(retry_after(&rsp), None, "no Retry-After given");
            rsp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
            assert_eq!(retry_after(&rsp), Some(Duration::from_secs(3)));
        }
    }

    #[test]
    fn other_answers_are_not_refusals() {
        // A 500 can be no refusal: the marker on it is left for nobody to trust.
        let mut rsp = answer(500, Version::HTTP_11);
        assert!(!take(&mut rsp, false));
        assert!(!is_refused(&rsp));
        // A 200 is a refusal only as the answer to a gRPC call.
        let mut rsp = answer(200, Version::HTTP_2);
        assert!(!take(&mut rsp, false));
        let mut rsp = Response::new(());
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        assert!(!take(&mut rsp, true));
    }
}
