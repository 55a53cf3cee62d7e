//! The policy directory, polled for edits. A valid edit replaces the policy in force; an
//! invalid one is rejected with file, line and reason in the log, `/status` and a metric, and
//! the previous policy stays.

use crate::status::{unix_ms, PolicyStatus, Rejection};
use mesh_config::policy::{self, PolicyErrors};
use mesh_config::Policy;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct PolicyWatch {
    pub dir: PathBuf,
    pub every: Duration,
    pub policy: watch::Sender<Arc<Policy>>,
    pub status: watch::Sender<PolicyStatus>,
    /// The files last seen, applied or rejected, so unchanged files are not parsed again.
    pub seen: Vec<(PathBuf, String)>,
}

impl PolicyWatch {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut poll = crate::PollEvery::new(self.every);
        while poll.tick(&mut stop).await {
            let dir = self.dir.clone();
            let files = match tokio::task::spawn_blocking(move || policy::read_dir(&dir)).await {
                Ok(Ok(files)) => files,
                Ok(Err(e)) => {
                    self.reject(&PolicyErrors(vec![e]));
                    continue;
                }
                Err(_) => continue,
            };
            if files == self.seen {
                continue;
            }
            match policy::load_files(&files) {
                Ok(p) => {
                    tracing::info!(dir = %self.dir.display(), "policy applied");
                    ::metrics::counter!(crate::metrics::POLICY_APPLIED).increment(1);
                    ::metrics::gauge!(crate::metrics::POLICY_REJECTED).set(0.0);
                    self.policy.send_replace(Arc::new(p));
                    self.status.send_replace(PolicyStatus {
                        applied_unix_ms: unix_ms(),
                        rejected: None,
                    });
                }
                Err(e) => self.reject(&e),
            }
            self.seen = files;
        }
    }

    fn reject(&self, errors: &PolicyErrors) {
        let errors_text: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
        if self
            .status
            .borrow()
            .rejected
            .as_ref()
            .is_some_and(|r| r.errors == errors_text)
        {
            return;
        }
        for e in &errors_text {
            tracing::error!(error = %e, "policy edit rejected; the previous policy stays in force");
        }
        ::metrics::counter!(crate::metrics::POLICY_REJECTIONS).increment(1);
        ::metrics::gauge!(crate::metrics::POLICY_REJECTED).set(1.0);
        let (file, line, reason) = match errors.first() {
            Some(l) => (l.file.display().to_string(), l.line, l.reason.clone()),
            None => (self.dir.display().to_string(), 0, errors.to_string()),
        };
        self.status.send_modify(|s| {
            s.rejected = Some(Rejection {
                file,
                line,
                reason,
                errors: errors_text,
                at_unix_ms: unix_ms(),
            })
        });
    }
}
