//! Bounded property tests of the code a request meets around hyper's parser: protocol
//! detection on a new connection (before the parser), routing by `Host`/authority and the
//! rewrite of the head for the next hop (after it). Deterministic: a fixed seed, a fixed case
//! count, no persisted failures, so a run is the same on every machine and takes a bounded
//! time. Stands in for a fuzz target where no nightly toolchain is available.

use crate::host;
use crate::outbound::deadline::{Deadline, TIMEOUT_HEADER};
use crate::outbound::forward::prepare;
use crate::outbound::route::lowercase;
use crate::outbound::CALLER_HEADER;
use crate::serve::detect::{classify, detect, Detected};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};
use mesh_config::snapshot::normalize_authority;
use mesh_config::Protocol;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};
use std::time::Duration;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x6d65_7368_2d31_3362),
        // Shrinking is bounded too: a failure is reported within seconds.
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

// === detection ===

/// A TLS record holding a ClientHello: content type, legacy version, length, then a handshake
/// of type 1 with a random body.
fn client_hello() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(0x01u8), Just(0x03u8)],
        prop::collection::vec(any::<u8>(), 40..300),
    )
        .prop_map(|(minor, body)| {
            let len = body.len() + 4;
            let mut out = vec![0x16, 0x03, minor, (len >> 8) as u8, len as u8, 0x01];
            out.extend_from_slice(&[0, (body.len() >> 8) as u8, body.len() as u8]);
            out.extend_from_slice(&body);
            out
        })
}

/// The HTTP/2 connection preface and the start of a SETTINGS frame.
fn h2_preface() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(|settings| {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend_from_slice(&[0, 0, settings.len() as u8, 0x04, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&settings);
        out
    })
}

/// An HTTP/1 request line and head: a method token (standard or an extension in capitals),
/// after the empty lines a client may send first (RFC 9112 2.2).
fn http1_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just("\r\n"), Just("\n"), Just("")],
        0usize..3,
        prop_oneof![
            Just("GET".to_owned()),
            Just("POST".to_owned()),
            Just("OPTIONS".to_owned()),
            Just("PRI".to_owned()),
            "[A-Z][A-Z_-]{0,10}",
        ],
        "/[!-~]{0,40}",
        prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
    )
        .prop_map(|(empty, n, method, target, version)| {
            format!(
                "{}{method} {target} {version}\r\nHost: b\r\n\r\n",
                empty.repeat(n)
            )
            .into_bytes()
        })
}

/// Writes `bytes` on a fresh loopback connection, closes its write side and detects.
async fn detect_sent(bytes: &[u8]) -> Detected {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    detect(&server, Duration::from_secs(5)).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(config(512))]

    /// Every prefix of each kind of opening is classified as the whole opening is.
    #[test]
    fn every_prefix_of_an_opening_is_classified_as_the_whole(
        hello in client_hello(),
        preface in h2_preface(),
        request in http1_request(),
    ) {
        for (bytes, want) in [
            (&hello, Detected::Tls),
            (&preface, Detected::Http),
            (&request, Detected::Http),
        ] {
            for end in 1..=bytes.len() {
                prop_assert_eq!(classify(bytes[..end][0]), want,
                    "prefix {:?}", String::from_utf8_lossy(&bytes[..end]));
            }
        }
    }

    /// Anything else is classified without panicking: HTTP only when it starts like a request
    /// line, TLS only when it starts like a handshake record.
    #[test]
    fn any_first_byte_is_classified(first in any::<u8>()) {
        match classify(first) {
            Detected::Http => prop_assert!(first.is_ascii_uppercase() || first == b'\r' || first == b'\n'),
            Detected::Tls => prop_assert_eq!(first, 0x16),
            Detected::Unknown(b) => prop_assert_eq!(b, first),
            Detected::Nothing => prop_assert!(false, "a byte is never nothing"),
        }
    }
}

proptest! {
    // Each case opens a loopback connection.
    #![proptest_config(config(64))]

    /// On a real socket, a prefix of any length (none: the peer closed) is detected as the
    /// whole opening, and the bytes stay unread for the parser.
    #[test]
    fn detection_on_a_socket_agrees_with_the_whole_opening(
        hello in client_hello(),
        preface in h2_preface(),
        request in http1_request(),
        cut in any::<prop::sample::Index>(),
    ) {
        let rt = runtime();
        for (bytes, want) in [
            (&hello, Detected::Tls),
            (&preface, Detected::Http),
            (&request, Detected::Http),
        ] {
            let end = cut.index(bytes.len() + 1);
            let got = rt.block_on(detect_sent(&bytes[..end]));
            let want = if end == 0 { Detected::Nothing } else { want };
            prop_assert_eq!(got, want);
        }
    }
}

