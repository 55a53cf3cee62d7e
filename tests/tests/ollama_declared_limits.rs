//! The registry's Rule 23 declarations reach the Ollama gateway: mesh-control reads the
//! registry with the policy, and an agent with no `[ollama.agents]` entry is held to the
//! `max_context_size` it declares. (Its own binary: the control tests beside it count a
//! process-wide metric.)

use mesh_tests::control::{self, catalog};
use mesh_tests::{client, proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrys_rule_23_declarations_bound_each_agents_ollama_calls() {
    // The shipped registry declares document-knowledge-manager with max_context_size 2048;
    // no [ollama.agents] entry names it. The control process pushes the declaration and the
    // Ollama gateway enforces it.
    let fake = mesh_tests::ollama::fake().chunks(0).run().await;
    let control = control::builder()
        .catalog(&catalog(&[(
            "document-knowledge-manager",
            "specialized",
            &[control::NOT_LISTENING],
        )]))
        .start()
        .await;
    let v = control.wait_version_after(0).await;
    let gw = proxy::builder()
        .agent("ollama")
        .ollama_gateway(fake.addr())
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    control.wait_applied(v, 1).await;
    let c = client::http1(gw.inbound());
    let req = c
        .request(http::Method::POST, "ollama", "/api/chat")
        .header("x-mesh-caller", "document-knowledge-manager")
        .body(mesh_tests::body::full(
            r#"{"model":"fake","options":{"num_ctx":4096}}"#,
        ))
        .unwrap();
    let reply = mesh_tests::bounded("a call over the declared context", c.send(req)).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains("above document-knowledge-manager's max_context_size 2048"),
        "{}",
        reply.text()
    );
    assert!(fake.generations().is_empty());
    gw.shutdown().await;
}
