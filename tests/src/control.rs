//! The control process under test, in-process through `mesh_control::start`: a temporary
//! directory holds its policy files (a copy of the shipped `config/mesh`) and, unless it
//! watches a Consul double, its catalog file; the test may rewrite both. The control process
//! can be stopped and started again on the same address.
//!
//! ```ignore
//! let control = control::builder().catalog(&catalog(&[("b", "critical", &[b.addr()])])).start().await;
//! let proxy = proxy::builder().bootstrap_extra(&control.sidecar_toml(None)).start().await;
//! ```

use crate::bounded;
use mesh_control::consul::watch::Params;
use mesh_control::snapshots::Generation;
use mesh_control::{Config, Running, Source};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// A catalog endpoint for an agent that is never called in a test (or not started yet): the
/// discard port on loopback, where nothing listens.
pub const NOT_LISTENING: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9));

pub struct Builder {
    catalog: String,
    consul: Option<SocketAddr>,
    policy: Vec<(String, String)>,
    max_catalog_drop_percent: u8,
    confirm_token: Option<String>,
    identity: Option<(Vec<(String, String)>, Duration)>,
    byo_ca: Option<(String, String)>,
}

pub struct TestControl {
    running: Option<Running>,
    cfg: Config,
    addr: SocketAddr,
    dir: TempDir,
    /// Where the CA's `ca.pem` and `ca-key.pem` are.
    ca_dir: PathBuf,
}

pub fn builder() -> Builder {
    Builder {
        catalog: String::new(),
        consul: None,
        policy: Vec::new(),
        max_catalog_drop_percent: mesh_control::guard::DEFAULT_MAX_DROP_PERCENT,
        confirm_token: None,
        identity: None,
        byo_ca: None,
    }
}

/// Catalog file text for `(name, phase, endpoints)` entries.
pub fn catalog(services: &[(&str, &str, &[SocketAddr])]) -> String {
    let mut out = String::new();
    for (name, phase, eps) in services {
        let eps: Vec<String> = eps.iter().map(|a| format!("{:?}", a.to_string())).collect();
        out.push_str(&format!(
            "[[services]]\nname = {name:?}\nphase = {phase:?}\nendpoints = [{}]\n\n",
            eps.join(", ")
        ));
    }
    out
}

/// The shipped policy directory (`config/mesh`).
pub fn shipped_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh")
}

// === impl Builder ===

impl Builder {
    pub fn catalog(mut self, text: &str) -> Self {
        self.catalog = text.to_owned();
        self
    }

    /// Discovers from a Consul (double) instead of a catalog file.
    pub fn consul(mut self, addr: SocketAddr) -> Self {
        self.consul = Some(addr);
        self
    }

    /// `--max-catalog-drop`: the largest share of services or endpoints a catalog may lose
    /// at once before it is held back.
    pub fn max_catalog_drop(mut self, percent: u8) -> Self {
        self.max_catalog_drop_percent = percent;
        self
    }

    /// `MESH_CONTROL_TOKEN`: enables `POST /v1/catalog/confirm` with this bearer token.
    pub fn confirm_token(mut self, token: &str) -> Self {
        self.confirm_token = Some(token.to_owned());
        self
    }

    /// Makes the control process the mesh CA (trust domain `mesh`, CA kept in its temporary
    /// state directory) for agents with these bootstrap tokens, signing certificates valid
    /// for `lifetime`.
    pub fn identity(mut self, tokens: &[(&str, &str)], lifetime: Duration) -> Self {
        let tokens = tokens
            .iter()
            .map(|(a, t)| ((*a).to_owned(), (*t).to_owned()))
            .collect();
        self.identity = Some((tokens, lifetime));
        self
    }

    /// With `identity`: the operator's own CA (certificate and key, PEM) instead of one made
    /// in the state directory.
    pub fn byo_ca(mut self, cert_pem: &str, key_pem: &str) -> Self {
        self.byo_ca = Some((cert_pem.to_owned(), key_pem.to_owned()));
        self
    }

