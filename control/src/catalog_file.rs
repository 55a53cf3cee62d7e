//! The catalog from a TOML file: the default for local runs and tests, polled for edits.
//! Produces the same [`Catalog`] as Consul discovery; an invalid edit keeps the last catalog.

use crate::status::{unix_ms, DiscoveryStatus};
use mesh_config::{catalog, Catalog, LoadError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct CatalogFile {
    pub path: PathBuf,
    pub every: Duration,
    /// Candidates for the guard; `Some` from the start (the file is read before).
    pub catalog: watch::Sender<Option<Arc<Catalog>>>,
    pub status: watch::Sender<DiscoveryStatus>,
    /// The text in force, so an unchanged file is not parsed again.
    pub current: String,
}

/// Reads the file at start; an invalid file stops the start.
pub fn load(path: &Path) -> Result<(Catalog, String), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok((catalog::catalog_str(path, &text)?, text))
}

impl CatalogFile {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut poll = crate::PollEvery::new(self.every);
        while poll.tick(&mut stop).await {
            let text = match tokio::fs::read_to_string(&self.path).await {
                Ok(text) => text,
                Err(e) => {
                    self.failed(format!("{}: cannot read: {e}", self.path.display()));
                    continue;
                }
            };
            if text == self.current {
                continue;
            }
            match catalog::catalog_str(&self.path, &text) {
                Ok(cat) => {
                    tracing::info!(file = %self.path.display(), services = cat.services.len(),
                        "catalog file applied");
                    self.catalog.send_replace(Some(Arc::new(cat)));
                    self.status.send_modify(|s| {
                        s.last_error = None;
                        s.synced_unix_ms = unix_ms();
                    });
                }
                Err(e) => {
                    ::metrics::counter!(crate::metrics::CATALOG_FILE_REJECTIONS).increment(1);
                    self.failed(e.to_string());
                }
            }
            self.current = text;
        }
    }

    fn failed(&self, error: String) {
        let new = self.status.borrow().last_error.as_ref() != Some(&error);
        if new {
            tracing::error!(%error, "catalog file rejected; keeping the catalog in force");
            self.status.send_modify(|s| s.last_error = Some(error));
        }
    }
}
