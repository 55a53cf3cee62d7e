//! The proxy under test, two ways: in-process through `mesh_proxy::app::start` ([`TestProxy`])
//! or as a child process of the real `mesh-proxy` binary ([`ProxyProcess`], for signals and exit
//! codes). Both get a bootstrap file whose listeners are `127.0.0.1:0` and a snapshot file in a
//! temporary directory that the test may rewrite.
//!
//! ```ignore
//! let proxy = proxy::builder().agent("a").snapshot(text).start().await;
//! let reply = client::http1(proxy.outbound()).get("b", "/").await;
//! ```

use crate::{bounded, bounded_by};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The log line the binary prints once every listener is bound.
pub const READY_MESSAGE: &str = "proxy ready";

/// Configures a proxy before it starts.
#[derive(Clone, Debug)]
pub struct Builder {
    agent: String,
    phase: String,
    snapshot: String,
    inbound_app: Option<SocketAddr>,
    inbound_protocol: Option<String>,
    ollama_gateway: bool,
    max_concurrency: u32,
    queue_depth: u32,
    queue_timeout: String,
    grace: String,
    close_idle_after: Option<String>,
    poll_interval: String,
    /// Bootstrap sections appended verbatim (e.g. `[control]`, `[consul]`).
    extra: String,
}

/// A proxy running inside the test process.
pub struct TestProxy {
    running: Option<mesh_proxy::app::Running>,
    outbound: SocketAddr,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
    snapshot_path: PathBuf,
    version: watch::Receiver<u64>,
    rejections: watch::Receiver<u64>,
    _dir: TempDir,
}

/// The real binary running as a child process; SIGKILLed and reaped on drop if still alive.
pub struct ProxyProcess {
    child: Child,
    pid: libc::pid_t,
    exited: Option<ExitStatus>,
    outbound: SocketAddr,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

pub fn builder() -> Builder {
    Builder {
        agent: "caller".to_owned(),
        phase: "critical".to_owned(),
        snapshot: "version = 1\n".to_owned(),
        inbound_app: None,
        inbound_protocol: None,
        ollama_gateway: false,
        max_concurrency: 64,
        queue_depth: 256,
        queue_timeout: "1s".to_owned(),
        grace: "30s".to_owned(),
        close_idle_after: None,
        poll_interval: "20ms".to_owned(),
        extra: String::new(),
    }
}

// === impl Builder ===

impl Builder {
    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = agent.to_owned();
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_owned();
        self
    }

    /// The snapshot file's initial text (default: an empty snapshot, version 1).
    pub fn snapshot(mut self, toml: impl Into<String>) -> Self {
        self.snapshot = toml.into();
        self
    }

    /// Enables the inbound listener, forwarding to `app`.
    pub fn inbound_app(mut self, app: SocketAddr) -> Self {
        self.inbound_app = Some(app);
        self
    }

    /// How the inbound side speaks to the app: `http1`, `http2` or `auto` (the default).
    pub fn inbound_protocol(mut self, protocol: &str) -> Self {
        self.inbound_protocol = Some(protocol.to_owned());
        self
    }

    /// Makes this sidecar the Ollama gateway (`[inbound] mode = "ollama"`) in front of `ollama`;
    /// the queue comes from the snapshot's `[ollama.gateway]`.
    pub fn ollama_gateway(mut self, ollama: SocketAddr) -> Self {
        self.inbound_app = Some(ollama);
        self.ollama_gateway = true;
        self
    }

    /// The inbound concurrency limit, its queue and how long a request may wait in it.
    pub fn inbound_limits(
        mut self,
        max_concurrency: u32,
        queue_depth: u32,
        queue_timeout: &str,
    ) -> Self {
        self.max_concurrency = max_concurrency;
        self.queue_depth = queue_depth;
        self.queue_timeout = queue_timeout.to_owned();
        self
    }

