//! Mutual TLS between sidecars: the inbound side takes the caller from the verified
//! certificate, refuses callers without a good one (none, another CA's, an expired one) and
//! counts them, and a running mesh moves from `permissive` to `strict` without a failed
//! request from sidecars that hold certificates.

use mesh_tests::client;
use mesh_tests::control::{self, catalog, TestControl};
use mesh_tests::metrics::{metric_or_zero, scrape, wait_for_metric};
use mesh_tests::proxy::{self, ProxyProcess};
use mesh_tests::server::{self, Server};
use mesh_tests::tls::{self, leaf, other_ca, valid_for};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const TOKEN_A: &str = "token-of-agent-a-0123456789";
const TOKEN_B: &str = "token-of-agent-b-0123456789";
const TOKEN_C: &str = "token-of-agent-c-0123456789";

fn mode(m: &str) -> String {
    format!("[identity]\nmode = {m:?}\n")
}

/// A sidecar process for `agent` following `control`, with its certificate.
async fn sidecar(
    control: &TestControl,
    agent: &str,
    token: &str,
    app: Option<SocketAddr>,
    dir: &std::path::Path,
) -> ProxyProcess {
    let token_file = dir.join(format!("{agent}.token"));
    std::fs::write(&token_file, token).expect("write the token");
    let mut b = proxy::builder().agent(agent).bootstrap_extra(&format!(
        "{}\n[identity]\ntoken_file = {:?}\n",
        control.sidecar_toml(None),
        token_file.display().to_string()
    ));
    if let Some(app) = app {
        b = b.inbound_app(app);
    }
    let p = b.spawn().await;
    wait_for_metric(
        p.admin(),
        "agent_identity_renewals_total",
        &[("result", "ok")],
        1.0,
    )
    .await;
    p
}

/// Control (the CA), b's app and b's sidecar, in `initial` mode, with b in the catalog.
async fn mesh_with_b(
    initial: &str,
    dir: &std::path::Path,
) -> (TestControl, Server, ProxyProcess, u64) {
    mesh_with_b_for(initial, Duration::from_secs(3600), dir).await
}

/// As [`mesh_with_b`], with certificates valid for `lifetime`.
async fn mesh_with_b_for(
    initial: &str,
    lifetime: Duration,
    dir: &std::path::Path,
) -> (TestControl, Server, ProxyProcess, u64) {
    mesh_with_b_policy(initial, lifetime, "", dir).await
}

/// As [`mesh_with_b_for`], with one more policy file (`b.toml`).
async fn mesh_with_b_policy(
    initial: &str,
    lifetime: Duration,
    policy: &str,
    dir: &std::path::Path,
) -> (TestControl, Server, ProxyProcess, u64) {
    let app = server::echo().run().await;
    let control = control::builder()
        .identity(&[("a", TOKEN_A), ("b", TOKEN_B)], lifetime)
        .policy_file("b.toml", policy)
        .policy_file("identity.toml", &mode(initial))
        .catalog(&catalog(&[("b", "critical", &[control::NOT_LISTENING])]))
        .start()
        .await;
    let b = sidecar(&control, "b", TOKEN_B, Some(app.addr()), dir).await;
    let before = control.version();
    control.write_catalog(&catalog(&[(
        "b",
        "critical",
        &[b.inbound().expect("b listens")],
    )]));
    let version = control.wait_version_after(before).await;
    (control, app, b, version)
}

