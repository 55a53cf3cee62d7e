//! The sidecar's identity: a key it makes itself and a short-lived certificate the control
//! process's CA signs for it (`spiffe://<mesh>/agent/<name>`).
//!
//! [`Identity`] holds the credentials in force behind an `ArcSwap`: a renewal swaps them in
//! one pointer store, so connections already made keep their handshake and new handshakes
//! take the new certificate; nothing is dropped. [`renew::Renewer`] asks for the first
//! certificate and renews at two thirds of its lifetime; while the control process is away
//! the current certificate keeps serving and the log says how long it has left.

pub mod credentials;
pub mod renew;
pub mod resolver;

pub use credentials::Credentials;

use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::time::SystemTime;

/// The credentials in force, if any yet.
#[derive(Debug, Default)]
pub struct Identity {
    current: ArcSwapOption<Credentials>,
}

// === impl Identity ===

impl Identity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Puts `creds` in force for every handshake from now on.
    pub fn install(&self, creds: Credentials) {
        let expiry = creds
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        ::metrics::gauge!(crate::metrics::IDENTITY_EXPIRY).set(expiry);
        self.current.store(Some(Arc::new(creds)));
    }
}