    /// Gives `service` its own local port (`[[upstreams]]`, on `127.0.0.1:0`).
    pub fn upstream(mut self, service: &str) -> Self {
        self.extra.push_str(&format!(
            "\n[[upstreams]]\nservice = {service:?}\nlisten = \"127.0.0.1:0\"\n"
        ));
        self
    }

    /// Appends bootstrap sections verbatim, e.g. `[control]` for the control channel.
    pub fn bootstrap_extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// How long shutdown waits for in-flight requests.
    pub fn grace(mut self, grace: &str) -> Self {
        self.grace = grace.to_owned();
        self
    }

    /// Once draining, how long a connection with no request open may stay (`drain.close_idle_after`).
    pub fn close_idle_after(mut self, after: &str) -> Self {
        self.close_idle_after = Some(after.to_owned());
        self
    }

    /// The bootstrap TOML for a proxy whose snapshot file is `snapshot_path`.
    pub fn bootstrap_toml(&self, snapshot_path: &Path) -> String {
        let mut out = format!(
            "agent = {agent:?}\nphase = {phase:?}\n\n[listen]\noutbound = \"127.0.0.1:0\"\n",
            agent = self.agent,
            phase = self.phase,
        );
        if self.inbound_app.is_some() {
            out.push_str("inbound = \"127.0.0.1:0\"\n");
        }
        out.push_str("admin = \"127.0.0.1:0\"\n");
        if let Some(app) = self.inbound_app {
            out.push_str(&format!(
                "\n[inbound]\napp = \"{app}\"\nmax_concurrency = {}\nqueue_depth = {}\nqueue_timeout = {:?}\n",
                self.max_concurrency, self.queue_depth, self.queue_timeout
            ));
            if self.ollama_gateway {
                out.push_str("mode = \"ollama\"\n");
            }
            if let Some(protocol) = &self.inbound_protocol {
                out.push_str(&format!("protocol = {protocol:?}\n"));
            }
        }
        out.push_str(&format!(
            "\n[snapshot]\nfile = {:?}\npoll_interval = {:?}\n\n[drain]\ngrace = {:?}\n",
            snapshot_path.display().to_string(),
            self.poll_interval,
            self.grace
        ));
        if let Some(after) = &self.close_idle_after {
            out.push_str(&format!("close_idle_after = {after:?}\n"));
        }
        out.push_str(&self.extra);
        out
    }

    /// Writes the files into a fresh temporary directory: (dir, bootstrap path, snapshot path).
    fn write_files(&self, runtime: bool) -> (TempDir, PathBuf, PathBuf, String) {
        let dir = tempfile::tempdir().expect("create a temp dir for the proxy's files");
        let snapshot_path = dir.path().join("snapshot.toml");
        std::fs::write(&snapshot_path, &self.snapshot).expect("write the snapshot file");
        let mut bootstrap = self.bootstrap_toml(&snapshot_path);
        if runtime {
            bootstrap.push_str("\n[runtime]\nworker_threads = 2\n");
        }
        let bootstrap_path = dir.path().join("bootstrap.toml");
        std::fs::write(&bootstrap_path, &bootstrap).expect("write the bootstrap file");
        (dir, bootstrap_path, snapshot_path, bootstrap)
    }

    /// Starts the proxy in this process; returns once every listener is bound.
    pub async fn start(self) -> TestProxy {
        let (dir, bootstrap_path, snapshot_path, text) = self.write_files(false);
        let bootstrap = mesh_proxy::bootstrap::Bootstrap::from_toml(&bootstrap_path, &text)
            .unwrap_or_else(|e| panic!("the proxy rejected the test bootstrap: {e}\n{text}"));
        let running = bounded("mesh_proxy::app::start", mesh_proxy::app::start(bootstrap))
            .await
            .unwrap_or_else(|e| panic!("the proxy failed to start: {e}\n{text}"));
        let addrs = running.addrs();
        TestProxy {
            outbound: addrs.outbound,
            inbound: addrs.inbound,
            admin: addrs.admin,
            version: running.snapshot_version(),
            rejections: running.snapshot_rejections(),
            running: Some(running),
            snapshot_path,
            _dir: dir,
        }
    }

