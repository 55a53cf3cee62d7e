//! Trace context on the wire: W3C Trace Context (`traceparent`, `tracestate`) read strictly
//! and written by the sidecar; B3 single (`b3`) and multi (`X-B3-*`) read on the outbound side
//! and translated to W3C. A header that does not parse is never forwarded as it came: it is
//! removed and the request starts a new trace.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::cell::Cell;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// W3C: a `tracestate` longer than this may be dropped whole.
const MAX_TRACESTATE: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// One span's place in a trace: what the next hop names as its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// What a request brought: its parent's context, if any parsed, and its `tracestate`.
#[derive(Debug, Default)]
pub struct Incoming {
    pub parent: Option<TraceContext>,
    pub state: Option<HeaderValue>,
    /// A `tracestate` came that is not passed on (invalid, or without a valid parent).
    pub stale_state: bool,
}

// === impl TraceContext ===

impl TraceContext {
    /// A child of `self` (same trace and sampling, a new span id).
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            sampled: self.sampled,
        }
    }

    /// The `traceparent` naming this span as the parent: `00-<trace>-<span>-<flags>`.
    pub fn traceparent(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex(&self.span_id, &mut out[36..52]);
        out[52] = b'-';
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        // The value owns the array: one allocation, and clones (the retry layer keeps a copy
        // of the head) share it, where a copied slice is copied again on its first clone.
        HeaderValue::from_maybe_shared(Bytes::from_owner(out)).expect("hex digits and dashes")
    }

    /// `,"trace_id":"<32 hex>","span_id":"<16 hex>"`: the access line's fields, in one piece.
    pub fn log_fields(&self) -> [u8; LOG_FIELDS] {
        let mut out =
            *b",\"trace_id\":\"................................\",\"span_id\":\"................\"";
        hex(&self.trace_id, &mut out[13..45]);
        hex(&self.span_id, &mut out[58..74]);
        out
    }
}

/// Length of [`TraceContext::log_fields`].
pub const LOG_FIELDS: usize = 75;

/// Reads the W3C context of a request; a malformed `traceparent` is removed (and its
/// `tracestate` with it). With `b3`, B3 headers are read when there is no valid `traceparent`,
/// and every B3 header is removed: the next hop gets W3C only.
pub fn extract(headers: &mut HeaderMap, b3: bool) -> Incoming {
    // One pass over the names finds which trace headers are there; most requests carry none,
    // and a pass over a handful of names costs less than the lookups that would miss.
    let seen = headers
        .keys()
        .fold(0u8, |acc, name| acc | trace_header(name));
    if seen == 0 {
        return Incoming::default();
    }
    let mut parent = match seen & SEEN_TRACEPARENT {
        0 => None,
        _ => headers
            .get(TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes())),
    };
    let mut state = None;
    if parent.is_some() && seen & SEEN_TRACESTATE != 0 {
        state = headers
            .get(TRACESTATE)
            .filter(|v| valid_tracestate(v.as_bytes()))
            .cloned();
    }
    if b3 && seen & SEEN_B3 != 0 {
        if parent.is_none() {
            parent = headers
                .get(B3)
                .and_then(|v| parse_b3_single(v.as_bytes()))
                .or_else(|| parse_b3_multi(headers));
        }
        for name in [
            B3,
            B3_TRACE_ID,
            B3_SPAN_ID,
            B3_PARENT_SPAN_ID,
            B3_SAMPLED,
            B3_FLAGS,
        ] {
            headers.remove(name);
        }
    }
    Incoming {
        parent,
        stale_state: state.is_none() && seen & SEEN_TRACESTATE != 0,
        state,
    }
}

const SEEN_TRACEPARENT: u8 = 1;
const SEEN_TRACESTATE: u8 = 1 << 1;
const SEEN_B3: u8 = 1 << 2;

/// Which trace header `name` is, as a bit of the mask [`extract`] builds.
fn trace_header(name: &HeaderName) -> u8 {
    let n = name.as_str();
    match n.len() {
        11 if n == "traceparent" => SEEN_TRACEPARENT,
        10 if n == "tracestate" => SEEN_TRACESTATE,
        2 if n == "b3" => SEEN_B3,
        _ if n.starts_with("x-b3-") => SEEN_B3,
        _ => 0,
    }
}

