//! Wires the control process: a catalog source (Consul or file) -> the guard -> the snapshot
//! builder, the policy watch, and the HTTP API.

use crate::catalog_file::{self, CatalogFile};
use crate::consul::watch::{ConsulWatch, Params};
use crate::consul::{ConsulClient, ConsulError};
use crate::guard::Guard;
use crate::policy_watch::PolicyWatch;
use crate::push::{Confirmer, Push};
use crate::snapshots::{Generation, Snapshots};
use crate::status::{unix_ms, DiscoveryStatus, PolicyStatus, Sidecars, Status};
use mesh_config::policy::{self, PolicyErrors};
use mesh_config::{Catalog, LoadError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Where the catalog comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A Consul agent's HTTP API (`host:port`), watched with blocking queries.
    Consul { address: String, params: Params },
    /// A catalog TOML file, polled.
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub policy_dir: PathBuf,
    pub source: Source,
    /// How often the policy directory and a catalog file are checked for edits.
    pub poll_interval: Duration,
    /// A catalog losing more than this share of its services or endpoints at once is held
    /// back (see [`crate::guard`]); 100 never holds.
    pub max_catalog_drop_percent: u8,
    /// Bearer token for `POST /v1/catalog/confirm`; without one the call is refused.
    pub confirm_token: Option<String>,
    /// The mesh CA; `None` signs no certificates.
    pub identity: Option<IdentityConfig>,
    /// Where the published catalog is kept, so a restart judges its first read against it
    /// (see [`crate::guard`]); `None` judges the first read on its own.
    pub catalog_state: Option<PathBuf>,
}

