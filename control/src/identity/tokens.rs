//! Per-agent bootstrap tokens: the secret each sidecar presents (from its bootstrap, a compose
//! secret in deployment) when it asks for a certificate. A TOML file of `agent = "token"`
//! lines, read at every request so an added or revoked agent takes effect without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The tokens in force, by agent.
#[derive(Debug, Default)]
pub struct Tokens(HashMap<String, String>);

// === impl Tokens ===

impl Tokens {
    pub async fn read(path: &Path) -> Result<Tokens, TokensError> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| TokensError::Read {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text).map_err(|reason| TokensError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Tokens, String> {
        let table: HashMap<String, String> = toml::from_str(text).map_err(|e| e.to_string())?;
        for (agent, token) in &table {
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{agent}: a token needs at least {MIN_TOKEN_LEN} characters"
                ));
            }
        }
        Ok(Tokens(table))
    }

    /// True when `offered` is `agent`'s token. The comparison takes the same time however
    /// much of a guess is right.
    pub fn admits(&self, agent: &str, offered: &str) -> bool {
        match self.0.get(agent) {
            Some(token) => same_secret(offered.as_bytes(), token.as_bytes()),
            None => false,
        }
    }
}

pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_admits_only_its_own_agent() {
        let t =
            Tokens::parse("a = \"aaaaaaaaaaaaaaaaaaaa\"\nb = \"bbbbbbbbbbbbbbbbbbbb\"\n").unwrap();
        assert!(t.admits("a", "aaaaaaaaaaaaaaaaaaaa"));
        assert!(!t.admits("b", "aaaaaaaaaaaaaaaaaaaa"));
        assert!(!t.admits("c", "aaaaaaaaaaaaaaaaaaaa"));
        assert!(!t.admits("a", ""));
        assert!(Tokens::parse("a = \"short\"").is_err());
        assert!(Tokens::parse("a = 3").is_err());
    }
}
