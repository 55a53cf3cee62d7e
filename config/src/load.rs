//! TOML files to typed values. Every error names the file, the line and what is wrong, so an
//! operator can fix a bad edit without reading code.

use crate::snapshot::{Invalid, PathSeg};
use crate::Snapshot;
use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0)]
    Invalid(Located),
}

/// A problem at a place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: PathBuf,
    /// 1-based; 0 when the place is unknown.
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
        } else {
            write!(f, "{}: {}", self.file.display(), self.reason)
        }
    }
}

impl LoadError {
    pub fn located(&self) -> Option<&Located> {
        match self {
            LoadError::Invalid(l) => Some(l),
            LoadError::Read { .. } => None,
        }
    }
}

/// Reads and validates a snapshot file.
pub fn snapshot_file(path: &Path) -> Result<Snapshot, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    snapshot_str(path, &text)
}

/// Parses and validates snapshot text; `origin` names it in errors.
pub fn snapshot_str(origin: &Path, text: &str) -> Result<Snapshot, LoadError> {
    let snap: Snapshot = toml_str(origin, text)?;
    snap.validate()
        .map_err(|e| LoadError::Invalid(locate(origin, text, &e)))?;
    Ok(snap)
}

/// Deserializes TOML strictly; syntax, unknown keys and wrong types carry their line.
pub fn toml_str<T: DeserializeOwned>(origin: &Path, text: &str) -> Result<T, LoadError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        LoadError::Invalid(Located {
            file: origin.to_owned(),
            line,
            reason: e.message().trim().to_owned(),
        })
    })
}

/// Finds the line of a semantic error by walking the document to the value it names.
pub fn locate(origin: &Path, text: &str, err: &Invalid) -> Located {
    let line = span_of(text, &err.path)
        .map(|start| line_of(text, start))
        .unwrap_or(0);
    Located {
        file: origin.to_owned(),
        line,
        reason: err.to_string(),
    }
}

fn span_of(text: &str, path: &[PathSeg]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut best = None;
    for seg in path {
        let next = match seg {
            PathSeg::Key(k) => item.get(*k),
            PathSeg::Name(k) => item.get(k.as_str()),
            PathSeg::Index(i) => item.get(*i),
        };
        match next {
            Some(next) => {
                item = next;
                best = item_start(item).or(best);
            }
            None => break,
        }
    }
    best
}

fn item_start(item: &toml_edit::Item) -> Option<usize> {
    match item {
        toml_edit::Item::Value(v) => v.span().map(|s| s.start),
        toml_edit::Item::Table(t) => t.span().map(|s| s.start),
        toml_edit::Item::ArrayOfTables(a) => a.span().map(|s| s.start),
        toml_edit::Item::None => None,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Snapshot, Located> {
        snapshot_str(Path::new("mesh.toml"), text).map_err(|e| e.located().unwrap().clone())
    }

    #[test]
    fn valid_file_loads() {
        let snap = load(
            r#"
version = 7
[defaults]
timeout = "10s"

[[services]]
name = "senior-ai-engineer"
phase = "critical"
protocol = "http2"
endpoints = ["127.0.0.1:10300", "127.0.0.1:10301"]

[[routes]]
authority = "senior-ai-engineer"
path_prefix = "/v2"
headers = { x-canary = "1" }
backend = "senior-ai-engineer"
timeout = "2s"
"#,
        )
        .unwrap();
        assert_eq!(snap.version, 7);
        assert_eq!(snap.services[0].endpoints.len(), 2);
        assert_eq!(
            snap.routes[0].timeout,
            Some(std::time::Duration::from_secs(2))
        );
    }

    #[test]
    fn unknown_key_names_its_line() {
        let err = load("version = 1\n\n[[services]]\nname = \"a\"\nendpoint = []\n").unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.reason.contains("endpoint"), "{err}");
    }

    #[test]
    fn bad_address_names_its_line() {
        let err = load("version = 1\n[[services]]\nname = \"a\"\nendpoints = [\"nowhere\"]\n")
            .unwrap_err();
        assert_eq!(err.line, 4, "{err}");
    }

    #[test]
    fn unknown_backend_names_its_line() {
        let err = load(
            "version = 1\n[[services]]\nname = \"a\"\n\n[[routes]]\nauthority = \"a\"\nbackend = \"b\"\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 7, "{err}");
        assert_eq!(
            err.to_string(),
            "mesh.toml:7: routes[0].backend: unknown service \"b\""
        );
    }

    #[test]
    fn ollama_policy_loads_and_bad_values_name_their_line() {
        let snap = load(
            "version = 1\n[ollama.gateway]\nparallel = 2\nqueue = { critical = 8 }\n\
             [ollama.rate_limit]\ncritical = \"2/s\"\n\
             [ollama.agents.senior-ai-engineer]\nmax_context_size = 4096\ntimeout = \"120s\"\n",
        )
        .unwrap();
        assert_eq!(snap.ollama.gateway.parallel, 2);
        assert_eq!(snap.ollama.gateway.queue.critical, 8);
        assert_eq!(
            snap.ollama.limits("senior-ai-engineer").max_context_size,
            Some(4096)
        );

        let err = load("version = 1\n[ollama.gateway]\nparallel = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "mesh.toml:3: ollama.gateway.parallel: must be at least 1"
        );
        let err = load("version = 1\n[ollama.agents.a]\nmax_tokens = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "mesh.toml:3: ollama.agents.a.max_tokens: must be at least 1"
        );
        let err = load("version = 1\n[ollama.rate_limit]\ncritical = \"fast\"\n").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
    }

    #[test]
    fn duplicate_service_names_its_line() {
        let err = load("version = 1\n[[services]]\nname = \"a\"\n[[services]]\nname = \"a\"\n")
            .unwrap_err();
        assert_eq!(err.line, 5, "{err}");
    }
}
