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
pub mod tls;

pub use credentials::Credentials;

use arc_swap::ArcSwapOption;
use mesh_config::identity::MtlsMode;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The credentials in force, if any yet, the TLS configurations trusting their CA, and the
/// mesh's mutual-TLS mode from the snapshot in force.
#[derive(Debug)]
pub struct Identity {
    trust_domain: String,
    current: ArcSwapOption<Credentials>,
    configs: ArcSwapOption<tls::TlsConfigs>,
    mode: AtomicU8,
}

/// Why an inbound TLS connection was not accepted (a label of
/// `agent_tls_handshake_failures_total`).
pub type Refusal = &'static str;

// === impl Identity ===

impl Identity {
    pub fn new(trust_domain: &str) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.to_owned(),
            current: ArcSwapOption::empty(),
            configs: ArcSwapOption::empty(),
            mode: AtomicU8::new(MtlsMode::Off as u8),
        })
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Puts `creds` in force for every handshake from now on; a new CA gets new TLS
    /// configurations (connections already made keep theirs).
    pub fn install(self: &Arc<Self>, creds: Credentials) {
        let expiry = creds
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        ::metrics::gauge!(crate::metrics::IDENTITY_EXPIRY).set(expiry);
        let same_ca = self
            .current
            .load()
            .as_ref()
            .is_some_and(|c| c.ca_pem == creds.ca_pem);
        let roots = creds.roots.clone();
        self.current.store(Some(Arc::new(creds)));
        if !same_ca || self.configs.load().is_none() {
            match tls::configs(self, roots, &self.trust_domain) {
                Ok(c) => self.configs.store(Some(Arc::new(c))),
                Err(e) => tracing::error!(error = %e, "cannot build the TLS configuration"),
            }
        }
    }

    pub fn mode(&self) -> MtlsMode {
        match self.mode.load(Relaxed) {
            1 => MtlsMode::Permissive,
            2 => MtlsMode::Strict,
            _ => MtlsMode::Off,
        }
    }

    /// The client configuration for dialling a peer sidecar, when this sidecar dials over
    /// mutual TLS: it has a certificate and the mesh is `permissive` or `strict`.
    pub fn dial(&self, h2: bool) -> Option<Arc<rustls::ClientConfig>> {
        if self.mode() == MtlsMode::Off {
            return None;
        }
        let configs = self.configs.load();
        let c = configs.as_ref()?;
        Some(if h2 {
            c.client_h2.clone()
        } else {
            c.client_http1.clone()
        })
    }

    /// Completes a TLS handshake on an inbound connection; answers the stream and the calling
    /// agent its certificate names.
    pub async fn accept(
        &self,
        stream: TcpStream,
        limit: Duration,
    ) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Arc<str>), Refusal> {
        let Some(configs) = self.configs.load_full() else {
            return Err("no_local_certificate");
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(configs.server.clone());
        let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(tls::failure_reason(&e)),
            Err(_) => return Err("timeout"),
        };
        let agent = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| tls::peer_agent(leaf, &self.trust_domain));
        match agent {
            Some(a) => Ok((tls, a.into())),
            None => Err("not_a_mesh_agent"),
        }
    }

    /// Follows the mesh's mutual-TLS mode in the snapshots `state` applies.
    pub async fn follow_mode(
        self: Arc<Self>,
        state: Arc<crate::state::State>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut versions = state.versions();
        loop {
            let mode = state.load().snapshot.identity.mode;
            if mode != self.mode() {
                tracing::info!(mode = mode.as_str(), "mutual TLS mode");
                self.mode.store(mode as u8, Relaxed);
            }
            tokio::select! {
                res = versions.changed() => if res.is_err() { return },
                _ = crate::drain::stopped(&mut stop) => return,
            }
        }
    }
}
