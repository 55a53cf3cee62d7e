//! A Consul API test double on `127.0.0.1:0`, answering in HashiCorp's field layout (as their
//! own API test double and docs show it): `/v1/catalog/services` (tag lists may be `null`),
//! `/v1/health/service/<name>` (each entry a `Node` with `TaggedAddresses` and `Meta`, a
//! `Service` with `Kind`, `Proxy`, `Weights`, `TaggedAddresses`, nullable `Tags` and `Meta`,
//! and `Checks` for the node and the service in mixed states), `/v1/status/leader`,
//! `/v1/agent/service/register` and `/v1/agent/service/deregister/<id>`, with blocking
//! semantics: a query whose `index` is current hangs until the index moves or `wait` passes,
//! and every answer carries `X-Consul-Index`. The test can move the index backwards, make
//! Consul ignore `?passing`, fail every call, or hang every call.
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

/// One registration, written out in Consul's layout by [`Instance::entry`].
#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub service: String,
    /// `""` for an agent; `connect-proxy`, `mesh-gateway`, ...
    pub kind: String,
    /// The service address: an IP, a host name, or empty (the node's address applies).
    pub address: String,
    pub port: u16,
    /// `None` is written as `null`, as Consul does for a service without tags.
    pub tags: Option<Vec<String>>,
    pub node_address: String,
    /// The service's own check states (`passing`, `warning`, `critical`, `maintenance`).
    pub checks: Vec<&'static str>,
    /// The node's `serfHealth` state.
    pub node_check: &'static str,
}

/// How the double fails every call, Consul's API included.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Outage {
    #[default]
    None,
    /// Answers every call with this status (500 "No cluster leader", as a Consul without
    /// quorum does).
    Error(u16),
    /// Accepts connections and reads requests, but never answers while the outage lasts.
    Hang,
}

#[derive(Debug, Default)]
struct Registered {
    /// The tags `/v1/catalog/services` lists: `Value::Null` or an array.
    tags: Value,
    entries: Vec<Value>,
}

#[derive(Debug, Default)]
struct World {
    index: u64,
    services: BTreeMap<String, Registered>,
    registered: Vec<Value>,
    deregistered: Vec<String>,
    queries: u64,
    ignore_passing: bool,
    outage: Outage,
    /// Services whose health query answers with this status.
    failing: BTreeMap<String, u16>,
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
        let instances: Vec<Instance> = endpoints
            .iter()
            .map(|a| Instance::agent(name, phase, *a))
            .collect();
        self.set_instances(name, &instances);
    }

    /// Sets a service's instances as registered (any kind, address and check state); its
    /// listed tags are the union of theirs (`null` when none has tags). Moves the index.
    pub fn set_instances(&self, name: &str, instances: &[Instance]) {
        let mut tags: Vec<String> = instances
            .iter()
            .flat_map(|i| i.tags.clone().unwrap_or_default())
            .collect();
        tags.sort();
        tags.dedup();
        let tags = if instances.iter().all(|i| i.tags.is_none()) {
            Value::Null
        } else {
            json!(tags)
        };
        let entries = instances.iter().map(Instance::entry).collect();
        self.set_entries(name, tags, entries);
    }

    /// Sets a service's raw answer: the tags `/v1/catalog/services` lists for it and the
    /// entries `/v1/health/service/<name>` returns, whatever they hold. Moves the index.
    pub fn set_entries(&self, name: &str, tags: Value, entries: Vec<Value>) {
        self.mutate(|w| {
            w.index += 1;
            w.services
                .insert(name.to_owned(), Registered { tags, entries });
        });
    }

    /// Removes every service; moves the index (a Consul that lost its state).
    pub fn clear(&self) {
        self.mutate(|w| {
            w.index += 1;
            w.services.clear();
        });
    }

    /// Serves failing instances even when asked for `?passing` (a misbehaving proxy in front).
    pub fn ignore_passing(&self) {
        self.mutate(|w| w.ignore_passing = true);
    }

    /// Makes one service's health query fail with `status` (`None`: answer again).
    pub fn fail_service(&self, name: &str, status: Option<u16>) {
        self.mutate(|w| match status {
            Some(s) => w.failing.insert(name.to_owned(), s),
            None => w.failing.remove(name),
        });
    }

    /// Starts or ends an outage of every endpoint.
    pub fn set_outage(&self, outage: Outage) {
        self.mutate(|w| w.outage = outage);
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

/// What `?passing` keeps: entries whose every check passes.
fn all_passing(entry: &Value) -> bool {
    entry["Checks"]
        .as_array()
        .is_none_or(|checks| checks.iter().all(|c| c["Status"] == "passing"))
}

// === impl Instance ===

impl Instance {
    /// A mesh agent: tags `mesh`, `phase=<phase>`, every check passing.
    pub fn agent(service: &str, phase: &str, addr: SocketAddr) -> Self {
        Self {
            id: format!("{service}-{}", addr.port()),
            service: service.to_owned(),
            kind: String::new(),
            address: addr.ip().to_string(),
            port: addr.port(),
            tags: Some(vec!["mesh".to_owned(), format!("phase={phase}")]),
            node_address: addr.ip().to_string(),
            checks: vec!["passing"],
            node_check: "passing",
        }
    }

    /// The Connect sidecar proxy Consul registers beside `parent`, inheriting its tags.
    pub fn connect_proxy(parent: &Instance, port: u16) -> Self {
        Self {
            id: format!("{}-sidecar-proxy", parent.id),
            service: format!("{}-sidecar-proxy", parent.service),
            kind: "connect-proxy".into(),
            port,
            ..parent.clone()
        }
    }

    /// The entry `/v1/health/service/<name>` returns for this instance.
    pub fn entry(&self) -> Value {
        let proxy = if self.kind == "connect-proxy" {
            let parent = self.service.trim_end_matches("-sidecar-proxy");
            json!({
                "DestinationServiceName": parent,
                "DestinationServiceID": self.id.trim_end_matches("-sidecar-proxy"),
                "LocalServiceAddress": "127.0.0.1",
                "LocalServicePort": 8080,
                "Mode": "",
                "Config": null,
                "Upstreams": null,
                "MeshGateway": {},
                "Expose": {},
            })
        } else {
            json!({ "Mode": "", "MeshGateway": {}, "Expose": {} })
        };
        let tagged = if self.address.is_empty() {
            json!({})
        } else {
            json!({
                "lan_ipv4": { "Address": self.address, "Port": self.port },
                "wan_ipv4": { "Address": self.address, "Port": self.port },
            })
        };
        let mut checks = vec![json!({
            "Node": "node-1",
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": self.node_check,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": {},
            "CreateIndex": 10,
            "ModifyIndex": 10,
        })];
        for (i, status) in self.checks.iter().enumerate() {
            checks.push(json!({
                "Node": "node-1",
                "CheckID": format!("service:{}:{}", self.id, i + 1),
                "Name": format!("Service '{}' check", self.service),
                "Status": status,
                "Notes": "",
                "Output": "",
                "ServiceID": self.id,
                "ServiceName": self.service,
                "ServiceTags": self.tags.clone().unwrap_or_default(),
                "Type": "http",
                "Definition": {},
                "CreateIndex": 12,
                "ModifyIndex": 12,
            }));
        }
        json!({
            "Node": {
                "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
                "Node": "node-1",
                "Address": self.node_address,
                "Datacenter": "dc1",
                "TaggedAddresses": { "lan": self.node_address, "wan": self.node_address },
                "Meta": null,
                "CreateIndex": 5,
                "ModifyIndex": 5,
            },
            "Service": {
                "Kind": self.kind,
                "ID": self.id,
                "Service": self.service,
                "Tags": self.tags,
                "Address": self.address,
                "TaggedAddresses": tagged,
                "Meta": null,
                "Port": self.port,
                "Weights": { "Passing": 1, "Warning": 1 },
                "EnableTagOverride": false,
                "Proxy": proxy,
                "Connect": {},
                "Namespace": "default",
                "CreateIndex": 12,
                "ModifyIndex": 12,
            },
            "Checks": checks,
        })
    }
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == key).then_some(v)
    })
}