    /// Starts the real `mesh-proxy` binary with `--config`; returns once it logs that it is
    /// ready.
    pub async fn spawn(self) -> ProxyProcess {
        let (dir, bootstrap_path, _, _) = self.write_files(true);
        let bin = binary_path();
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(&bootstrap_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let pid = child.id().expect("a just-spawned child has a pid") as libc::pid_t;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(keep_lines(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
        ));

        let stdout = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let ready = tokio::time::timeout(crate::WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                stdout.lock().expect("stdout lock").push(line.clone());
                if let Some(ready) = ready_fields(&line) {
                    return Some(ready);
                }
            }
            None
        })
        .await;
        let ready = match ready {
            Ok(Some(ready)) => ready,
            outcome => {
                let why = if outcome.is_err() {
                    "did not log \"proxy ready\" in time"
                } else {
                    "closed stdout before logging \"proxy ready\""
                };
                // The child is killed and reaped by ProxyProcess's drop below.
                let process = ProxyProcess {
                    child,
                    pid,
                    exited: None,
                    outbound: ([127, 0, 0, 1], 0).into(),
                    inbound: None,
                    admin: ([127, 0, 0, 1], 0).into(),
                    stdout,
                    stderr,
                    _dir: dir,
                };
                panic!(
                    "{} {why}\nstdout:\n{}\nstderr:\n{}",
                    bin.display(),
                    process.stdout_lines().join("\n"),
                    process.stderr_lines().join("\n")
                );
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        let kept = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().expect("stdout lock").push(line);
            }
        });
        ProxyProcess {
            child,
            pid,
            exited: None,
            outbound: ready.outbound,
            inbound: ready.inbound,
            admin: ready.admin,
            stdout,
            stderr,
            _dir: dir,
        }
    }
}

// === impl TestProxy ===

impl TestProxy {
    pub fn builder() -> Builder {
        builder()
    }

    pub fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    /// The upstream port of `service` (see [`Builder::upstream`]).
    pub fn upstream(&self, service: &str) -> SocketAddr {
        self.running
            .as_ref()
            .and_then(|r| r.upstreams().iter().find(|(s, _)| s == service))
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("the proxy has no upstream port for {service:?}"))
    }

    /// The inbound listener; panics if the proxy was built without `inbound_app`.
    pub fn inbound(&self) -> SocketAddr {
        self.inbound
            .expect("the proxy has no inbound listener: build it with inbound_app(..)")
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The snapshot version in force.
    /// The version in force as a watch, to wait for one applied by another source.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.version.clone()
    }

    pub fn snapshot_version(&self) -> u64 {
        *self.version.borrow()
    }

    pub fn snapshot_rejections(&self) -> u64 {
        *self.rejections.borrow()
    }

    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot_path
    }

    /// Replaces the snapshot file and waits until the proxy applies it; returns the version
    /// then in force.
    pub async fn reload(&mut self, toml: &str) -> u64 {
        self.version.borrow_and_update();
        replace_file(&self.snapshot_path, toml);
        bounded(
            "the proxy to apply the new snapshot",
            self.version.changed(),
        )
        .await
        .expect("the proxy's snapshot watch closed");
        let applied = *self.version.borrow_and_update();
        applied
    }

    /// Replaces the snapshot file with text the proxy must reject, and waits until it does;
    /// returns the rejection count.
    pub async fn reload_rejected(&mut self, toml: &str) -> u64 {
        self.rejections.borrow_and_update();
        replace_file(&self.snapshot_path, toml);
        bounded(
            "the proxy to reject the snapshot file",
            self.rejections.changed(),
        )
        .await
        .expect("the proxy's rejection watch closed");
        let rejected = *self.rejections.borrow_and_update();
        rejected
    }

    /// Stops accepting, drains in-flight requests and waits for the proxy to finish.
    pub async fn shutdown(mut self) {
        let running = self.running.take().expect("shutdown once");
        bounded("the in-process proxy to shut down", running.shutdown()).await;
    }
}

