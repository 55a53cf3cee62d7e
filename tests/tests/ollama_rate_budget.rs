//! The caller-side Ollama rate derived from budgets: the control process gives each agent a
//! share of the gateway's capacity by its CPU budget, the share travels in the sidecar's
//! snapshot view, and the sidecar's token bucket enforces it (429 at the caller's own sidecar).

use http::Method;
use mesh_tests::control::{self, catalog};
use mesh_tests::{body, bounded, client, ollama, proxy};
use std::net::SocketAddr;

async fn generate(outbound: SocketAddr, prompt: &str) -> client::Reply {
    let c = client::http1(outbound);
    let req = c
        .request(Method::POST, "ollama", "/api/generate")
        .body(body::full(format!("{{\"prompt\":{prompt:?}}}")))
        .unwrap();
    bounded("a call to ollama", c.send(req)).await
}

/// Calls until the first refusal; returns how many got through and the refusal.
async fn burst(outbound: SocketAddr, tag: &str, max: usize) -> (usize, client::Reply) {
    for i in 0..max {
        let reply = generate(outbound, &format!("{tag}{i}")).await;
        if reply.status != 200 {
            return (i, reply);
        }
    }
    panic!("{tag}: {max} calls and none refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agents_ollama_rate_is_its_budget_share_of_the_gateway() {
    let fake = ollama::fake().chunks(0).run().await;
    let app = [fake.addr()];
    let control = control::builder()
        .catalog(&catalog(&[
            ("boss", "critical", &app),
            ("chatty", "specialized", &app),
            ("ollama", "performance", &[fake.addr()]),
        ]))
        // 72 generations a minute; no explicit rates.
        .policy_file("ollama.toml", "[ollama.gateway]\ncapacity = \"72/m\"\n")
        .start()
        .await;
    let version = control.wait_version_after(0).await;

    // The shipped phases ask 18 CPUs of 12 and are scaled to 12 granted: a lone critical agent
    // gets its 2-CPU cap (a sixth: 12/m), a specialized one its 0.5 cap (3/m).
    let status = control.status();
    let rate = |phase: &str| status["budget"]["phases"][phase]["agent"]["ollama_rate"].clone();
    assert_eq!(rate("critical"), "12/m", "{status:#}");
    assert_eq!(rate("specialized"), "3/m", "{status:#}");

    let boss = proxy::builder()
        .agent("boss")
        .phase("critical")
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    let chatty = proxy::builder()
        .agent("chatty")
        .phase("specialized")
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    control.wait_applied(version, 2).await;

    // Each sidecar refuses right after its own derived burst, with Retry-After.
    let (passed, refused) = burst(chatty.outbound(), "c", 20).await;
    assert_eq!(passed, 3);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"], "rate_limited");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    // One token comes back every 20 s.
    assert!((1..=20).contains(&retry), "retry-after {retry}");

    let (passed, refused) = burst(boss.outbound(), "b", 20).await;
    assert_eq!(passed, 12);
    assert_eq!(refused.status, 429, "{}", refused.text());

    // The refused calls never left their sidecars.
    assert_eq!(fake.prompts().len(), 15);
    assert!(!fake.prompts().contains(&"c3".to_owned()));
}
