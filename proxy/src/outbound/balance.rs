//! Endpoint selection: power of two choices over peak-EWMA latency weighted by requests in
//! flight, as linkerd2-proxy and Finagle do, among endpoints that are neither ejected
//! (`eject.rs`) nor behind an open breaker. Lock-free: every statistic is an atomic, and a
//! lost race between two updates only makes an estimate slightly stale.

use crate::outbound::breaker::machine::{Admit, Breaker, BreakerState, Class};
use crate::outbound::eject;
use http::uri::Authority;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How fast old latency observations fade.
const DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint not yet measured.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// One upstream address and what the balancer has learned about it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once rather than per request.
    pub authority: Authority,
    inflight: AtomicU32,
    /// Peak-EWMA round trip in nanoseconds, as f64 bits.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds since `epoch()`.
    stamp_ns: AtomicU64,
    pub health: eject::Health,
    /// This endpoint's own circuit breaker (outbound targets only).
    pub breaker: Option<Breaker>,
    /// Idle and shared connections to this address.
    pub conns: crate::outbound::pool::Conns,
    /// The mesh service whose sidecar listens here (`None`: the local app), named by the
    /// certificate a mutual-TLS peer must present.
    pub peer: Option<Arc<str>>,
}

/// The endpoints of one backend.
#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Box<[Arc<Endpoint>]>,
    ejection: Option<eject::Params>,
    ejecting: AtomicBool,
}

/// An endpoint chosen for one attempt, with its breaker's admission.
#[derive(Clone, Debug)]
pub struct Picked {
    pub index: usize,
    pub endpoint: Arc<Endpoint>,
    pub admit: Option<Admit>,
}

/// Marks a request in flight on an endpoint; records its latency when the response arrives.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

// === impl Endpoint ===

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_breaker(addr, None)
    }

    pub fn with_breaker(addr: SocketAddr, breaker: Option<Breaker>) -> Self {
        Self {
            health: eject::Health::default(),
            breaker,
            conns: Default::default(),
            peer: None,
            addr,
            authority: Authority::try_from(addr.to_string().as_str())
                .expect("a socket address is a valid authority"),
            inflight: AtomicU32::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(nanos_since_epoch(Instant::now())),
        }
    }

    /// Marks the endpoint as a sidecar of the mesh service `name`.
    pub fn for_peer(mut self, name: Arc<str>) -> Self {
        self.peer = Some(name);
        self
    }

    /// Expected cost of sending one more request here.
    fn cost(&self, now_ns: u64) -> f64 {
        let rtt = self.decayed_rtt(now_ns);
        rtt * (self.inflight.load(Relaxed) as f64 + 1.0)
    }

    fn decayed_rtt(&self, now_ns: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Relaxed));
        let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Relaxed)) as f64;
        rtt * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let now_ns = nanos_since_epoch(now);
        let sample = rtt.as_nanos() as f64;
        let current = f64::from_bits(self.rtt_ns.load(Relaxed));
        let next = if sample > current {
            // Peak: jump to a worse latency at once, so a slowing endpoint sheds load quickly.
            sample
        } else {
            let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            current * w + sample * (1.0 - w)
        };
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.stamp_ns.store(now_ns, Relaxed);
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Relaxed)
    }
}