// === impl ProxyProcess ===

impl ProxyProcess {
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    pub fn inbound(&self) -> Option<SocketAddr> {
        self.inbound
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Sends SIGTERM to the child.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.exited.is_none(), "the proxy has already exited");
        // SAFETY: kill(2) with our own child's pid, not yet reaped (so the pid is not reused).
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}) failed: {}",
            self.pid,
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the child to exit, for at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let status = bounded_by(limit, "the proxy process to exit", self.child.wait())
            .await
            .expect("wait for the proxy process");
        self.exited = Some(status);
        status
    }

    /// Every stdout line so far (JSON log lines).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").clone()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.exited.is_some() {
            return;
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: our own child, not yet reaped: SIGKILL it and reap it so no zombie is left.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(self.pid, &mut status, 0);
        }
    }
}

// === helpers ===

/// `target/<profile>/mesh-proxy`, beside the `deps/` directory the test binary runs from.
pub fn binary_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps/");
    let bin = profile_dir.join(format!("mesh-proxy{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        panic!(
            "the mesh-proxy binary is not built: {} is missing.\n\
             Run `cargo build -p mesh-proxy` before `cargo test -p mesh-tests`.",
            bin.display()
        );
    }
    if let Some(newer) = newer_source(&bin) {
        panic!(
            "the mesh-proxy binary {} is older than {}: it would test stale code.\n\
             Run `cargo build -p mesh-proxy` before `cargo test -p mesh-tests`.",
            bin.display(),
            newer.display()
        );
    }
    bin
}

/// A file under `proxy/src` or `config/src` modified after `bin` was built, if any.
fn newer_source(bin: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let mut dirs = vec![workspace.join("proxy/src"), workspace.join("config/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.modified().is_ok_and(|m| m > built) {
                return Some(path);
            }
        }
    }
    None
}

/// Replaces a file atomically (write beside it, then rename), so a watcher never reads half.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

struct Ready {
    outbound: SocketAddr,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
}

/// The addresses in a "proxy ready" JSON log line; `None` for any other line. Fields are looked
/// up at the top level and under `fields` (tracing's JSON layout).
fn ready_fields(line: &str) -> Option<Ready> {
    let json: Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| {
        json.get(name)
            .or_else(|| json.get("fields").and_then(|f| f.get(name)))
            .and_then(Value::as_str)
    };
    if field("message")? != READY_MESSAGE {
        return None;
    }
    let addr = |name: &str| {
        field(name).map(|v| {
            v.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("ready line: {name} = {v:?} is not ip:port ({e})"))
        })
    };
    Some(Ready {
        outbound: addr("outbound").unwrap_or_else(|| panic!("ready line without outbound: {line}")),
        inbound: addr("inbound"),
        admin: addr("admin").unwrap_or_else(|| panic!("ready line without admin: {line}")),
    })
}

async fn keep_lines(pipe: impl AsyncRead + Unpin, into: Arc<Mutex<Vec<String>>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        into.lock().expect("lines lock").push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ready_line_in_either_layout() {
        let flat = r#"{"level":"INFO","message":"proxy ready","outbound":"127.0.0.1:4140","admin":"127.0.0.1:4191"}"#;
        let r = ready_fields(flat).expect("ready");
        assert_eq!(r.outbound.port(), 4140);
        assert_eq!(r.inbound, None);
        let nested = r#"{"fields":{"message":"proxy ready","outbound":"127.0.0.1:1","inbound":"127.0.0.1:2","admin":"127.0.0.1:3"}}"#;
        let r = ready_fields(nested).expect("ready");
        assert_eq!(r.inbound.map(|a| a.port()), Some(2));
        assert!(ready_fields(r#"{"message":"starting"}"#).is_none());
        assert!(ready_fields("not json").is_none());
    }
}