// === routing ===

/// A service name (a DNS label, as the control process admits).
fn service_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

/// `name` as a caller may write it: any case, a mesh suffix or none, a trailing dot, a port.
fn written_as(name: String) -> impl Strategy<Value = (String, String)> {
    (
        prop::collection::vec(any::<bool>(), 40),
        prop_oneof![Just(""), Just(".mesh"), Just(".service.consul")],
        any::<bool>(),
        prop::option::of(0u32..65536),
    )
        .prop_map(move |(upper, suffix, dot, port)| {
            let mut host: String = format!("{name}{suffix}")
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
                .collect();
            if dot {
                host.push('.');
            }
            if let Some(port) = port {
                host.push_str(&format!(":{port}"));
            }
            (name.clone(), host)
        })
}

/// The name the outbound route looks up for a request, as `route.rs` derives it.
fn routed_name<B>(req: &Request<B>) -> Option<String> {
    let named = host::inspect(req).ok()?;
    let lower = lowercase(named.authority?);
    Some(normalize_authority(&lower).to_owned())
}

proptest! {
    #![proptest_config(config(512))]

    /// `Host` (origin form) and the absolute form's authority route to the service whatever
    /// the case, the suffix, a trailing dot and the port.
    #[test]
    fn host_case_port_suffix_and_trailing_dot_route_to_the_name(
        (name, host) in service_name().prop_flat_map(written_as),
    ) {
        let req = Request::get("/x").header(header::HOST, &host).body(()).unwrap();
        prop_assert_eq!(routed_name(&req), Some(name.clone()), "Host: {}", host);
        let req = Request::get(format!("http://{host}/x")).body(()).unwrap();
        prop_assert_eq!(routed_name(&req), Some(name), "authority {}", host);
    }

    /// Any `Host` value a parser lets through (and any number of them) is routed or refused,
    /// never a panic; two or more are refused.
    #[test]
    fn any_host_headers_are_routed_or_refused(
        hosts in prop::collection::vec(prop::collection::vec(
            prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..30), 0..3),
    ) {
        let mut req = Request::get("/").body(()).unwrap();
        for h in &hosts {
            req.headers_mut().append(header::HOST, HeaderValue::from_bytes(h).unwrap());
        }
        let name = routed_name(&req);
        if hosts.len() > 1 {
            prop_assert!(host::inspect(&req).is_err());
        }
        if let Some(name) = name {
            prop_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{}", name);
        }
        let mut req = req;
        let _ = host::check(&mut req);
    }
}

// === header rewrite ===

/// The headers a hostile or confused caller may send, among ordinary ones.
fn caller_header() -> impl Strategy<Value = (HeaderName, String)> {
    let token = prop_oneof![
        Just("x-mesh-caller".to_owned()),
        Just("X-Mesh-Timeout-Ms".to_owned()),
        Just("x-app-1".to_owned()),
        Just("X-App-2".to_owned()),
        Just("keep-alive".to_owned()),
        Just("close".to_owned()),
        Just("Upgrade".to_owned()),
        Just("te".to_owned()),
        Just("HTTP2-Settings".to_owned()),
        "[a-z][a-z0-9-]{0,8}",
    ];
    let connection = prop::collection::vec(token, 1..5).prop_map(|t| t.join(", "));
    prop_oneof![
        3 => connection.prop_map(|v| (header::CONNECTION, v)),
        2 => prop_oneof![Just("senior-ai-engineer"), Just(""), Just("a, b")]
            .prop_map(|v| (CALLER_HEADER, v.to_owned())),
        2 => prop_oneof![Just("0"), Just("999999999"), Just("soon"), Just("-5"), Just("1, 2")]
            .prop_map(|v| (TIMEOUT_HEADER, v.to_owned())),
        1 => prop_oneof![Just("h2c"), Just("websocket"), Just("h2c, websocket"), Just("tls/1.0")]
            .prop_map(|v| (header::UPGRADE, v.to_owned())),
        1 => Just((HeaderName::from_static("http2-settings"), "AAMAAABkAAQAoAAAAAIAAAAA".to_owned())),
        1 => prop_oneof![Just("trailers"), Just("gzip"), Just("gzip, trailers")]
            .prop_map(|v| (header::TE, v.to_owned())),
        1 => Just((header::TRANSFER_ENCODING, "chunked".to_owned())),
        1 => Just((HeaderName::from_static("keep-alive"), "timeout=5".to_owned())),
        1 => Just((HeaderName::from_static("proxy-connection"), "keep-alive".to_owned())),
        1 => Just((header::PROXY_AUTHORIZATION, "Basic eDp5".to_owned())),
        2 => prop_oneof![Just("x-app-1"), Just("x-app-2"), Just("x-app-3")]
            .prop_map(|n| (HeaderName::from_static(n), "v".to_owned())),
    ]
}