// === impl EndpointSet ===

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self {
            endpoints: endpoints.into_boxed_slice(),
            ejection: None,
            ejecting: AtomicBool::new(false),
        }
    }

    /// The endpoint at `index` (as [`Picked::index`] names it).
    pub fn get(&self, index: usize) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(index)
    }

    /// Turns outlier ejection on for this set.
    pub fn with_ejection(mut self, params: Option<eject::Params>) -> Self {
        self.ejection = params;
        self
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Picks for one attempt among usable endpoints, avoiding index `avoid` (the endpoint a
    /// retry's previous attempt went to) when another is usable. `None` when every endpoint
    /// is ejected or behind an open breaker.
    pub fn pick_usable(&self, avoid: Option<usize>) -> Option<Picked> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now_ms = self.ejection.map(|_| eject::now_ms());
        let usable = |i: usize| -> Option<Option<Admit>> {
            let ep = &self.endpoints[i];
            if now_ms.is_some_and(|now| ep.health.is_ejected(now)) {
                return None;
            }
            match &ep.breaker {
                None => Some(None),
                Some(b) => b.admit().map(Some),
            }
        };
        let picked = |i: usize, admit| Picked {
            index: i,
            endpoint: self.endpoints[i].clone(),
            admit,
        };
        // Two random candidates, neither of them the avoided endpoint when there is a choice.
        let pool: usize = match avoid {
            Some(a) if a < n && n > 1 => n - 1,
            _ => n,
        };
        let skip = |i: usize| match avoid {
            Some(a) if a < n && n > 1 && i >= a => i + 1,
            _ => i,
        };
        let ka = fastrand::usize(..pool);
        let b = (pool > 1).then(|| {
            let mut kb = fastrand::usize(..pool - 1);
            if kb >= ka {
                kb += 1;
            }
            skip(kb)
        });
        let a = skip(ka);
        match (usable(a), b.map(|b| (b, usable(b)))) {
            (Some(aa), Some((b, Some(ab)))) => {
                // Read only when there is a choice: a target with one endpoint never compares.
                let now = nanos_since_epoch(Instant::now());
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                let (win, lose) = if ea.cost(now) <= eb.cost(now) {
                    ((a, aa), (b, ab))
                } else {
                    ((b, ab), (a, aa))
                };
                // The loser's probe slot, if it took one, goes back to its breaker.
                if let (Some(Admit::Probe), Some(breaker)) =
                    (lose.1, &self.endpoints[lose.0].breaker)
                {
                    breaker.record(Admit::Probe, Class::Cancelled);
                }
                return Some(picked(win.0, win.1));
            }
            (Some(aa), _) => return Some(picked(a, aa)),
            (None, Some((b, Some(ab)))) => return Some(picked(b, ab)),
            _ => {}
        }
        // Both candidates unusable: take the first usable endpoint, the avoided one last.
        let start = fastrand::usize(..n);
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| Some(i) != avoid)
            .chain(avoid.filter(|&a| a < n))
            .find_map(|i| usable(i).map(|admit| picked(i, admit)))
    }

    /// Feeds an attempt's outcome to the endpoint's breaker and to ejection.
    pub fn record(&self, picked: &Picked, class: Class, target: &str) {
        if let (Some(admit), Some(b)) = (picked.admit, &picked.endpoint.breaker) {
            b.record(admit, class);
        }
        let Some(params) = &self.ejection else { return };
        let health = &picked.endpoint.health;
        match class {
            Class::Success => health.succeeded(params, eject::now_ms()),
            Class::Failure => {
                let set = self.endpoints.iter().map(|e| &e.health);
                if let Some(interval) =
                    eject::failed(set, health, &self.ejecting, params, eject::now_ms())
                {
                    eject::report(target, &picked.endpoint.addr, interval);
                }
            }
            Class::Cancelled => {}
        }
    }

    /// Whether an endpoint other than `index` could take a request now: not ejected and its
    /// breaker, if any, closed. Then a failure on `index` is confined to that endpoint.
    pub fn usable_besides(&self, index: Option<usize>) -> bool {
        let now_ms = self.ejection.map(|_| eject::now_ms());
        self.endpoints.iter().enumerate().any(|(i, ep)| {
            Some(i) != index
                && !now_ms.is_some_and(|now| ep.health.is_ejected(now))
                && ep
                    .breaker
                    .as_ref()
                    .is_none_or(|b| b.state() == BreakerState::Closed)
        })
    }

    /// An attempt the endpoint refused (no connection could be made): a failure for its
    /// breaker, and ejection at once, within the target's ejection share.
    pub fn refused(&self, picked: &Picked, target: &str) {
        if let (Some(admit), Some(b)) = (picked.admit, &picked.endpoint.breaker) {
            b.record(admit, Class::Failure);
        }
        let Some(params) = &self.ejection else { return };
        let set = self.endpoints.iter().map(|e| &e.health);
        let health = &picked.endpoint.health;
        if let Some(interval) = eject::refused(set, health, &self.ejecting, params, eject::now_ms())
        {
            eject::report(target, &picked.endpoint.addr, interval);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Picks two distinct endpoints at random and returns the cheaper one.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        match self.endpoints.len() {
            0 => None,
            1 => Some(&self.endpoints[0]),
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let now = nanos_since_epoch(Instant::now());
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                Some(if ea.cost(now) <= eb.cost(now) { ea } else { eb })
            }
        }
    }
}