    /// Adds or replaces a policy file (by name) in the copied policy directory.
    pub fn policy_file(mut self, name: &str, text: &str) -> Self {
        self.policy.push((name.to_owned(), text.to_owned()));
        self
    }

    pub async fn start(self) -> TestControl {
        let dir = tempfile::tempdir().expect("temp dir for control files");
        let policy_dir = dir.path().join("policy");
        std::fs::create_dir(&policy_dir).expect("policy dir");
        for entry in std::fs::read_dir(shipped_policy()).expect("read config/mesh") {
            let path = entry.expect("dir entry").path();
            std::fs::copy(&path, policy_dir.join(path.file_name().expect("file name")))
                .expect("copy a policy file");
        }
        for (name, text) in &self.policy {
            std::fs::write(policy_dir.join(name), text).expect("write a policy file");
        }
        let source = match self.consul {
            Some(addr) => Source::Consul {
                address: addr.to_string(),
                params: Params {
                    wait: Duration::from_secs(5),
                    min_interval: Duration::from_millis(50),
                    backoff_base: Duration::from_millis(20),
                    backoff_max: Duration::from_millis(200),
                    probe_interval: Duration::from_millis(50),
                    probe_timeout: Duration::from_millis(500),
                    health: Default::default(),
                },
            },
            None => {
                let path = dir.path().join("catalog.toml");
                std::fs::write(&path, &self.catalog).expect("write the catalog file");
                Source::File(path)
            }
        };
        let ca_dir = match &self.byo_ca {
            Some((cert, key)) => {
                let byo = dir.path().join("byo");
                std::fs::create_dir(&byo).expect("byo dir");
                std::fs::write(byo.join("ca.pem"), cert).expect("write the CA certificate");
                std::fs::write(byo.join("ca-key.pem"), key).expect("write the CA key");
                byo
            }
            None => dir.path().join("state"),
        };
        let ca = match self.byo_ca {
            Some(_) => mesh_control::identity::ca::CaSource::Files {
                cert: ca_dir.join("ca.pem"),
                key: ca_dir.join("ca-key.pem"),
            },
            None => mesh_control::identity::ca::CaSource::StateDir(ca_dir.clone()),
        };
        let identity = self.identity.map(|(tokens, lifetime)| {
            let path = dir.path().join("agent-tokens.toml");
            let text: String = tokens
                .iter()
                .map(|(a, t)| format!("{a} = {t:?}\n"))
                .collect();
            std::fs::write(&path, text).expect("write the tokens file");
            mesh_control::IdentityConfig {
                ca,
                trust_domain: "mesh".into(),
                lifetime,
                tokens: path,
                server_names: mesh_control::identity::channel::ServerNames {
                    dns: vec!["localhost".into()],
                    ips: vec![std::net::Ipv4Addr::LOCALHOST.into()],
                },
            }
        });
        let cfg = Config {
            listen: "127.0.0.1:0".parse().expect("an address"),
            policy_dir,
            source,
            poll_interval: Duration::from_millis(20),
            max_catalog_drop_percent: self.max_catalog_drop_percent,
            confirm_token: self.confirm_token,
            identity,
            // As deployed: a restart judges its first read against what it last published.
            catalog_state: Some(dir.path().join("catalog-state.json")),
        };
        let running = bounded("mesh_control::start", mesh_control::start(cfg.clone()))
            .await
            .unwrap_or_else(|e| panic!("the control process failed to start: {e}"));
        let addr = running.addr();
        TestControl {
            running: Some(running),
            cfg: Config {
                listen: addr,
                ..cfg
            },
            addr,
            dir,
            ca_dir,
        }
    }
}

// === impl TestControl ===

impl TestControl {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn running(&self) -> &Running {
        self.running
            .as_ref()
            .expect("the control process is running")
    }

