//! A Consul API test double on `127.0.0.1:0`: the documented response shapes of
//! `/v1/catalog/services`, `/v1/health/service/<name>?passing`, `/v1/agent/service/register`
//! and `/v1/agent/service/deregister/<id>`, with blocking semantics: a query whose `index` is
//! current hangs until the index moves or `wait` passes, and every answer carries
//! `X-Consul-Index`. The test can move the index backwards to exercise the client's reset.
//!
//! Dropping (or [`FakeConsul::stop`]ping) it closes the listener and every connection.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

#[derive(Clone, Debug)]
struct Instance {
    id: String,
    addr: SocketAddr,
    tags: Vec<String>,
    passing: bool,
}

#[derive(Debug, Default)]
struct World {
    index: u64,
    /// service name -> instances
    services: BTreeMap<String, Vec<Instance>>,
    registered: Vec<Value>,
    deregistered: Vec<String>,
    queries: u64,
}

#[derive(Debug)]
struct Shared {
    world: Mutex<World>,
    /// Bumped on every change to the world (index moves, registrations, queries).
    changed: watch::Sender<u64>,
}

pub struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

// === impl FakeConsul ===

impl FakeConsul {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake consul");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                index: 1,
                ..World::default()
            }),
            changed: watch::Sender::new(0),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        let r = f(&mut self.shared.world.lock().expect("world lock"));
        self.shared.changed.send_modify(|n| *n += 1);
        r
    }

    /// Sets a mesh service's passing instances (tags `mesh`, `phase=<phase>`); moves the index.
    pub fn set_service(&self, name: &str, phase: &str, endpoints: &[SocketAddr]) {
        let tags = vec!["mesh".to_owned(), format!("phase={phase}")];
        self.mutate(|w| {
            w.index += 1;
            let instances = endpoints
                .iter()
                .map(|a| Instance {
                    id: format!("{name}-{}", a.port()),
                    addr: *a,
                    tags: tags.clone(),
                    passing: true,
                })
                .collect();
            w.services.insert(name.to_owned(), instances);
        });
    }

    /// Sets the index as a restored or re-elected Consul might: possibly lower than before.
    pub fn set_index(&self, index: u64) {
        self.mutate(|w| w.index = index);
    }

    pub fn index(&self) -> u64 {
        self.shared.world.lock().expect("world lock").index
    }

    /// Blocking queries answered so far.
    pub fn queries(&self) -> u64 {
        self.shared.world.lock().expect("world lock").queries
    }

    pub fn registered(&self) -> Vec<Value> {
        self.shared
            .world
            .lock()
            .expect("world lock")
            .registered
            .clone()
    }

    pub fn deregistered(&self) -> Vec<String> {
        self.shared
            .world
            .lock()
            .expect("world lock")
            .deregistered
            .clone()
    }

    /// Waits (bounded) until `check` holds over the registrations and deregistrations.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&[Value], &[String]) -> bool) {
        let mut rx = self.shared.changed.subscribe();
        crate::bounded(what, async {
            loop {
                {
                    let w = self.shared.world.lock().expect("world lock");
                    if check(&w.registered, &w.deregistered) {
                        return;
                    }
                }
                rx.changed().await.expect("fake consul alive");
            }
        })
        .await
    }

    /// Closes the listener and every connection: Consul is down.
    pub fn stop(self) {}
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        // Reap finished connections so the set does not grow without end.
        while conns.try_join_next().is_some() {}
    }
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == key).then_some(v)
    })
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/catalog/services") => {
            blocking(shared, &query, |w| {
                let map: BTreeMap<&String, Vec<String>> = w
                    .services
                    .iter()
                    .map(|(name, inst)| {
                        let mut tags: Vec<String> =
                            inst.iter().flat_map(|i| i.tags.clone()).collect();
                        tags.sort();
                        tags.dedup();
                        (name, tags)
                    })
                    .collect();
                json!(map)
            })
            .await
        }
        (Method::GET, p) if p.starts_with("/v1/health/service/") => {
            let name = p.trim_start_matches("/v1/health/service/").to_owned();
            let passing = param(&query, "passing").is_some();
            blocking(shared, &query, move |w| {
                let entries: Vec<Value> = w
                    .services
                    .get(&name)
                    .into_iter()
                    .flatten()
                    .filter(|i| i.passing || !passing)
                    .map(|i| {
                        json!({
                            "Node": { "Node": "node-1", "Address": i.addr.ip().to_string() },
                            "Service": {
                                "ID": i.id, "Service": name, "Tags": i.tags,
                                "Address": i.addr.ip().to_string(), "Port": i.addr.port(),
                            },
                            "Checks": [{ "Status": "passing" }],
                        })
                    })
                    .collect();
                json!(entries)
            })
            .await
        }
        (Method::PUT, "/v1/agent/service/register") => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let Ok(Ok(reg)) = body.map(|b| serde_json::from_slice::<Value>(&b)) else {
                return reply(StatusCode::BAD_REQUEST, "bad body".into(), None);
            };
            let name = reg["Name"].as_str().unwrap_or_default().to_owned();
            let ip = reg["Address"].as_str().unwrap_or("127.0.0.1");
            let port = reg["Port"].as_u64().unwrap_or(0) as u16;
            let addr = SocketAddr::new(ip.parse().expect("an IP address"), port);
            let tags = reg["Tags"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let mut w = shared.world.lock().expect("world lock");
            w.index += 1;
            let id = reg["ID"].as_str().unwrap_or(&name).to_owned();
            w.services.entry(name).or_default().push(Instance {
                id,
                addr,
                tags,
                passing: true,
            });
            w.registered.push(reg);
            drop(w);
            shared.changed.send_modify(|n| *n += 1);
            reply(StatusCode::OK, String::new(), None)
        }
        (Method::PUT, p) if p.starts_with("/v1/agent/service/deregister/") => {
            let id = p
                .trim_start_matches("/v1/agent/service/deregister/")
                .to_owned();
            let mut w = shared.world.lock().expect("world lock");
            w.index += 1;
            for instances in w.services.values_mut() {
                instances.retain(|i| i.id != id);
            }
            w.services.retain(|_, v| !v.is_empty());
            w.deregistered.push(id);
            drop(w);
            shared.changed.send_modify(|n| *n += 1);
            reply(StatusCode::OK, String::new(), None)
        }
        _ => reply(StatusCode::NOT_FOUND, "not found".into(), None),
    }
}

/// Answers at once when `index` is absent, 0 or behind; otherwise waits for the index to move
/// past it, or for `wait` (default 5 minutes, as Consul) to pass.
async fn blocking(
    shared: &Shared,
    query: &str,
    render: impl Fn(&World) -> Value,
) -> Response<Full<Bytes>> {
    let index: u64 = param(query, "index")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let wait = param(query, "wait")
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let mut rx = shared.changed.subscribe();
    let current = || shared.world.lock().expect("world lock").index;
    if index != 0 && current() == index {
        let _ = tokio::time::timeout(wait, async {
            while current() == index {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    let mut w = shared.world.lock().expect("world lock");
    w.queries += 1;
    let body = render(&w).to_string();
    let index = w.index;
    drop(w);
    reply(StatusCode::OK, body, Some(index))
}

fn reply(status: StatusCode, body: String, index: Option<u64>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(i) = index {
        rsp.headers_mut()
            .insert("x-consul-index", http::HeaderValue::from(i));
    }
    rsp
}
