//! Mesh identity in the rendered deployment: compose secrets (files under
//! [`SECRETS_DIR`], made by `mesh-control secrets`, never checked in) and the sidecar
//! bootstrap's `[identity]`.
//!
//! Each sidecar mounts the mesh CA certificate (its trust anchor for the control channel) and
//! its own agent's bootstrap token, nothing else: one agent's sidecar cannot read another's
//! token. mesh-control mounts the CA key, the tokens file and the operator token.

use mesh_config::Registry;
use std::fmt::Write;

/// Where the secret files live, relative to the repository root (gitignored).
pub const SECRETS_DIR: &str = "deploy/secrets";
/// Inside a container, compose mounts secret `NAME` at `/run/secrets/NAME`.
pub const CA_IN_CONTAINER: &str = "/run/secrets/mesh-ca";
pub const TOKEN_IN_CONTAINER: &str = "/run/secrets/agent-token";

/// The secret files, relative to [`SECRETS_DIR`].
pub const CA_CERT_FILE: &str = "ca/ca.pem";
pub const CA_KEY_FILE: &str = "ca/ca-key.pem";
pub const TOKENS_FILE: &str = "agent-tokens.toml";
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

/// One agent's bootstrap token file, relative to [`SECRETS_DIR`].
pub fn token_file(agent: &str) -> String {
    format!("agents/{agent}.token")
}

/// The `[identity]` section of a sidecar bootstrap.
pub fn sidecar_identity() -> String {
    format!(
        r#"
# Mesh identity: a certificate from mesh-control's CA (spiffe://mesh/agent/<name>), asked for
# with this agent's bootstrap token (a compose secret) over the TLS control channel.
[identity]
token_file = "{TOKEN_IN_CONTAINER}"
"#
    )
}

/// The `secrets:` of `agent`'s sidecar service: the CA and its own token only.
pub fn sidecar_mounts(agent: &str) -> String {
    format!(
        "    secrets:\n      - mesh-ca\n      - source: token-{agent}\n        target: agent-token\n"
    )
}

/// The compose file's top-level `secrets:`: every file `mesh-control secrets` makes.
pub fn top_level(registry: &Registry) -> String {
    let mut s = format!(
        "\n# Made by `mesh-control secrets` under {SECRETS_DIR}/ (never checked in; deploy/README.md).\n\
         secrets:\n  mesh-ca:\n    file: ./{SECRETS_DIR}/{CA_CERT_FILE}\n  \
         mesh-ca-key:\n    file: ./{SECRETS_DIR}/{CA_KEY_FILE}\n  \
         agent-tokens:\n    file: ./{SECRETS_DIR}/{TOKENS_FILE}\n  \
         operator-token:\n    file: ./{SECRETS_DIR}/{OPERATOR_TOKEN_FILE}\n"
    );
    let agents = registry.agents.iter().map(|a| a.name.as_str());
    for agent in agents.chain(["ollama"]) {
        let _ = write!(
            s,
            "  token-{agent}:\n    file: ./{SECRETS_DIR}/{}\n",
            token_file(agent)
        );
    }
    s
}
