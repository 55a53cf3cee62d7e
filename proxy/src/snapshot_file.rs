//! The snapshot source until the control process takes over: a TOML file, polled. Polling
//! survives editors that replace files by rename and volumes that do not deliver inotify.

use crate::state::State;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct SnapshotFile {
    pub path: PathBuf,
    pub every: Duration,
    pub state: Arc<State>,
    /// The text in force, so unchanged files are not parsed again.
    pub current: String,
}

impl SnapshotFile {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read_failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::drain::stopped(&mut stop) => return,
            }
            let text = match tokio::fs::read_to_string(&self.path).await {
                Ok(text) => {
                    read_failing = false;
                    text
                }
                Err(e) => {
                    if !read_failing {
                        tracing::warn!(file = %self.path.display(), error = %e,
                            "cannot read snapshot file; keeping the snapshot in force");
                        read_failing = true;
                    }
                    continue;
                }
            };
            if text == self.current {
                continue;
            }
            match mesh_config::load::snapshot_str(&self.path, &text) {
                Ok(snapshot) => {
                    tracing::info!(file = %self.path.display(), version = snapshot.version,
                        "snapshot applied");
                    self.state.apply(snapshot);
                }
                Err(e) => {
                    tracing::error!(error = %e, in_force = self.state.load().version(),
                        "snapshot rejected; keeping the snapshot in force");
                    self.state.reject();
                }
            }
            self.current = text;
        }
    }
}
