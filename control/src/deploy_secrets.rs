//! `mesh-control secrets`: makes the files the rendered deployment's compose secrets name,
//! under `deploy/secrets/` (gitignored): the mesh CA, a random bootstrap token per agent of
//! the registry (and the Ollama gateway), mesh-control's tokens file built from them, and the
//! operator token.
//!
//! Idempotent: existing CA, token and operator files are kept, so re-running after adding an
//! agent adds its token only; the tokens file is rebuilt every time, so an agent taken out of
//! the registry loses its token (mesh-control reads the file at every request).
//!
//! Permissions: the directory is the operator's only (0700). Compose mounts file secrets as
//! bind mounts and, outside swarm, ignores `uid`/`mode`, while every container runs as uid
//! 65532: so the files are world-readable (0644) inside that private directory, and each
//! container sees only the secrets its service lists.

use crate::identity::ca::{Ca, CaSource};
use crate::render::secrets::{
    token_file, CA_CERT_FILE, CA_KEY_FILE, OPERATOR_TOKEN_FILE, SECRETS_DIR, TOKENS_FILE,
};
use mesh_config::Registry;
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Random bytes per token (hex-encoded: 64 characters).
const TOKEN_BYTES: usize = 32;

/// Makes what is missing under `root`/[`SECRETS_DIR`]; answers the files written.
pub fn generate(root: &Path, registry: &Registry) -> Result<Vec<PathBuf>, String> {
    let dir = root.join(SECRETS_DIR);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |e: std::io::Error| format!("{path}: {e}")
    };
    std::fs::create_dir_all(dir.join("agents")).map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
    let mut written = Vec::new();

    let ca_cert = dir.join(CA_CERT_FILE);
    let ca_key = dir.join(CA_KEY_FILE);
    // Made here unless the operator brought a pair, which is checked as mesh-control will.
    let made = !ca_cert.exists() && !ca_key.exists();
    let source = if made {
        CaSource::StateDir(ca_cert.parent().unwrap_or(&dir).to_owned())
    } else {
        CaSource::Files {
            cert: ca_cert.clone(),
            key: ca_key.clone(),
        }
    };
    // The lifetime of leaves is mesh-control's to choose; none is signed here.
    Ca::load(&source, "mesh", Duration::from_secs(3600)).map_err(|e| e.to_string())?;
    if made {
        written.push(ca_cert.clone());
        written.push(ca_key.clone());
    }
    let mut tokens = String::from(
        "# Made by `mesh-control secrets` from deploy/secrets/agents/: do not edit.\n",
    );
    let agents = registry.agents.iter().map(|a| a.name.as_str());
    for agent in agents.chain(["ollama"]) {
        let path = dir.join(token_file(agent));
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                let t = random_token()?;
                std::fs::write(&path, format!("{t}\n")).map_err(io(&path))?;
                written.push(path.clone());
                t
            }
        };
        let _ = writeln!(tokens, "{agent} = {token:?}");
    }
    let tokens_path = dir.join(TOKENS_FILE);
    if std::fs::read_to_string(&tokens_path).ok().as_deref() != Some(tokens.as_str()) {
        std::fs::write(&tokens_path, tokens).map_err(io(&tokens_path))?;
        written.push(tokens_path);
    }
    let operator = dir.join(OPERATOR_TOKEN_FILE);
    if !operator.exists() {
        std::fs::write(&operator, format!("{}\n", random_token()?)).map_err(io(&operator))?;
        written.push(operator);
    }
    for path in [&ca_cert, &ca_key] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io(path))?;
    }
    for path in &written {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io(path))?;
    }
    Ok(written)
}

/// A token from the kernel's CSPRNG, hex.
fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(bytes
        .iter()
        .fold(String::with_capacity(TOKEN_BYTES * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_kept_across_runs() {
        let registry = mesh_config::registry::load_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh/agents.toml"),
        )
        .unwrap();
        let root = tempfile::tempdir().unwrap();
        let first = generate(root.path(), &registry).unwrap();
        // CA pair, one token per agent and the gateway, tokens file, operator token.
        assert_eq!(first.len(), 2 + registry.agents.len() + 1 + 2);
        let dir = root.path().join(SECRETS_DIR);
        let a = std::fs::read_to_string(dir.join(token_file(&registry.agents[0].name))).unwrap();
        let b = std::fs::read_to_string(dir.join(token_file(&registry.agents[1].name))).unwrap();
        assert_eq!(a.trim().len(), 64);
        assert_ne!(a, b);
        let tokens = crate::identity::tokens::Tokens::parse(
            &std::fs::read_to_string(dir.join(TOKENS_FILE)).unwrap(),
        )
        .unwrap();
        assert!(tokens.admits(&registry.agents[0].name, a.trim()));
        assert!(!tokens.admits(&registry.agents[1].name, a.trim()));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Nothing to do the second time: every file kept.
        assert!(generate(root.path(), &registry).unwrap().is_empty());
        let again = std::fs::read_to_string(dir.join(token_file(&registry.agents[0].name)));
        assert_eq!(again.unwrap(), a);
        // A CA certificate without its key is refused, naming the file.
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        let err = generate(root.path(), &registry).unwrap_err();
        assert!(err.contains("ca-key.pem"), "{err}");
    }
}
