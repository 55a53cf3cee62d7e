//! A closed-loop workload: several connections, each sending one request after another through
//! a proxy until stopped, recording every answer that was not the expected one with the time it
//! came. Tests wait on its progress (requests completed) rather than on the clock.
//!
//! ```ignore
//! let load = Load::start(client::http1(a.outbound()), 8, || get("b", "/"));
//! load.wait_completed(200).await;
//! let report = load.stop().await;
//! assert!(report.failures.is_empty(), "{report}");
//! ```

use crate::body::{self, Body};
use crate::bounded;
use crate::client::{read_reply, Client, Conn};
use http::{Method, Request, StatusCode};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A request the load sends again and again.
pub type MakeRequest = Arc<dyn Fn() -> Request<Body> + Send + Sync>;

/// One answer the caller would have seen as a failure.
#[derive(Clone, Debug)]
pub struct Failure {
    pub at: Instant,
    /// The status and body, or the transport error.
    pub what: String,
}

/// What the load saw, once stopped.
#[derive(Debug)]
pub struct Report {
    pub completed: u64,
    pub failures: Vec<Failure>,
}

/// A running workload; [`Load::stop`] ends it.
pub struct Load {
    stop: Arc<AtomicBool>,
    completed: watch::Receiver<u64>,
    failures: Arc<Mutex<Vec<Failure>>>,
    tasks: JoinSet<()>,
}

/// `GET path` to `authority`.
pub fn get(client: Client, authority: &'static str, path: &'static str) -> MakeRequest {
    Arc::new(move || {
        client
            .request(Method::GET, authority, path)
            .body(body::empty())
            .expect("valid request")
    })
}

/// `POST path` to `authority` with a small body.
pub fn post(client: Client, authority: &'static str, path: &'static str) -> MakeRequest {
    Arc::new(move || {
        client
            .request(Method::POST, authority, path)
            .body(body::full("{\"q\":1}"))
            .expect("valid request")
    })
}

// === impl Load ===

impl Load {
    /// Opens `connections` connections to the client's address and starts sending on each.
    pub fn start(client: Client, connections: usize, make: MakeRequest) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, completed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        for _ in 0..connections {
            let (stop, tx, failures, make) =
                (stop.clone(), tx.clone(), failures.clone(), make.clone());
            tasks.spawn(async move {
                let mut conn: Option<Conn> = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => conn.insert(client.connect().await),
                    };
                    let outcome = match c.try_send_streaming(make()).await {
                        Ok(rsp) => match read_reply(rsp).await {
                            Ok(r) if r.status == StatusCode::OK => None,
                            Ok(r) => Some(format!("{} {}", r.status, r.text())),
                            Err(e) => {
                                // The connection is gone with the body.
                                conn = None;
                                Some(format!("response body failed: {e}"))
                            }
                        },
                        Err(e) => {
                            conn = None;
                            Some(format!("request failed: {e}"))
                        }
                    };
                    if let Some(what) = outcome {
                        let at = Instant::now();
                        failures
                            .lock()
                            .expect("failures")
                            .push(Failure { at, what });
                    }
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        Self {
            stop,
            completed,
            failures,
            tasks,
        }
    }

    /// Waits until `n` requests have been answered since the start.
    pub async fn wait_completed(&mut self, n: u64) {
        let what = format!("{n} requests of the load to complete");
        bounded(&what, self.completed.wait_for(|c| *c >= n))
            .await
            .expect("the load runs until stopped");
    }

    pub fn completed(&self) -> u64 {
        *self.completed.borrow()
    }

    /// Stops sending, waits for the requests in flight to end, and reports.
    pub async fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        bounded("the load's connections to finish", async {
            while let Some(done) = self.tasks.join_next().await {
                done.expect("a load task panicked");
            }
        })
        .await;
        let failures = std::mem::take(&mut *self.failures.lock().expect("failures"));
        Report {
            completed: *self.completed.borrow(),
            failures,
        }
    }
}

// === impl Report ===

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} requests, {} failed",
            self.completed,
            self.failures.len()
        )?;
        for failure in self.failures.iter().take(10) {
            writeln!(f, "  {}", failure.what)?;
        }
        Ok(())
    }
}
