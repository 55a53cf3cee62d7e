//! Real clients and servers written in Python (grpcio, the official `ollama` and `openai`
//! clients), run from `tests/python/` with the virtualenv `.ci/run` makes
//! (`tests/python/setup.sh`). The interpreter is `MESH_TEST_PYTHON`, else
//! `target/pyenv/bin/python` in the workspace; when neither exists the test fails and says how
//! to make it, rather than skipping what it was meant to prove.
//!
//! ```ignore
//! let server = python::server("grpc_server.py", &[]).await;   // prints `PORT <n>`
//! let out = python::run("grpc_client.py", &[&addr, "b", "calls"]).await; // one JSON line
//! ```

use crate::{bounded, bounded_by};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The longest one Python client run may take (interpreter start and imports included).
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// The Python interpreter with the test packages installed.
pub fn interpreter() -> PathBuf {
    if let Some(path) = std::env::var_os("MESH_TEST_PYTHON") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "MESH_TEST_PYTHON={} does not exist; run `bash tests/python/setup.sh` (as .ci/run does)",
            path.display()
        );
        return path;
    }
    let path = workspace().join("target/pyenv/bin/python");
    assert!(
        path.exists(),
        "no Python test environment at {}: run `bash tests/python/setup.sh` (as .ci/run does) \
         or set MESH_TEST_PYTHON to an interpreter with grpcio, ollama and openai installed",
        path.display()
    );
    path
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

fn script(name: &str) -> PathBuf {
    workspace().join("tests/python").join(name)
}

/// Runs a client script to its end; returns the JSON object it printed last.
pub async fn run(name: &str, args: &[&str]) -> Value {
    let out = bounded_by(
        RUN_LIMIT,
        &format!("python {name} {args:?}"),
        Command::new(interpreter())
            .arg(script(name))
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot run python {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python {name} {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("python {name} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

/// A long-running script (a server): its stdout lines are collected and can be waited for.
/// It ends when its stdin closes; dropping it also kills it by PID.
pub struct PyProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    seen: watch::Receiver<usize>,
    pub addr: SocketAddr,
}

/// Starts a server script and waits for its `PORT <n>` line.
pub async fn server(name: &str, args: &[&str]) -> PyProcess {
    let mut child = Command::new(interpreter())
        .arg(script(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start python {name}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, seen) = watch::channel(0);
    let collected = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let n = {
                let mut all = collected.lock().unwrap();
                all.push(line);
                all.len()
            };
            tx.send_replace(n);
        }
    });
    let mut process = PyProcess {
        child,
        lines,
        seen,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let line = process
        .wait_line(&format!("python {name} to print its port"), |l| {
            l.starts_with("PORT ")
        })
        .await;
    let port: u16 = line[5..].trim().parse().expect("PORT <n>");
    process.addr.set_port(port);
    process
}

// === impl PyProcess ===

impl PyProcess {
    /// Waits until the script has printed a line matching `want`; returns it.
    pub async fn wait_line(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let lines = self.lines.clone();
        let seen = &mut self.seen;
        bounded(what, async {
            loop {
                if let Some(l) = lines.lock().unwrap().iter().find(|l| want(l)) {
                    return l.clone();
                }
                if seen.changed().await.is_err() {
                    panic!(
                        "{what}: the script ended; it printed {:?}",
                        lines.lock().unwrap()
                    );
                }
            }
        })
        .await
    }

    /// How many lines equal to `line` the script has printed so far.
    pub fn count(&self, line: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == line)
            .count()
    }
}

impl Drop for PyProcess {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; the kill makes sure (kill_on_drop would too).
        self.child.stdin.take();
        let _ = self.child.start_kill();
    }
}
