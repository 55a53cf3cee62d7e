//! Mesh identity: the control process as CA signs a sidecar's CSR only for the agent its
//! bootstrap token names; a sidecar gets its certificate, renews it at two thirds of its
//! lifetime, and keeps the one in force while the control process is away.

use mesh_tests::control;
use mesh_tests::eventually;
use mesh_tests::metrics::{metric_or_zero, scrape, wait_for_metric};
use mesh_tests::proxy;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

const TOKEN_A: &str = "token-of-agent-a-0123456789";
const TOKEN_B: &str = "token-of-agent-b-0123456789";
const OPERATOR: &str = "operator-token-0123456789";

fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("a key");
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("a CSR")
        .pem()
        .expect("PEM")
}

/// `POST /v1/certificate` straight to the control process: (status, JSON body).
async fn ask(control: SocketAddr, token: Option<&str>, agent: &str, csr: &str) -> (u16, Value) {
    let mut req = http::Request::post(format!("http://{control}/v1/certificate"))
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = serde_json::json!({ "agent": agent, "csr": csr }).to_string();
    let reply = mesh_tests::client::http1(control)
        .send(req.body(mesh_tests::body::full(body)).expect("a request"))
        .await;
    (reply.status.as_u16(), reply.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_the_agent_a_token_names() {
    let control = control::builder()
        .identity(&[("a", TOKEN_A), ("b", TOKEN_B)], Duration::from_secs(3600))
        .confirm_token(OPERATOR)
        .start()
        .await;
    let addr = control.addr();

    let (status, body) = ask(addr, Some(TOKEN_A), "a", &csr()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spiffe_id"], "spiffe://mesh/agent/a");
    assert_eq!(body["ca"].as_str(), Some(control.ca_pem().as_str()));
    let pem = body["certificate"].as_str().expect("a certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    let leaf = pem.parse_x509().expect("a certificate");
    let san = leaf
        .subject_alternative_name()
        .expect("one SAN")
        .expect("a SAN");
    assert_eq!(
        san.value.general_names,
        vec![x509_parser::extensions::GeneralName::URI(
            "spiffe://mesh/agent/a"
        )]
    );

    // a's token cannot get b's certificate; no token, a bad CSR: refused too.
    let (status, body) = ask(addr, Some(TOKEN_A), "b", &csr()).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = ask(addr, None, "a", &csr()).await;
    assert_eq!(status, 401);
    let (status, _) = ask(addr, Some("token-of-nobody-0123456789"), "c", &csr()).await;
    assert_eq!(status, 403);
    let (status, _) = ask(
        addr,
        Some(TOKEN_A),
        "a",
        "-----BEGIN CERTIFICATE REQUEST-----",
    )
    .await;
    assert_eq!(status, 400);

    let metrics = mesh_tests::client::http1(addr)
        .get("control", "/metrics")
        .await
        .text();
    let refused = |reason: &str| {
        mesh_tests::metrics::metric_or_zero(
            &metrics,
            "mesh_control_identity_refused_total",
            &[("reason", reason)],
        )
    };
    assert!(refused("wrong_token") >= 2.0, "{metrics}");
    assert!(refused("no_token") >= 1.0);
    assert!(refused("bad_csr") >= 1.0);

    // The control channel: a sidecar gets only its own agent's snapshot.
    let poll = |token: Option<&'static str>| async move {
        let mut req = http::Request::get(format!(
            "http://{addr}/v1/snapshot?agent=a&version=0&wait=1ms"
        ));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        mesh_tests::client::http1(addr)
            .send(req.body(mesh_tests::body::empty()).expect("a request"))
            .await
            .status
            .as_u16()
    };
    assert_eq!(poll(None).await, 401);
    assert_eq!(poll(Some(TOKEN_B)).await, 403);
    assert!(matches!(poll(Some(TOKEN_A)).await, 200 | 304));

    // `/status` is for the operator: MESH_CONTROL_TOKEN, not an agent's token.
    let status = |token: Option<&'static str>| async move {
        let mut req = http::Request::get(format!("http://{addr}/status"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        mesh_tests::client::http1(addr)
            .send(req.body(mesh_tests::body::empty()).expect("a request"))
            .await
            .status
            .as_u16()
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some(TOKEN_A)).await, 401);
    assert_eq!(status(Some(OPERATOR)).await, 200);

    // A revoked token (an edit of the tokens file) is refused without a restart.
    mesh_tests::proxy::replace_file(&control.tokens_path(), &format!("b = {TOKEN_B:?}\n"));
    let (status, _) = ask(addr, Some(TOKEN_A), "a", &csr()).await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_renews_its_certificate_and_keeps_it_while_control_is_away() {
    // Certificates of 3 s: renewed every 2 s. The sidecar is the real binary, so its metrics
    // are its own.
    let mut control = control::builder()
        .identity(&[("a", TOKEN_A)], Duration::from_secs(3))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN_A}\n")).expect("write the token");
    let sidecar = proxy::builder()
        .agent("a")
        .bootstrap_extra(&format!(
            "{}\n[identity]\ntoken_file = {:?}\n",
            control.sidecar_toml(None),
            token_file.display().to_string()
        ))
        .spawn()
        .await;
    let admin = sidecar.admin();
    let renewals = |result: &'static str| [("result", result)];
    let expiry = || async move {
        metric_or_zero(
            &scrape(admin).await,
            "agent_identity_expiry_timestamp_seconds",
            &[],
        )
    };

    // A first certificate, then two renewals, each expiring later than the one before.
    wait_for_metric(admin, "agent_identity_renewals_total", &renewals("ok"), 1.0).await;
    let first = expiry().await;
    assert!(first > 0.0);
    wait_for_metric(admin, "agent_identity_renewals_total", &renewals("ok"), 3.0).await;
    let renewed = expiry().await;
    assert!(renewed > first, "{renewed} > {first}");

    // Control away: renewals fail, the certificate in force stays, the log says its time left.
    control.stop().await;
    let held = expiry().await;
    wait_for_metric(
        admin,
        "agent_identity_renewals_total",
        &renewals("error"),
        2.0,
    )
    .await;
    assert_eq!(
        expiry().await,
        held,
        "nothing replaced the certificate in force"
    );
    let lines = sidecar.stdout_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("serving on the current one") && l.contains("time_left_s")),
        "{lines:#?}"
    );

    // Control back: a fresh certificate within the retry backoff.
    control.restart().await;
    eventually("a certificate after control returns", || async move {
        (expiry().await > held).then_some(())
    })
    .await;
}