/// The control process as the mesh's certificate authority.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    pub ca: crate::identity::ca::CaSource,
    /// The SPIFFE trust domain: certificates name `spiffe://<trust_domain>/agent/<name>`.
    pub trust_domain: String,
    /// How long a sidecar's certificate is valid; sidecars renew at two thirds of it.
    pub lifetime: Duration,
    /// The per-agent bootstrap tokens file (see [`crate::identity::tokens`]).
    pub tokens: PathBuf,
    /// The names and addresses sidecars dial the control channel at: its TLS certificate's
    /// SANs.
    pub server_names: crate::identity::channel::ServerNames,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Policy(#[from] PolicyErrors),
    #[error("{0}")]
    Catalog(#[from] LoadError),
    #[error("{0}")]
    Consul(#[from] ConsulError),
    #[error("mesh CA: {0}")]
    Identity(#[from] crate::identity::ca::CaError),
    #[error("{0}")]
    Channel(#[from] crate::identity::channel::ChannelError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A started control process; [`Running::shutdown`] stops it and closes every connection.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
    generations: watch::Receiver<Arc<Generation>>,
    sidecars: Arc<Sidecars>,
    status: Status,
}

/// Loads the policy (an invalid one stops the start), binds, and runs every task on the
/// current runtime.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let prometheus = crate::metrics::install();
    let identity = match &cfg.identity {
        Some(id) => Some(Arc::new(crate::identity::Identity {
            ca: crate::identity::ca::Ca::load(&id.ca, &id.trust_domain, id.lifetime)?,
            tokens: id.tokens.clone(),
        })),
        None => None,
    };
    // The mesh CA serves its channel over TLS with a certificate of its own issue.
    let tls = match (&identity, &cfg.identity) {
        (Some(identity), Some(id)) => Some(Arc::new(crate::identity::channel::ChannelTls::new(
            &identity.ca,
            &id.trust_domain,
            id.server_names.clone(),
        )?)),
        _ => None,
    };
    let dir = cfg.policy_dir.clone();
    let files = policy::read_dir(&dir).map_err(|e| PolicyErrors(vec![e]))?;
    let initial_policy = policy::load_dir(&dir)?;
    let (policy_tx, policy_rx) = watch::channel(Arc::new(initial_policy));
    let (policy_status, policy_status_rx) = watch::channel(PolicyStatus {
        applied_unix_ms: unix_ms(),
        rejected: None,
    });

    let (stop, stopped) = watch::channel(false);
    let (candidates_tx, candidates_rx) = watch::channel(None);
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(Catalog::default()));
    let source_name = match cfg.source {
        Source::Consul { .. } => "consul",
        Source::File(_) => "file",
    };
    let (discovery, discovery_rx) = watch::channel(DiscoveryStatus {
        source: source_name,
        // Nothing discovered yet: say so until the first catalog arrives.
        stale: matches!(cfg.source, Source::Consul { .. }),
        ..Default::default()
    });
    match &cfg.source {
        Source::File(path) => {
            let (catalog, text) = catalog_file::load(path)?;
            candidates_tx.send_replace(Some(Arc::new(catalog)));
            discovery.send_modify(|s| s.synced_unix_ms = unix_ms());
            let file = CatalogFile {
                path: path.clone(),
                every: cfg.poll_interval,
                catalog: candidates_tx,
                status: discovery,
                current: text,
            };
            tokio::spawn(file.run(stopped.clone()));
        }
        Source::Consul { address, params } => {
            let watch = ConsulWatch {
                client: ConsulClient::new(address)?,
                params: *params,
                catalog: candidates_tx,
                status: discovery,
            };
            tokio::spawn(watch.run(stopped.clone()));
        }
    };
    let (held_tx, held_rx) = watch::channel(None);
    let (confirm_tx, confirm_rx) = tokio::sync::mpsc::channel(8);
    let guard = Guard {
        max_drop_percent: cfg.max_catalog_drop_percent,
        candidates: candidates_rx,
        out: catalog_tx,
        held: held_tx,
        confirms: confirm_rx,
        state: cfg.catalog_state.clone(),
    };
    // The guard sees the file's catalog (already in the channel) as its first change.
    tokio::spawn(guard.run(stopped.clone()));

    let policy = PolicyWatch {
        dir,
        every: cfg.poll_interval,
        policy: policy_tx,
        status: policy_status,
        seen: files,
    };
    tokio::spawn(policy.run(stopped.clone()));

    let (gen_tx, gen_rx) = watch::channel(Arc::new(Generation::default()));
    let (invalid_tx, invalid_rx) = watch::channel(None);
    let builder = Snapshots {
        catalog: catalog_rx,
        policy: policy_rx,
        out: gen_tx,
        invalid: invalid_tx,
        synced: false,
    };
    tokio::spawn(builder.run(stopped.clone()));

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let sidecars = Arc::new(Sidecars::default());
    let status = Status {
        discovery: discovery_rx,
        policy: policy_status_rx,
        generations: gen_rx.clone(),
        held: held_rx,
        invalid: invalid_rx,
        sidecars: sidecars.clone(),
    };
    let push = Push {
        generations: gen_rx.clone(),
        sidecars: sidecars.clone(),
        status: status.clone(),
        prometheus,
        confirm: Confirmer {
            token: cfg.confirm_token.clone(),
            guard: confirm_tx,
        },
        identity: identity.clone(),
        tls: tls.clone(),
    };
    if let (Some(tls), Some(identity)) = (tls, identity) {
        tokio::spawn(tls.renew(identity, stopped.clone()));
    }
    let served = tokio::spawn(push.serve(listener, stopped));
    tracing::info!(%addr, source = source_name, policy = %cfg.policy_dir.display(),
        tls = cfg.identity.is_some(), "control ready");
    Ok(Running {
        addr,
        stop,
        served,
        generations: gen_rx,
        sidecars,
        status,
    })
}

// === impl Running ===

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The generations served; version 0 until a first catalog passes the guard.
    pub fn generations(&self) -> watch::Receiver<Arc<Generation>> {
        self.generations.clone()
    }

    pub fn sidecars(&self) -> &Arc<Sidecars> {
        &self.sidecars
    }

    /// The same document `/status` serves.
    pub fn status(&self) -> serde_json::Value {
        self.status.render()
    }

    /// Stops every task; returns once the listener and every connection are closed, so a
    /// caller that connects afterwards is refused.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.served.await;
    }
}