fn last_caller(app: &Server) -> Option<String> {
    app.request_headers()
        .last()
        .and_then(|h| h.get("x-mesh-caller"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_good_certificate_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (control, app, b, version) = mesh_with_b("strict", dir.path()).await;
    control.wait_applied(version, 1).await;
    let inbound = b.inbound().expect("b listens");
    let (ca, ca_key) = (control.ca_pem(), control.ca_key_pem());
    let refused = |text: &str, reason: &str| {
        metric_or_zero(
            text,
            "agent_tls_handshake_failures_total",
            &[("reason", reason)],
        )
    };

    // No certificate.
    assert!(tls::get(inbound, None, "/", &[]).await.is_err());
    wait_for_metric(
        b.admin(),
        "agent_tls_handshake_failures_total",
        &[("reason", "no_certificate")],
        1.0,
    )
    .await;
    // A certificate for "a" from another CA.
    let (other, other_key) = other_ca();
    let (from, to) = valid_for(Duration::from_secs(3600));
    let forged = leaf(&other, &other_key, "a", from, to);
    assert!(tls::get(inbound, Some(&forged), "/", &[]).await.is_err());
    wait_for_metric(
        b.admin(),
        "agent_tls_handshake_failures_total",
        &[("reason", "unknown_ca")],
        1.0,
    )
    .await;
    // The mesh CA's, but expired.
    let now = SystemTime::now();
    let expired = leaf(
        &ca,
        &ca_key,
        "a",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    assert!(tls::get(inbound, Some(&expired), "/", &[]).await.is_err());
    wait_for_metric(
        b.admin(),
        "agent_tls_handshake_failures_total",
        &[("reason", "expired")],
        1.0,
    )
    .await;
    // Plaintext, claiming to be a critical agent: refused in strict mode.
    let reply = client::http1(inbound)
        .send(
            client::http1(inbound)
                .request(http::Method::GET, "b", "/")
                .header("x-mesh-caller", "senior-ai-engineer")
                .body(mesh_tests::body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"], "mtls_required");
    assert_eq!(app.requests(), 0, "nothing reached the app");

    // A good certificate for "a" that claims to be b: the app sees a.
    let good = leaf(&ca, &ca_key, "a", from, to);
    let (status, _) = tls::get(
        inbound,
        Some(&good),
        "/",
        &[
            ("x-mesh-caller", "b"),
            ("x-forwarded-client-cert", "By=spiffe://mesh/agent/b"),
        ],
    )
    .await
    .expect("a good certificate is served");
    assert_eq!(status, 200);
    assert_eq!(last_caller(&app).as_deref(), Some("a"));
    let headers = app.request_headers();
    assert!(headers
        .last()
        .unwrap()
        .get("x-forwarded-client-cert")
        .is_none());
    let text = scrape(b.admin()).await;
    assert!(refused(&text, "no_certificate") >= 1.0);
}

/// The caller's side checks that the peer is the agent it dialled: an endpoint of `b` that
/// answers with c's certificate (a stale catalog entry, an address taken over) gets no request,
/// though its certificate comes from the mesh CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_another_agents_certificate_gets_no_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = server::echo().run().await;
    let control = control::builder()
        .identity(&[("a", TOKEN_A), ("c", TOKEN_C)], Duration::from_secs(3600))
        .policy_file("identity.toml", &mode("strict"))
        .catalog(&catalog(&[("b", "critical", &[control::NOT_LISTENING])]))
        .start()
        .await;
    let c = sidecar(&control, "c", TOKEN_C, Some(app.addr()), dir.path()).await;
    let a = sidecar(&control, "a", TOKEN_A, None, dir.path()).await;
    let before = control.version();
    control.write_catalog(&catalog(&[(
        "b",
        "critical",
        &[c.inbound().expect("c listens")],
    )]));
    let version = control.wait_version_after(before).await;
    control.wait_applied(version, 2).await;

    let reply = client::http1(a.outbound()).get("b", "/").await;
    assert!(
        matches!(reply.status.as_u16(), 502 | 503),
        "{} {}",
        reply.status,
        reply.text()
    );
    assert_eq!(app.requests(), 0, "nothing reached the app behind c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_mesh_moves_from_permissive_to_strict_without_failed_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (control, app, b, version) = mesh_with_b("permissive", dir.path()).await;
    let a = sidecar(&control, "a", TOKEN_A, None, dir.path()).await;
    control.wait_applied(version, 2).await;

    // Through a's sidecar: mutual TLS, and b's app sees the verified caller.
    let via_a = client::http1(a.outbound());
    let reply = via_a.get("b", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(last_caller(&app).as_deref(), Some("a"));
    wait_for_metric(
        b.admin(),
        "agent_tls_handshakes_total",
        &[("side", "server")],
        1.0,
    )
    .await;

    // Permissive: a plaintext caller still gets through, and is counted; what it claims to be
    // is not believed, so the app sees no caller.
    let inbound = b.inbound().expect("b listens");
    let plain = client::http1(inbound);
    let claim = plain
        .request(http::Method::GET, "b", "/")
        .header("x-mesh-caller", "senior-ai-engineer")
        .header(
            "x-forwarded-client-cert",
            "By=spiffe://mesh/agent/senior-ai-engineer",
        )
        .body(mesh_tests::body::empty())
        .unwrap();
    assert_eq!(plain.send(claim).await.status, 200);
    assert_eq!(last_caller(&app), None);
    assert!(app
        .request_headers()
        .last()
        .unwrap()
        .get("x-forwarded-client-cert")
        .is_none());
    wait_for_metric(
        b.admin(),
        "agent_inbound_plaintext_requests_total",
        &[("result", "accepted")],
        1.0,
    )
    .await;

    // Traffic through a's sidecar while the mesh turns strict.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(via_a.get("b", "/").await.status.as_u16());
            }
            statuses
        })
    };
    let before = control.version();
    control.write_policy("identity.toml", &mode("strict"));
    let strict = control.wait_version_after(before).await;
    control.wait_applied(strict, 2).await;
    // Strict now: plaintext is refused.
    assert_eq!(client::http1(inbound).get("b", "/").await.status, 403);
    // A few more requests in strict mode before the load stops.
    let served = app.requests();
    app.wait_requests(served + 20).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = load.await.expect("the load task");
    assert!(statuses.len() >= 20, "{}", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "failed requests during the migration: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    assert_eq!(last_caller(&app).as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    // Certificates of 3 s, renewed every 2 s by both sidecars, in strict mode; a dials b over
    // HTTP/2 (ALPN h2) on one reused connection.
    let dir = tempfile::tempdir().expect("temp dir");
    let (control, app, b, version) = mesh_with_b_policy(
        "strict",
        Duration::from_secs(3),
        "[targets.b]\nprotocol = \"http2\"\n",
        dir.path(),
    )
    .await;
    let a = sidecar(&control, "a", TOKEN_A, None, dir.path()).await;
    control.wait_applied(version, 2).await;
    let via_a = client::http1(a.outbound());
    assert_eq!(via_a.get("b", "/").await.status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(via_a.get("b", "/").await.status.as_u16());
            }
            statuses
        })
    };
    // Two more certificates each while the load runs.
    for side in [&a, &b] {
        let now = metric_or_zero(
            &scrape(side.admin()).await,
            "agent_identity_renewals_total",
            &[("result", "ok")],
        );
        wait_for_metric(
            side.admin(),
            "agent_identity_renewals_total",
            &[("result", "ok")],
            now + 2.0,
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = load.await.expect("the load task");
    assert!(statuses.len() >= 20, "{}", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "failed requests across renewals: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    assert_eq!(last_caller(&app).as_deref(), Some("a"));
}
