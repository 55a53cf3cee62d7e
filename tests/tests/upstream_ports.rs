//! Upstream ports (`[[upstreams]]`, as Consul Connect's `local_bind_port`): a local port that
//! stands for one target whatever the Host, so official clients that send the address they
//! were given work unchanged. The `ollama` and `openai` Python clients, pointed at an agent's
//! local Ollama port, reach a fake Ollama through the agent's sidecar and the gateway.

use mesh_tests::ollama::{self, gateway_policy};
use mesh_tests::proxy;
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{client, python, server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_ollama_and_openai_clients_use_the_local_ollama_port_unchanged() {
    let ollama = ollama::fake().chunks(2).run().await;
    let gw = proxy::builder()
        .agent("ollama")
        .ollama_gateway(ollama.addr())
        .snapshot(format!(
            "version = 1\n\n[[services]]\nname = \"a\"\nphase = \"critical\"\n{}",
            gateway_policy(1, "30s", "")
        ))
        .start()
        .await;
    let snap = snapshot(1).service(service("ollama").http2().endpoint(gw.inbound()));
    let a = proxy::builder()
        .agent("a")
        .upstream("ollama")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let base = format!("http://{}", a.upstream("ollama"));
    let out = python::run("ollama_clients.py", &[&base]).await;
    assert_eq!(out["tags"], serde_json::json!(["fake:latest"]), "{out}");
    for key in ["generate", "generate_stream", "chat", "chat_stream"] {
        assert_eq!(out[key], "tok0 tok1 ", "{key}: {out}");
    }
    assert_eq!(out["openai_chat"], "tok0 tok1 ", "{out}");
    assert_eq!(out["openai_chat_stream"], "tok0 tok1 ", "{out}");
    // Six generations, each through the gateway's queue (the model list bypasses it).
    let paths: Vec<String> = ollama.generations().into_iter().map(|g| g.path).collect();
    assert_eq!(
        paths,
        [
            "/api/generate",
            "/api/generate",
            "/api/chat",
            "/api/chat",
            "/v1/chat/completions",
            "/v1/chat/completions"
        ]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_port_routes_to_its_service_whatever_the_host() {
    let b = server::echo().label("b").run().await;
    let c = server::echo().label("c").run().await;
    let snap = snapshot(1)
        .service(service("b").endpoint(b.addr()))
        .service(service("c").endpoint(c.addr()));
    let a = proxy::builder()
        .agent("a")
        .upstream("b")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let port = a.upstream("b");
    for host in ["127.0.0.1", "c", "nobody.mesh"] {
        let reply = client::http1(port).get(host, "/").await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
        assert_eq!(reply.header("x-served-by"), Some("b"), "{host}");
    }
    let reply = client::http2(port).get("c", "/").await;
    assert_eq!(reply.header("x-served-by"), Some("b"));
    // The by-authority port still routes by authority.
    let reply = client::http1(a.outbound()).get("c", "/").await;
    assert_eq!(reply.header("x-served-by"), Some("c"));
    assert_eq!(c.requests(), 1);
}
