//! Mesh identity: the control process as CA signs a sidecar's CSR only for the agent its
//! bootstrap token names; a sidecar gets its certificate, renews it at two thirds of its
//! lifetime, and keeps the one in force while the control process is away. The control
//! channel is TLS only: a sidecar verifies the control process against the mesh CA, and is
//! known by its certificate once it has one.

use mesh_tests::control::{self, TestControl};
use mesh_tests::eventually;
use mesh_tests::metrics::{metric_or_zero, scrape, wait_for_metric};
use mesh_tests::proxy;
use mesh_tests::tls::{self, ClientCert};
use serde_json::Value;
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

/// One call over the control channel (TLS, trusting the mesh CA), with `cert` in the
/// handshake and `token` as the bearer: (status, body).
async fn call(
    control: &TestControl,
    cert: Option<&ClientCert>,
    method: http::Method,
    path: &str,
    token: Option<&str>,
    body: String,
) -> (u16, bytes::Bytes) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("a request");
    tls::control(control.addr(), &control.ca_pem(), cert, req)
        .await
        .unwrap_or_else(|e| panic!("{path} over TLS: {e}"))
}

/// `POST /v1/certificate` to the control process: (status, JSON body).
async fn ask(control: &TestControl, token: Option<&str>, agent: &str, csr: &str) -> (u16, Value) {
    let body = serde_json::json!({ "agent": agent, "csr": csr }).to_string();
    let (status, body) = call(
        control,
        None,
        http::Method::POST,
        "/v1/certificate",
        token,
        body,
    )
    .await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `GET path` over the control channel: (status, body as text).
async fn get(
    control: &TestControl,
    cert: Option<&ClientCert>,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let (status, body) = call(control, cert, http::Method::GET, path, token, String::new()).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_the_agent_a_token_names() {
    let control = control::builder()
        .identity(&[("a", TOKEN_A), ("b", TOKEN_B)], Duration::from_secs(3600))
        .confirm_token(OPERATOR)
        .start()
        .await;
    let addr = &control;

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

    let (_, metrics) = get(&control, None, "/metrics", None).await;
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
        get(addr, None, "/v1/snapshot?agent=a&version=0&wait=1ms", token)
            .await
            .0
    };
    assert_eq!(poll(None).await, 401);
    assert_eq!(poll(Some(TOKEN_B)).await, 403);
    assert!(matches!(poll(Some(TOKEN_A)).await, 200 | 304));

    // `/status` is for the operator: MESH_CONTROL_TOKEN, not an agent's token.
    let status =
        |token: Option<&'static str>| async move { get(addr, None, "/status", token).await.0 };
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
        .catalog(&control::catalog(&[(
            "a",
            "critical",
            &[control::NOT_LISTENING],
        )]))
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

    // A first certificate, then two renewals, each expiring later than the one before, all
    // over the TLS channel (the only one control serves), and the snapshot over it too.
    wait_for_metric(admin, "agent_identity_renewals_total", &renewals("ok"), 1.0).await;
    let first = expiry().await;
    assert!(first > 0.0);
    let version = control.wait_version_after(0).await;
    control.wait_applied(version, 1).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_refuses_plaintext_and_certificates_it_did_not_issue() {
    let control = control::builder()
        .identity(&[("a", TOKEN_A)], Duration::from_secs(3600))
        .start()
        .await;
    let (ca, ca_key) = (control.ca_pem(), control.ca_key_pem());

    // A plaintext client carrying a token gets no HTTP answer: the bytes end the handshake.
    let raw = mesh_tests::client::raw_exchange(
        control.addr(),
        format!(
            "GET /v1/snapshot?agent=a&version=0&wait=1ms HTTP/1.1\r\nhost: c\r\n\
             authorization: Bearer {TOKEN_A}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(
        mesh_tests::client::raw_status(&raw),
        None,
        "{:?}",
        String::from_utf8_lossy(&raw)
    );

    // A certificate for `a` from another CA, or the mesh CA's but expired: no handshake.
    let (other, other_key) = tls::other_ca();
    let (from, until) = tls::valid_for(Duration::from_secs(3600));
    let foreign = tls::leaf(&other, &other_key, "a", from, until);
    let now = std::time::SystemTime::now();
    let expired = tls::leaf(
        &ca,
        &ca_key,
        "a",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    for (what, cert) in [("another CA", &foreign), ("expired", &expired)] {
        let req = http::Request::get("/v1/snapshot?agent=a&version=0&wait=1ms")
            .header("host", "127.0.0.1")
            .body(http_body_util::Full::default())
            .expect("a request");
        let res = tls::control(control.addr(), &ca, Some(cert), req).await;
        assert!(res.is_err(), "{what}: {res:?}");
    }

    // A client that does not trust the mesh CA does not trust the control process either.
    let req = http::Request::get("/health")
        .header("host", "127.0.0.1")
        .body(http_body_util::Full::default())
        .expect("a request");
    let res = tls::control(control.addr(), &other, None, req).await;
    assert!(res.is_err(), "{res:?}");

    let (_, metrics) = get(&control, None, "/metrics", None).await;
    let failed = metric_or_zero(
        &metrics,
        "mesh_control_channel_handshake_failures_total",
        &[],
    );
    assert!(failed >= 4.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_one_agent_cannot_fetch_another_agents_snapshot() {
    let control = control::builder()
        .identity(&[("a", TOKEN_A), ("b", TOKEN_B)], Duration::from_secs(3600))
        .start()
        .await;
    let (from, until) = tls::valid_for(Duration::from_secs(3600));
    let a = tls::leaf(&control.ca_pem(), &control.ca_key_pem(), "a", from, until);

    // The certificate alone proves `a`: no token needed.
    let (status, body) = get(
        &control,
        Some(&a),
        "/v1/snapshot?agent=a&version=0&wait=1ms",
        None,
    )
    .await;
    assert!(matches!(status, 200 | 304), "{status} {body}");

    // It cannot ask for b, not even with b's token: the connection speaks for a only.
    for token in [None, Some(TOKEN_B)] {
        let (status, body) = get(
            &control,
            Some(&a),
            "/v1/snapshot?agent=b&version=0&wait=1ms",
            token,
        )
        .await;
        assert_eq!(status, 403, "{token:?}: {body}");
        assert!(body.contains("certificate names another agent"), "{body}");
    }
    let ack = serde_json::json!({ "agent": "b", "version": 1 }).to_string();
    let (status, _) = call(&control, Some(&a), http::Method::POST, "/v1/ack", None, ack).await;
    assert_eq!(status, 403);
    let ask_b = serde_json::json!({ "agent": "b", "csr": csr() }).to_string();
    let (status, _) = call(
        &control,
        Some(&a),
        http::Method::POST,
        "/v1/certificate",
        Some(TOKEN_B),
        ask_b,
    )
    .await;
    assert_eq!(status, 403);

    let (_, metrics) = get(&control, None, "/metrics", None).await;
    let refused = metric_or_zero(
        &metrics,
        "mesh_control_identity_refused_total",
        &[("reason", "wrong_certificate")],
    );
    assert!(refused >= 4.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_the_wrong_trust_anchor_gets_nothing_and_says_why() {
    let control = control::builder()
        .identity(&[("a", TOKEN_A)], Duration::from_secs(3600))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN_A).expect("write the token");
    let wrong_ca = dir.path().join("other-ca.pem");
    std::fs::write(&wrong_ca, tls::other_ca().0).expect("write another CA");
    let sidecar = proxy::builder()
        .agent("a")
        .bootstrap_extra(&format!(
            "\n[control]\naddress = \"{}\"\nwait = \"5s\"\nmax_backoff = \"100ms\"\nca_file = {:?}\n\
             \n[identity]\ntoken_file = {:?}\n",
            control.addr(),
            wrong_ca.display().to_string(),
            token_file.display().to_string()
        ))
        .spawn()
        .await;

    // Both the snapshot long-poll and the CSR fail on the control process's certificate.
    let lines = eventually("the sidecar to log why control is unreachable", || {
        let lines = sidecar.stdout_lines();
        let said = |what: &str| {
            lines
                .iter()
                .any(|l| l.contains(what) && l.contains("UnknownIssuer"))
        };
        let done = said("control unreachable") && said("cannot get a certificate yet");
        async move { done.then_some(lines) }
    })
    .await;
    assert!(
        lines.iter().all(|l| !l.contains(TOKEN_A)),
        "the token is never logged"
    );
    // `/health` says it too.
    let health = mesh_tests::client::http1(sidecar.admin())
        .get("admin", "/health")
        .await
        .json();
    assert_eq!(health["control"]["status"], "unreachable", "{health}");
    let error = health["control"]["error"].as_str().unwrap_or("");
    assert!(error.contains("UnknownIssuer"), "{health}");
    let metrics = scrape(sidecar.admin()).await;
    assert_eq!(
        metric_or_zero(
            &metrics,
            "agent_identity_renewals_total",
            &[("result", "ok")]
        ),
        0.0
    );
    assert_eq!(
        control.status()["sidecars"].as_array().map(Vec::len),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_with_a_plaintext_control_address_does_not_start() {
    // What would receive the token if the sidecar sent it: it must see no connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN_A).expect("write the token");
    let snapshot = dir.path().join("snapshot.toml");
    std::fs::write(&snapshot, "").expect("write a snapshot");
    let bootstrap = proxy::builder()
        .agent("a")
        .bootstrap_extra(&format!(
            "\n[control]\naddress = \"{}\"\n\n[identity]\ntoken_file = {:?}\n",
            listener.local_addr().expect("addr"),
            token_file.display().to_string()
        ))
        .bootstrap_toml(&snapshot);
    let path = dir.path().join("bootstrap.toml");
    std::fs::write(&path, bootstrap).expect("write the bootstrap");
    let out = mesh_tests::bounded(
        "mesh-proxy refusing its bootstrap",
        tokio::process::Command::new(proxy::binary_path())
            .arg("--config")
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run mesh-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("control.ca_file") && stderr.contains("in clear"),
        "{stderr}"
    );
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the sidecar connected to the plaintext control address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_reaches_status_over_tls_with_the_ca_and_the_operator_token() {
    use mesh_control::compliance::{run_with, ControlAccess, Outcome};
    let control = control::builder()
        .identity(&[("a", TOKEN_A)], Duration::from_secs(3600))
        .confirm_token(OPERATOR)
        .start()
        .await;
    let url = format!("https://127.0.0.1:{}/status", control.addr().port());
    let status_row = |access: ControlAccess| {
        let url = url.clone();
        async move {
            let report = run_with(&url, Duration::from_secs(5), &access).await;
            let row = report
                .checks
                .iter()
                .find(|c| c.check == "control status")
                .cloned()
                .expect("a control status row");
            (row.outcome, row.detail)
        }
    };
    let (outcome, detail) = status_row(ControlAccess {
        ca_file: Some(control.ca_path()),
        token: Some(OPERATOR.into()),
    })
    .await;
    assert_eq!(outcome, Outcome::Pass, "{detail}");

    // Without the CA it does not connect, and says what it needs; a wrong token is refused.
    let (outcome, detail) = status_row(ControlAccess {
        ca_file: None,
        token: Some(OPERATOR.into()),
    })
    .await;
    assert_eq!(outcome, Outcome::Fail);
    assert!(detail.contains("--ca-file"), "{detail}");
    let (outcome, detail) = status_row(ControlAccess {
        ca_file: Some(control.ca_path()),
        token: Some(TOKEN_A.into()),
    })
    .await;
    assert_eq!(outcome, Outcome::Fail);
    assert!(detail.contains("401"), "{detail}");

    // The binary, with the CA and the operator token from files.
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("operator.token");
    std::fs::write(&token, format!("{OPERATOR}\n")).expect("write the token");
    let out = mesh_tests::bounded(
        "mesh-control compliance",
        tokio::process::Command::new(control::binary_path())
            .args(["compliance", "--status-url", &url, "--ca-file"])
            .arg(control.ca_path())
            .arg("--token-file")
            .arg(&token)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run mesh-control");
    let table = String::from_utf8_lossy(&out.stdout);
    // No sidecar has polled yet: the run fails, but not on reaching /status.
    assert!(table.contains("answered with JSON"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bring_your_own_ca_signs_sidecars_and_serves_the_channel() {
    let (ca, key) = tls::other_ca();
    let control = control::builder()
        .identity(&[("a", TOKEN_A)], Duration::from_secs(3600))
        .byo_ca(&ca, &key)
        .catalog(&control::catalog(&[(
            "a",
            "critical",
            &[control::NOT_LISTENING],
        )]))
        .start()
        .await;
    assert_eq!(control.ca_pem(), ca);
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN_A).expect("write the token");
    let sidecar = proxy::builder()
        .agent("a")
        .bootstrap_extra(&format!(
            "{}\n[identity]\ntoken_file = {:?}\n",
            control.sidecar_toml(None),
            token_file.display().to_string()
        ))
        .spawn()
        .await;
    wait_for_metric(
        sidecar.admin(),
        "agent_identity_renewals_total",
        &[("result", "ok")],
        1.0,
    )
    .await;
    let version = control.wait_version_after(0).await;
    control.wait_applied(version, 1).await;
    let admin = sidecar.admin();
    eventually("/health to report control reachable", || async move {
        let health = mesh_tests::client::http1(admin)
            .get("admin", "/health")
            .await
            .json();
        (health["control"]["status"] == "reachable").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_certificate_is_renewed_before_it_expires() {
    // Certificates of 3 s: the channel's own is renewed every 2 s, each one verified by the
    // mesh CA for the name sidecars dial.
    let control = control::builder()
        .identity(&[("a", TOKEN_A)], Duration::from_secs(3))
        .start()
        .await;
    let ca = control.ca_pem();
    let first = tls::control_leaf(control.addr(), &ca)
        .await
        .expect("a verified handshake");
    let (_, parsed) = x509_parser::parse_x509_certificate(&first).expect("X.509");
    let life = parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
    assert!((3..=3 + 60).contains(&life), "{life} s");
    let san = parsed
        .subject_alternative_name()
        .expect("SAN")
        .expect("SAN")
        .value
        .general_names
        .clone();
    assert!(
        san.contains(&x509_parser::extensions::GeneralName::DNSName("localhost")),
        "{san:?}"
    );
    let renewed = eventually("a renewed control certificate", || {
        let (addr, ca, first) = (control.addr(), ca.clone(), first.clone());
        async move {
            let leaf = tls::control_leaf(addr, &ca).await.ok()?;
            (leaf != first).then_some(leaf)
        }
    })
    .await;
    let (_, parsed) = x509_parser::parse_x509_certificate(&renewed).expect("X.509");
    assert!(parsed.validity().is_valid());
}
