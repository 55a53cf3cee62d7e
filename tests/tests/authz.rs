//! Authorization between agents: per-target rules allow callers by name or phase, with path
//! prefixes and methods; refusals are 403 JSON naming the rule and are counted; a policy edit
//! applies without a restart. Callers are named by their mutual-TLS certificates.

use mesh_tests::control::{self, catalog};
use mesh_tests::metrics::wait_for_metric;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::tls::{self, leaf, valid_for};
use std::net::SocketAddr;
use std::time::Duration;

const TOKEN_B: &str = "token-of-agent-b-0123456789";

const RULES: &str = r#"
[authorization]
default = "deny"

[[authorization.rules]]
name = "a-reads-the-api"
target = "b"
agents = ["a"]
path_prefixes = ["/api/"]
methods = ["GET"]

[[authorization.rules]]
name = "critical-agents"
target = "b"
phases = ["critical"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_allowed_by_name_or_phase_and_an_edit_applies_live() {
    let app = server::echo().run().await;
    let others = |b: SocketAddr| {
        catalog(&[
            ("b", "performance", &[b]),
            ("a", "specialized", &[control::NOT_LISTENING]),
            ("c", "critical", &[control::NOT_LISTENING]),
            ("d", "specialized", &[control::NOT_LISTENING]),
        ])
    };
    let control = control::builder()
        .identity(&[("b", TOKEN_B)], Duration::from_secs(3600))
        .policy_file("identity.toml", "[identity]\nmode = \"strict\"\n")
        .policy_file("authz.toml", RULES)
        .catalog(&others(control::NOT_LISTENING))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("b.token");
    std::fs::write(&token_file, TOKEN_B).expect("write the token");
    let b = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .bootstrap_extra(&format!(
            "{}\n[identity]\ntoken_file = {:?}\n",
            control.sidecar_toml(None),
            token_file.display().to_string()
        ))
        .spawn()
        .await;
    wait_for_metric(
        b.admin(),
        "agent_identity_renewals_total",
        &[("result", "ok")],
        1.0,
    )
    .await;
    let inbound = b.inbound().expect("b listens");
    let before = control.version();
    control.write_catalog(&others(inbound));
    let v = control.wait_version_after(before).await;
    control.wait_applied(v, 1).await;

    let (ca, key) = (control.ca_pem(), control.ca_key_pem());
    let (from, to) = valid_for(Duration::from_secs(3600));
    let cert = |agent: &str| leaf(&ca, &key, agent, from, to);
    let call = |agent: &'static str, path: &'static str| {
        let c = cert(agent);
        async move {
            let (status, body) = tls::get(inbound, Some(&c), path, &[])
                .await
                .expect("a TLS exchange");
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (status, json)
        }
    };

    // By name, within its paths: a reads the API, nothing else.
    assert_eq!(call("a", "/api/items").await.0, 200);
    let (status, body) = call("a", "/admin").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["rule"], "b: no rule allows this caller");
    assert_eq!(body["caller"], "a");
    // By phase: any critical agent.
    assert_eq!(call("c", "/admin").await.0, 200);
    // A specialized agent with no rule: refused, counted by target and caller.
    assert_eq!(call("d", "/api/items").await.0, 403);
    wait_for_metric(
        b.admin(),
        "agent_authz_denied_total",
        &[("target", "b"), ("caller", "d")],
        1.0,
    )
    .await;
    let served = app.requests();

    // An edit lets d in, without a restart.
    let before = control.version();
    control.write_policy(
        "authz.toml",
        &format!("{RULES}\n[[authorization.rules]]\nname = \"d-too\"\ntarget = \"b\"\nagents = [\"d\"]\n"),
    );
    let v = control.wait_version_after(before).await;
    control.wait_applied(v, 1).await;
    assert_eq!(call("d", "/api/items").await.0, 200);
    assert_eq!(
        app.requests(),
        served + 1,
        "refused calls never reached the app"
    );
}

/// The Ollama gateway ranks a caller by its certificate: a specialized agent claiming, in
/// `x-mesh-caller`, to be a critical one is admitted as specialized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ollama_gateway_ranks_the_certificate_not_the_header() {
    const TOKEN_GW: &str = "token-of-the-gateway-0123456789";
    let ollama = mesh_tests::ollama::fake().parallel(1).chunks(1).run().await;
    let entries = |gw: SocketAddr| {
        catalog(&[
            ("ollama", "performance", &[gw]),
            ("crit", "critical", &[control::NOT_LISTENING]),
            ("spec", "specialized", &[control::NOT_LISTENING]),
        ])
    };
    let control = control::builder()
        .identity(&[("ollama", TOKEN_GW)], Duration::from_secs(3600))
        .policy_file("identity.toml", "[identity]\nmode = \"strict\"\n")
        .catalog(&entries(control::NOT_LISTENING))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, TOKEN_GW).expect("write the token");
    let gw = proxy::builder()
        .agent("ollama")
        .ollama_gateway(ollama.addr())
        .bootstrap_extra(&format!(
            "{}\n[identity]\ntoken_file = {:?}\n",
            control.sidecar_toml(None),
            token_file.display().to_string()
        ))
        .spawn()
        .await;
    wait_for_metric(
        gw.admin(),
        "agent_identity_renewals_total",
        &[("result", "ok")],
        1.0,
    )
    .await;
    let inbound = gw.inbound().expect("the gateway listens");
    let before = control.version();
    control.write_catalog(&entries(inbound));
    let v = control.wait_version_after(before).await;
    control.wait_applied(v, 1).await;

    let (from, to) = valid_for(Duration::from_secs(3600));
    let spec = leaf(&control.ca_pem(), &control.ca_key_pem(), "spec", from, to);
    let (status, body) = tls::get(
        inbound,
        Some(&spec),
        "/api/version",
        &[("x-mesh-caller", "crit")],
    )
    .await
    .expect("a TLS exchange");
    assert_eq!(status, 200, "{body:?}");
    // A generation, ranked and counted by the certificate's phase.
    let (status, body) = tls::post(
        inbound,
        Some(&spec),
        "/api/generate",
        &[
            ("x-mesh-caller", "crit"),
            ("content-type", "application/json"),
        ],
        r#"{"model":"fake","prompt":"hi","stream":false}"#,
    )
    .await
    .expect("a TLS exchange");
    assert_eq!(status, 200, "{body:?}");
    wait_for_metric(
        gw.admin(),
        "agent_ollama_admitted_total",
        &[("phase", "specialized")],
        1.0,
    )
    .await;
    let text = mesh_tests::metrics::scrape(gw.admin()).await;
    assert_eq!(
        mesh_tests::metrics::metric_or_zero(
            &text,
            "agent_ollama_admitted_total",
            &[("phase", "critical")]
        ),
        0.0,
        "the header's claim was not believed"
    );
}