/// Writes `ctx` as the request's context for the next hop, with the `tracestate` that came in.
pub fn inject(headers: &mut HeaderMap, ctx: &TraceContext, incoming: Incoming) {
    headers.insert(TRACEPARENT, ctx.traceparent());
    match incoming.state {
        Some(s) => {
            headers.insert(TRACESTATE, s);
        }
        None if incoming.stale_state => {
            headers.remove(TRACESTATE);
        }
        None => {}
    }
}

/// `version-traceid-parentid-flags`, lower-case hex. Version `ff` is invalid; a later version
/// than `00` is read by its first four fields (W3C 3.2.4); all-zero ids are invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<TraceContext> {
    if v.len() < 55 {
        return None;
    }
    let version = unhex::<1>(&v[0..2])?[0];
    if version == 0xff
        || (version == 0 && v.len() != 55)
        || (version > 0 && v.len() > 55 && v[55] != b'-')
    {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = unhex::<16>(&v[3..35])?;
    let span_id = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    let mut ctx = valid_ids(trace_id, span_id)?;
    ctx.sampled = flags & 1 == 1;
    Some(ctx)
}

fn valid_ids(trace_id: [u8; 16], span_id: [u8; 8]) -> Option<TraceContext> {
    (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceContext {
        trace_id,
        span_id,
        sampled: false,
    })
}