    /// A `[control]` bootstrap section for a sidecar; `persist` keeps its last snapshot.
    /// With identity on, the channel is TLS and the section names the mesh CA as `ca_file`.
    pub fn sidecar_toml(&self, persist: Option<&Path>) -> String {
        let mut out = format!(
            "\n[control]\naddress = \"{}\"\nwait = \"5s\"\nmax_backoff = \"100ms\"\n",
            self.addr
        );
        if let Some(p) = persist {
            out.push_str(&format!("persist = {:?}\n", p.display().to_string()));
        }
        if self.cfg.identity.is_some() {
            out.push_str(&format!(
                "ca_file = {:?}\n",
                self.ca_path().display().to_string()
            ));
        }
        out
    }

    /// The mesh CA certificate's file: the control channel's trust anchor.
    pub fn ca_path(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }

    /// The mesh CA's certificate (PEM), once `identity` made one.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_path()).expect("the CA certificate")
    }

    /// The mesh CA's key (PEM), for tests that sign certificates of their own with it.
    pub fn ca_key_pem(&self) -> String {
        std::fs::read_to_string(self.ca_dir.join("ca-key.pem")).expect("the CA key")
    }

    /// The bootstrap tokens file, for edits (read at every certificate request).
    pub fn tokens_path(&self) -> PathBuf {
        self.dir.path().join("agent-tokens.toml")
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policy")
    }

    /// Replaces a policy file by rename, as editors do.
    pub fn write_policy(&self, name: &str, text: &str) {
        crate::proxy::replace_file(&self.policy_dir().join(name), text);
    }

    pub fn write_catalog(&self, text: &str) {
        crate::proxy::replace_file(&self.dir.path().join("catalog.toml"), text);
    }

    /// The `/status` document.
    pub fn status(&self) -> Value {
        self.running().status()
    }

    pub fn version(&self) -> u64 {
        self.running().generations().borrow().version
    }

    /// The generation served now (version 0: none yet).
    pub fn generation(&self) -> Arc<Generation> {
        self.running().generations().borrow().clone()
    }

    /// Waits for a served generation satisfying `check`; returns it.
    pub async fn wait_generation(
        &self,
        what: &str,
        check: impl Fn(&Generation) -> bool,
    ) -> Arc<Generation> {
        let mut rx = self.running().generations();
        bounded(what, async move {
            rx.wait_for(|g| g.version != 0 && check(g))
                .await
                .expect("control alive")
                .clone()
        })
        .await
    }

    /// Waits for a served version other than `than` (0: the first one); returns it.
    pub async fn wait_version_after(&self, than: u64) -> u64 {
        let mut rx = self.running().generations();
        bounded(&format!("a snapshot version after {than}"), async move {
            rx.wait_for(|g| g.version != 0 && g.version != than)
                .await
                .expect("control alive")
                .version
        })
        .await
    }

    /// Waits until `n` sidecars have reported `version` applied.
    pub async fn wait_applied(&self, version: u64, n: usize) {
        let sidecars = self.running().sidecars().clone();
        let mut acks = sidecars.acks();
        bounded(
            &format!("{n} sidecars to apply version {version}"),
            async move {
                while sidecars.applied(version) < n {
                    acks.changed().await.expect("control alive");
                }
            },
        )
        .await
    }

    /// Waits until the `/status` document satisfies `check`.
    pub async fn wait_status(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let running = self.running();
        crate::eventually(what, || {
            let s = running.status();
            let done = check(&s);
            async move { done.then_some(s) }
        })
        .await
    }

    /// Stops the control process; returns once its listener and every connection are closed.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            bounded("the control process stopping", r.shutdown()).await;
        }
    }

    /// Starts it again on the same address with the same files.
    pub async fn restart(&mut self) {
        let cfg = self.cfg.clone();
        let running = bounded("mesh_control::start again", mesh_control::start(cfg))
            .await
            .unwrap_or_else(|e| panic!("the control process failed to restart: {e}"));
        self.running = Some(running);
    }
}

/// The `mesh-control` binary beside the test binary (`target/<profile>/`); `cargo test
/// --workspace` builds it.
pub fn binary_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps/")
        .join(format!("mesh-control{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p mesh-control` first",
        bin.display()
    );
    bin
}