/// Waits out a hang; answers the outage's error, if any.
async fn outage(shared: &Shared) -> Option<Response<Full<Bytes>>> {
    let mut rx = shared.changed.subscribe();
    loop {
        let outage = shared.world.lock().expect("world lock").outage.clone();
        match outage {
            Outage::None => return None,
            Outage::Error(status) => {
                let status = StatusCode::from_u16(status).expect("a status code");
                return Some(reply(status, "No cluster leader".into(), None));
            }
            Outage::Hang => {
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        }
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(rsp) = outage(shared).await {
        return rsp;
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/status/leader") => {
            reply(StatusCode::OK, "\"127.0.0.1:8300\"".into(), None)
        }
        (Method::GET, "/v1/catalog/services") => {
            blocking(shared, &query, |w| {
                let mut map = serde_json::Map::new();
                // Consul lists itself, with no tags.
                map.insert("consul".into(), json!([]));
                for (name, r) in &w.services {
                    if !r.entries.is_empty() {
                        map.insert(name.clone(), r.tags.clone());
                    }
                }
                Value::Object(map)
            })
            .await
        }
        (Method::GET, p) if p.starts_with("/v1/health/service/") => {
            let name = p.trim_start_matches("/v1/health/service/").to_owned();
            let failing = shared
                .world
                .lock()
                .expect("world lock")
                .failing
                .get(&name)
                .copied();
            if let Some(status) = failing {
                let status = StatusCode::from_u16(status).expect("a status code");
                return reply(status, "rpc error: permission denied".into(), None);
            }
            let passing = param(&query, "passing").is_some();
            blocking(shared, &query, move |w| {
                let entries: Vec<Value> = w
                    .services
                    .get(&name)
                    .map(|r| r.entries.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter(|e| !passing || w.ignore_passing || all_passing(e))
                    .cloned()
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
            let tags: Option<Vec<String>> = reg["Tags"].as_array().map(|t| {
                t.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            });
            let instance = Instance {
                id: reg["ID"].as_str().unwrap_or(&name).to_owned(),
                service: name.clone(),
                kind: reg["Kind"].as_str().unwrap_or_default().to_owned(),
                address: reg["Address"].as_str().unwrap_or_default().to_owned(),
                port: reg["Port"].as_u64().unwrap_or(0) as u16,
                tags: tags.clone(),
                node_address: "127.0.0.1".into(),
                checks: vec!["passing"],
                node_check: "passing",
            };
            let mut w = shared.world.lock().expect("world lock");
            w.index += 1;
            let r = w.services.entry(name).or_default();
            if let Some(tags) = tags {
                let mut all: Vec<String> =
                    serde_json::from_value(r.tags.clone()).unwrap_or_default();
                all.extend(tags);
                all.sort();
                all.dedup();
                r.tags = json!(all);
            }
            r.entries.push(instance.entry());
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
            for r in w.services.values_mut() {
                r.entries
                    .retain(|e| e.pointer("/Service/ID").and_then(Value::as_str) != Some(&id));
            }
            w.services.retain(|_, r| !r.entries.is_empty());
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
    // An outage that began while the query waited ends it the outage's way.
    if let Some(rsp) = outage(shared).await {
        return rsp;
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
