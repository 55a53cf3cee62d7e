//! The snapshot in force, compiled into a lookup table and published through `ArcSwap`: the
//! request path does one atomic load and never waits for a writer.

use crate::metrics::{self, TargetMetrics};
use crate::outbound::balance::{Endpoint, EndpointSet};
use crate::outbound::breaker::machine::Breaker;
use crate::outbound::resilience::{Memory, Policies};
use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use mesh_config::ollama::Rate;
use mesh_config::{Phase, Protocol, Snapshot};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// A resolved target: where requests for one service go and how.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub phase: Phase,
    pub protocol: Protocol,
    pub timeout: Duration,
    /// Longest silence inside a response body.
    pub stream_idle: Duration,
    pub endpoints: EndpointSet,
    pub metrics: Arc<TargetMetrics>,
    pub resilience: Policies,
    /// This agent's rate for calls to the Ollama service, resolved once per snapshot; `None`
    /// for every other backend or when no rate applies.
    pub ollama_rate: Option<Rate>,
}

/// An explicit route rule, ready to match.
#[derive(Debug)]
pub struct Rule {
    path_prefix: Option<Box<str>>,
    headers: Box<[(HeaderName, HeaderValue)]>,
    pub backend: Arc<Backend>,
    pub timeout: Duration,
    retry_non_idempotent: bool,
}

/// What a request is routed to.
#[derive(Clone, Debug)]
pub struct Route {
    pub backend: Arc<Backend>,
    pub timeout: Duration,
    /// The route opts its non-idempotent requests into the backend's retries.
    pub retry_non_idempotent: bool,
    /// Inbound: the calling address, held to its share of the concurrency limit.
    pub client: Option<Arc<crate::inbound::clients::Client>>,
}

/// A compiled snapshot: lookups by normalized authority.
#[derive(Debug)]
pub struct RouteTable {
    pub snapshot: Arc<Snapshot>,
    by_name: HashMap<Box<str>, Arc<Backend>>,
    rules: HashMap<Box<str>, Box<[Rule]>>,
    pub unrouted: Arc<TargetMetrics>,
}

// === impl RouteTable ===

impl RouteTable {
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// A target by its (normalized) name.
    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(name)
    }

    /// Finds the route for a request to `name` (already normalized).
    pub fn route(&self, name: &str, path: &str, headers: &http::HeaderMap) -> Option<Route> {
        if let Some(rules) = self.rules.get(name) {
            for rule in rules.iter() {
                if rule.matches(path, headers) {
                    return Some(Route {
                        backend: rule.backend.clone(),
                        timeout: rule.timeout,
                        retry_non_idempotent: rule.retry_non_idempotent,
                        client: None,
                    });
                }
            }
        }
        self.by_name.get(name).map(|b| Route {
            backend: b.clone(),
            timeout: b.timeout,
            retry_non_idempotent: false,
            client: None,
        })
    }
}

impl Rule {
    fn matches(&self, path: &str, headers: &http::HeaderMap) -> bool {
        if let Some(prefix) = &self.path_prefix {
            if !path.starts_with(&**prefix) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| headers.get(name) == Some(value))
    }
}

/// An endpoint of one service: (service name, address).
type EndpointKey = (Arc<str>, SocketAddr);

/// Builds route tables, keeping endpoint load statistics across snapshots so a swap does not
/// reset what the balancer learned. Endpoints are keyed by service and address: two services
/// that share an address (a canary on the same sidecar, say) have their own breaker, labels,
/// statistics and connections.
#[derive(Debug)]
pub struct Compiler {
    agent: String,
    phase: Phase,
    endpoints: Mutex<HashMap<EndpointKey, Arc<Endpoint>>>,
    resilience: Mutex<Memory>,
}

impl Compiler {
    pub fn new(agent: &str, phase: Phase) -> Self {
        Self {
            agent: agent.to_owned(),
            phase,
            endpoints: Mutex::new(HashMap::new()),
            resilience: Mutex::new(Memory::default()),
        }
    }