/// `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, trace id of 16 or 32 hex digits.
/// A sampling-only value (`0`, `1`, `d`) carries no context.
pub fn parse_b3_single(v: &[u8]) -> Option<TraceContext> {
    let mut parts = v.split(|&b| b == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = unhex::<8>(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(b"1") | Some(b"d") => Some(true),
        Some(b"0") => Some(false),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        unhex::<8>(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    let mut ctx = valid_ids(trace_id, span_id)?;
    ctx.sampled = sampled.unwrap_or(false);
    Some(ctx)
}

/// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` (`1`/`true`), `X-B3-Flags: 1` (debug).
fn parse_b3_multi(headers: &HeaderMap) -> Option<TraceContext> {
    let trace_id = b3_trace_id(headers.get(B3_TRACE_ID)?.as_bytes())?;
    let span_id = unhex::<8>(headers.get(B3_SPAN_ID)?.as_bytes())?;
    let mut ctx = valid_ids(trace_id, span_id)?;
    let sampled = headers
        .get(B3_SAMPLED)
        .is_some_and(|v| v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true"));
    let debug = headers.get(B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1");
    ctx.sampled = sampled || debug;
    Some(ctx)
}

/// A 64-bit B3 trace id is the low half of a W3C one (left-padded with zeros).
fn b3_trace_id(v: &[u8]) -> Option<[u8; 16]> {
    match v.len() {
        32 => unhex::<16>(v),
        16 => {
            let low = unhex::<8>(v)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// List members `key=value` separated by commas, at most 32, at most 512 bytes in all; keys
/// and values in the W3C character sets.
fn valid_tracestate(v: &[u8]) -> bool {
    if v.is_empty() || v.len() > MAX_TRACESTATE {
        return false;
    }
    let mut members = 0;
    for member in v.split(|&b| b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        members += 1;
        let Some(eq) = member.iter().position(|&b| b == b'=') else {
            return false;
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/@".contains(&b));
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && value
                .iter()
                .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
        if !key_ok || !value_ok {
            return false;
        }
    }
    members > 0 && members <= MAX_TRACESTATE_MEMBERS
}

thread_local! {
    /// The id generator's state on this thread (0: not seeded yet). Const-initialised, so a
    /// request's ids cost one thread-local access and three wyrand steps, no lock or syscall.
    static IDS: Cell<u64> = const { Cell::new(0) };
}

fn with_ids<R>(f: impl FnOnce(&mut fastrand::Rng) -> R) -> R {
    IDS.with(|state| {
        let mut rng = match state.get() {
            0 => fastrand::Rng::new(),
            seed => fastrand::Rng::with_seed(seed),
        };
        let out = f(&mut rng);
        state.set(rng.get_seed());
        out
    })
}

/// A random trace id and span id for a trace that starts here, neither all zeros.
pub fn new_ids() -> ([u8; 16], [u8; 8]) {
    with_ids(|rng| {
        (
            nonzero_u128(rng).to_be_bytes(),
            nonzero_u64(rng).to_be_bytes(),
        )
    })
}

/// A random trace id that is not all zeros.
pub fn new_trace_id() -> [u8; 16] {
    with_ids(nonzero_u128).to_be_bytes()
}

/// A random span id that is not all zeros.
pub fn new_span_id() -> [u8; 8] {
    with_ids(nonzero_u64).to_be_bytes()
}

fn nonzero_u128(rng: &mut fastrand::Rng) -> u128 {
    loop {
        let id = rng.u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn nonzero_u64(rng: &mut fastrand::Rng) -> u64 {
    loop {
        let id = rng.u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// Each byte's two lower-case hex digits: one lookup per byte, on every traced request.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

fn hex(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[*b as usize]);
    }
}

/// Lower-case hex only, as W3C requires (B3 ids are lower-case hex too).
fn unhex<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(v[2 * i])? << 4 | digit(v[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let ctx = parse_traceparent(TP.as_bytes()).unwrap();
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), TP);
        let out = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!out.unwrap().sampled);
    }

    #[test]
    fn the_access_line_fields_name_both_ids() {
        let ctx = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(
            &ctx.log_fields(),
            b",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"00f067aa0ba902b7\""
        );
    }

    #[test]
    fn ids_are_random_and_never_zero() {
        let (a, b) = (new_ids(), new_ids());
        assert_ne!(a, b);
        assert!(a.0 != [0; 16] && a.1 != [0; 8]);
        assert_ne!(new_span_id(), new_span_id());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // A later version is read by its known fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(parse_traceparent(later.as_bytes()).is_some());
    }

    #[test]
    fn a_malformed_header_is_dropped_never_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-nope"));
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        let got = extract(&mut h, false);
        assert!(got.parent.is_none() && got.state.is_none());
        let ctx = TraceContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            sampled: false,
        };
        inject(&mut h, &ctx, got);
        assert_eq!(h[TRACEPARENT], ctx.traceparent());
        assert!(!h.contains_key(TRACESTATE));
    }

    #[test]
    fn tracestate_is_kept_when_valid() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(
            TRACESTATE,
            HeaderValue::from_static("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"),
        );
        assert!(extract(&mut h, false).state.is_some());
        h.insert(TRACESTATE, HeaderValue::from_static("no equals sign"));
        assert!(extract(&mut h, false).state.is_none());
    }

    #[test]
    fn b3_single_and_multi_translate_to_w3c() {
        let mut h = HeaderMap::new();
        h.insert(
            B3,
            HeaderValue::from_static(
                "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
            ),
        );
        let got = extract(&mut h, true).parent.unwrap();
        assert_eq!(
            got.trace_id,
            unhex::<16>(b"80f198ee56343ba864fe8b2a57d3eff7").unwrap()
        );
        assert!(got.sampled);
        assert!(!h.contains_key(B3));

        let mut h = HeaderMap::new();
        h.insert(B3_TRACE_ID, HeaderValue::from_static("64fe8b2a57d3eff7"));
        h.insert(B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        let got = extract(&mut h, true).parent.unwrap();
        assert_eq!(
            got.trace_id,
            unhex::<16>(b"000000000000000064fe8b2a57d3eff7").unwrap()
        );
        assert!(got.sampled);
        assert!(h.is_empty(), "{h:?}");

        // Sampling-only and malformed values carry no context.
        assert!(parse_b3_single(b"1").is_none());
        assert!(parse_b3_single(b"80f198ee56343ba8-e457b5a2e4d86bd1-x").is_none());
    }
}