// === impl InFlight ===

impl InFlight {
    pub fn start(endpoint: Arc<Endpoint>) -> Self {
        endpoint.inflight.fetch_add(1, Relaxed);
        Self {
            endpoint,
            started: Instant::now(),
        }
    }

    /// The response head arrived: record the round trip.
    pub fn responded(&self) {
        let now = Instant::now();
        self.endpoint.observe(now - self.started, now);
    }

    /// The request failed: count the time spent as a round trip so a failing endpoint looks
    /// expensive rather than free.
    pub fn failed(&self) {
        let now = Instant::now();
        let spent = (now - self.started).max(DEFAULT_RTT);
        self.endpoint.observe(spent, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.inflight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port))))
    }

    #[test]
    fn slow_endpoint_loses_every_pairwise_choice() {
        let fast = ep(1);
        let slow = ep(2);
        let now = Instant::now();
        fast.observe(Duration::from_millis(1), now);
        slow.observe(Duration::from_millis(200), now);
        let set = EndpointSet::new(vec![fast.clone(), slow]);
        // With two endpoints both are always compared, so the cheaper one always wins.
        for _ in 0..100 {
            assert_eq!(set.pick().unwrap().addr, fast.addr);
        }
    }

    #[test]
    fn requests_in_flight_raise_cost() {
        let a = ep(1);
        let b = ep(2);
        let set = EndpointSet::new(vec![a.clone(), b.clone()]);
        let _busy: Vec<_> = (0..4).map(|_| InFlight::start(a.clone())).collect();
        assert_eq!(set.pick().unwrap().addr, b.addr);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_confined_while_another_endpoint_is_usable() {
        let params = eject::Params {
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            max_interval: Duration::from_secs(60),
            max_ejected_percent: 100,
        };
        let set = EndpointSet::new(vec![ep(1), ep(2)]).with_ejection(Some(params));
        assert!(set.usable_besides(Some(0)));
        // The second endpoint refuses: it is out at once.
        let second = set.pick_usable(Some(0)).unwrap();
        assert_eq!(second.index, 1);
        set.refused(&second, "t");
        // A failure on the first is no longer confined to it; nothing was picked, even less.
        assert!(!set.usable_besides(Some(0)));
        assert!(set.usable_besides(Some(1)));
        assert!(set.usable_besides(None));
    }

    #[test]
    fn inflight_is_released_on_drop() {
        let a = ep(1);
        drop(InFlight::start(a.clone()));
        assert_eq!(a.inflight(), 0);
    }

    #[test]
    fn peak_decays_towards_new_samples() {
        let a = ep(1);
        let t0 = Instant::now();
        a.observe(Duration::from_millis(100), t0);
        a.observe(Duration::from_millis(1), t0 + DECAY * 3);
        let rtt = f64::from_bits(a.rtt_ns.load(Relaxed));
        assert!(rtt < Duration::from_millis(10).as_nanos() as f64, "{rtt}");
    }
}