    /// Compiles a validated snapshot. Runs off the request path.
    pub fn compile(&self, snapshot: Snapshot) -> RouteTable {
        let phase = self.phase.as_str();
        let mut known = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut live = HashMap::with_capacity(known.len());
        let mut memory = self.resilience.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_name = HashMap::with_capacity(snapshot.services.len());
        for svc in &snapshot.services {
            let name: Arc<str> = svc.name.as_str().into();
            let resolved = svc.resilience.resolve(&snapshot.defaults.resilience);
            let policies = memory.compile(&name, &resolved);
            let endpoints = svc
                .endpoints
                .iter()
                .map(|addr| {
                    // An endpoint keeps its statistics and breaker while its breaker's
                    // parameters stay the same.
                    let key = (name.clone(), *addr);
                    let ep = known
                        .get(&key)
                        .filter(|ep| {
                            ep.breaker.as_ref().map(|b| *b.params()) == policies.endpoint_breaker
                        })
                        .cloned()
                        .unwrap_or_else(|| {
                            let breaker = policies
                                .endpoint_breaker
                                .map(|p| Breaker::new(p, &svc.name, &addr.to_string()));
                            Arc::new(Endpoint::with_breaker(*addr, breaker).for_peer(name.clone()))
                        });
                    live.insert(key, ep.clone());
                    ep
                })
                .collect();
            memory.keep(&name, &policies);
            let backend = Arc::new(Backend {
                name,
                phase: svc.phase,
                protocol: svc.protocol,
                timeout: svc.timeout.unwrap_or(snapshot.defaults.timeout),
                stream_idle: svc
                    .stream_idle_timeout
                    .unwrap_or(snapshot.defaults.stream_idle_timeout),
                endpoints: EndpointSet::new(endpoints).with_ejection(policies.ejection),
                metrics: TargetMetrics::new("outbound", &self.agent, phase, &svc.name),
                resilience: policies,
                ollama_rate: (svc.name == *snapshot.ollama.service)
                    .then(|| {
                        snapshot
                            .ollama
                            .rate(&self.agent, self.phase, snapshot.budget.as_ref())
                    })
                    .flatten(),
            });
            by_name.insert(Box::<str>::from(svc.name.as_str()), backend);
        }
        *known = live;
        drop(known);
        memory.retain(&|name| by_name.contains_key(name));
        drop(memory);

        let mut rules: HashMap<Box<str>, Vec<Rule>> = HashMap::new();
        for rule in &snapshot.routes {
            // validate() guarantees the backend exists and header names and values are legal.
            let Some(backend) = by_name.get(rule.backend.as_str()) else {
                continue;
            };
            let headers = rule
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect();
            let name = mesh_config::snapshot::normalize_authority(&rule.authority);
            rules.entry(name.into()).or_default().push(Rule {
                path_prefix: rule.path_prefix.as_deref().map(Into::into),
                headers,
                timeout: rule.timeout.unwrap_or(backend.timeout),
                retry_non_idempotent: rule.retry_non_idempotent,
                backend: backend.clone(),
            });
        }
        RouteTable {
            snapshot: Arc::new(snapshot),
            by_name,
            rules: rules
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_slice()))
                .collect(),
            unrouted: {
                let m = TargetMetrics::new("outbound", &self.agent, phase, "");
                m.prime_no_route();
                m
            },
        }
    }
}

/// The published route table plus change notifications for admin and tests.
#[derive(Debug)]
pub struct State {
    table: ArcSwap<RouteTable>,
    compiler: Compiler,
    version_tx: watch::Sender<u64>,
    rejections_tx: watch::Sender<u64>,
}

impl State {
    pub fn new(agent: &str, phase: Phase, initial: Snapshot) -> Arc<Self> {
        let compiler = Compiler::new(agent, phase);
        let version = initial.version;
        let table = compiler.compile(initial);
        ::metrics::gauge!(metrics::SNAPSHOT_VERSION).set(version as f64);
        Arc::new(Self {
            table: ArcSwap::from_pointee(table),
            compiler,
            version_tx: watch::Sender::new(version),
            rejections_tx: watch::Sender::new(0),
        })
    }

    /// The table for one request; holds it alive until the request no longer needs it.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    pub fn current(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Publishes a validated snapshot; requests already routed keep the table they loaded.
    pub fn apply(&self, snapshot: Snapshot) {
        let version = snapshot.version;
        let table = self.compiler.compile(snapshot);
        self.table.store(Arc::new(table));
        ::metrics::gauge!(metrics::SNAPSHOT_VERSION).set(version as f64);
        ::metrics::counter!(metrics::SNAPSHOT_APPLIED).increment(1);
        self.version_tx.send_replace(version);
    }

    /// Records that a candidate snapshot was refused; the table in force is untouched.
    pub fn reject(&self) {
        ::metrics::counter!(metrics::SNAPSHOT_REJECTIONS).increment(1);
        self.rejections_tx.send_modify(|n| *n += 1);
    }

    pub fn versions(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    pub fn rejections(&self) -> watch::Receiver<u64> {
        self.rejections_tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(c: &Compiler, version: u64) -> RouteTable {
        let text = format!(
            "version = {version}\n\n[[services]]\nname = \"b\"\nendpoints = [\"127.0.0.1:10300\"]\n\n\
             [[services]]\nname = \"b-canary\"\nendpoints = [\"127.0.0.1:10300\"]\n"
        );
        let snap = mesh_config::load::snapshot_str(std::path::Path::new("s.toml"), &text).unwrap();
        c.compile(snap)
    }

    fn endpoint(t: &RouteTable, name: &str) -> Arc<Endpoint> {
        t.backend(name).unwrap().endpoints.pick().unwrap().clone()
    }

    #[tokio::test]
    async fn services_sharing_an_address_have_their_own_endpoint_and_keep_it() {
        let c = Compiler::new("a", Phase::Critical);
        let first = compile(&c, 1);
        let (b, canary) = (endpoint(&first, "b"), endpoint(&first, "b-canary"));
        assert_eq!(b.addr, canary.addr);
        assert!(!Arc::ptr_eq(&b, &canary), "one breaker for two services");
        // A new snapshot keeps each service's endpoint, with what it learned.
        let second = compile(&c, 2);
        assert!(Arc::ptr_eq(&b, &endpoint(&second, "b")));
        assert!(Arc::ptr_eq(&canary, &endpoint(&second, "b-canary")));
    }
}