/// Hop-by-hop headers that must not cross a hop (RFC 9110 7.6.1) unless an upgrade passes.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
];

const AGENT: &str = "agent-a";

proptest! {
    #![proptest_config(config(1024))]

    /// After the sidecar's rewrite the mesh-owned headers appear once with the mesh's value
    /// whatever the caller sent (twice, empty, named in `Connection`), and no hop-by-hop
    /// header, nor one any `Connection` named, crosses the hop.
    #[test]
    fn mesh_headers_are_set_once_after_every_strip(
        sent in prop::collection::vec(caller_header(), 0..12),
        http2_next in any::<bool>(),
        budget_ms in 1u64..100_000,
    ) {
        let mut req = Request::get("/path?q=1").header(header::HOST, "b").body(()).unwrap();
        for (name, value) in &sent {
            req.headers_mut().append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        let named: Vec<String> = req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap().split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        // The route step sets the caller, as `RouteService` does.
        req.headers_mut().insert(CALLER_HEADER, HeaderValue::from_static(AGENT));
        let budget = Duration::from_millis(budget_ms);
        let deadline = Deadline {
            at: tokio::time::Instant::now() + budget,
            budget,
            grpc: false,
        };
        let endpoint = http::uri::Authority::from_static("10.0.0.7:8080");
        let preferred = if http2_next { Protocol::Http2 } else { Protocol::Http1 };

        let (protocol, upgrade) = prepare(&mut req, Some(&deadline), &endpoint, preferred).unwrap();
        let h = req.headers();

        let callers: Vec<_> = h.get_all(CALLER_HEADER).iter().collect();
        prop_assert_eq!(callers, vec![AGENT]);
        let timeouts: Vec<_> = h.get_all(TIMEOUT_HEADER).iter().collect();
        prop_assert_eq!(timeouts.len(), 1, "{:?}", h);
        let left: u64 = timeouts[0].to_str().unwrap().parse().unwrap();
        prop_assert!((1..=budget_ms).contains(&left), "{} of {}", left, budget_ms);

        let upgrades: Vec<&str> = sent
            .iter()
            .filter(|(n, _)| n == header::UPGRADE)
            .map(|(_, v)| v.as_str())
            .collect();
        let websocket = !upgrades.is_empty() && upgrades.iter().all(|v| *v == "websocket");
        prop_assert_eq!(upgrade.is_some(), websocket && named.iter().any(|t| t == "upgrade"));
        // Only WebSocket may be asked of the app.
        for v in h.get_all(header::UPGRADE) {
            prop_assert_eq!(v, "websocket");
        }
        if upgrade.is_none() {
            for name in HOP_BY_HOP {
                prop_assert!(!h.contains_key(name), "{} crossed: {:?}", name, h);
            }
            for name in named.iter().filter(|n| !n.starts_with("x-mesh-") && *n != "host") {
                prop_assert!(!h.contains_key(name.as_str()), "{} named in Connection crossed: {:?}", name, h);
            }
            let te: Vec<_> = h.get_all(header::TE).iter().collect();
            prop_assert!(te.is_empty() || te == vec!["trailers"], "TE {:?}", te);
        }
        if !upgrades.is_empty() && !websocket {
            prop_assert!(!h.contains_key("http2-settings"), "{:?}", h);
        }
        match protocol {
            Protocol::Http1 => {
                prop_assert_eq!(req.version(), Version::HTTP_11);
                prop_assert_eq!(h.get_all(header::HOST).iter().collect::<Vec<_>>(), vec!["b"]);
            }
            Protocol::Http2 => {
                prop_assert_eq!(req.version(), Version::HTTP_2);
                prop_assert!(!h.contains_key(header::HOST));
                prop_assert_eq!(req.uri().authority().map(|a| a.as_str()), Some("b"));
            }
        }
        prop_assert_eq!(req.uri().path_and_query().map(|p| p.as_str()), Some("/path?q=1"));
    }
}
