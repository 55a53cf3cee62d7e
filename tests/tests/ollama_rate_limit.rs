//! The caller-side rate limit: each agent's sidecar holds a token bucket for its Ollama calls,
//! sized by the snapshot's rate for the agent's phase. Calls over it get 429 + Retry-After from
//! the agent's own sidecar and never reach Ollama.

use http::Method;
use mesh_tests::ollama;
use mesh_tests::proxy;
use mesh_tests::{body, bounded, client};

fn snapshot(ollama: std::net::SocketAddr, rates: &str) -> String {
    format!(
        "version = 1\n\n[[services]]\nname = \"ollama\"\nendpoints = [\"{ollama}\"]\n\n\
         [ollama.rate_limit]\n{rates}\n"
    )
}

async fn generate(outbound: std::net::SocketAddr, prompt: &str) -> client::Reply {
    let c = client::http1(outbound);
    let req = c
        .request(Method::POST, "ollama", "/api/generate")
        .body(body::full(format!("{{\"prompt\":{prompt:?}}}")))
        .unwrap();
    bounded("a call to ollama", c.send(req)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_phase_rate_get_429_at_the_callers_own_sidecar() {
    let ollama = ollama::fake().chunks(0).run().await;
    // Two calls a minute for specialized agents; critical agents are not limited.
    let rates = "specialized = \"2/m\"";
    let chatty = proxy::builder()
        .agent("chatty")
        .phase("specialized")
        .snapshot(snapshot(ollama.addr(), rates))
        .start()
        .await;
    let critical = proxy::builder()
        .agent("boss")
        .phase("critical")
        .snapshot(snapshot(ollama.addr(), rates))
        .start()
        .await;

    assert_eq!(generate(chatty.outbound(), "c1").await.status, 200);
    assert_eq!(generate(chatty.outbound(), "c2").await.status, 200);
    let over = generate(chatty.outbound(), "c3").await;
    assert_eq!(over.status, 429, "{}", over.text());
    let retry: u64 = over
        .header("retry-after")
        .expect("429 carries Retry-After")
        .parse()
        .unwrap();
    // One token comes back every 30 s.
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(over.json()["error"], "rate_limited");

    // Listing models is not a generation and is not counted.
    let tags = client::http1(chatty.outbound())
        .get("ollama", "/api/tags")
        .await;
    assert_eq!(tags.status, 200);
    for i in 0..3 {
        let prompt = format!("b{i}");
        assert_eq!(generate(critical.outbound(), &prompt).await.status, 200);
    }
    assert_eq!(ollama.prompts(), ["c1", "c2", "b0", "b1", "b2"]);
}
