//! The dispatcher: one task owns the queue, the slots and the breaker. Requests send it commands
//! and await their turn; a released slot goes to the next request in the same step, so Ollama
//! does not idle while anyone waits. No lock is shared with the request path.

use super::queue::{Bounds, FairQueue, Full, Id, Popped};
use crate::metrics;
use mesh_config::ollama::GatewayParams;
use mesh_config::Phase;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// What requests (and their slots) tell the dispatcher.
#[derive(Debug)]
pub enum Cmd {
    Enqueue {
        id: Id,
        phase: Phase,
        caller: Arc<str>,
        reply: oneshot::Sender<Admission>,
    },
    /// The request gave up waiting (`reply` wants its refusal) or its caller went away.
    Leave {
        id: Id,
        reply: Option<oneshot::Sender<Option<Refusal>>>,
    },
    Release {
        phase: Phase,
        held: Duration,
        outcome: Outcome,
    },
    Params(GatewayParams),
}

/// The dispatcher's answer to a queued request.
#[derive(Debug)]
pub enum Admission {
    Granted(Slot),
    Refused(Refusal),
}

/// Why a request was not admitted, where it stood and when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub position: usize,
    pub retry_after: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    QueueFull,
    OverQuota,
    QueueTimeout,
    Unavailable,
}

/// How a served request ended, as far as Ollama's health is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Ollama could not be reached or broke the connection.
    Failed,
    /// The caller left (or the request timed out) first: says nothing about Ollama.
    Cancelled,
}

/// Leave to send one request to Ollama. Dropping it gives the slot back at once.
#[derive(Debug)]
pub struct Slot {
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    phase: Phase,
    granted: Instant,
    outcome: Outcome,
    /// Where the request stood in the queue when it entered, and why it had to wait.
    entry: Entry,
}

/// A request's place when it joined the queue (1-based), and what it waited for: `slots_busy`
/// (every slot taken), `breaker_probe` (Ollama on probation), or `none` (a slot was free).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub position: usize,
    pub reason: &'static str,
}

/// The request side's way to the dispatcher; cheap to share.
#[derive(Debug)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicU64,
}

/// The task's state. Run it with [`Dispatcher::run`].
#[derive(Debug)]
pub struct Dispatcher {
    rx: mpsc::UnboundedReceiver<Cmd>,
    tx: mpsc::WeakUnboundedSender<Cmd>,
    params: GatewayParams,
    queue: FairQueue<Waiter>,
    busy: usize,
    breaker: Breaker,
    /// Mean slot hold time, for `Retry-After` estimates.
    mean_hold: Duration,
    metrics: Metrics,
}

#[derive(Debug)]
struct Waiter {
    phase: Phase,
    since: Instant,
    reply: oneshot::Sender<Admission>,
    entry: Entry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Breaker {
    Closed {
        failures: u32,
    },
    /// Refusing everything until `until`.
    Open {
        until: Instant,
    },
    /// One probe may go; its outcome closes or reopens the breaker.
    HalfOpen {
        probing: bool,
    },
}

const REJECT_REASONS: [Reason; 4] = [
    Reason::QueueFull,
    Reason::OverQuota,
    Reason::QueueTimeout,
    Reason::Unavailable,
];

#[derive(Debug)]
struct Metrics {
    depth: [::metrics::Gauge; 3],
    wait: [::metrics::Histogram; 3],
    admitted: [::metrics::Counter; 3],
    rejected: [[::metrics::Counter; 4]; 3],
    cancelled_queued: [::metrics::Counter; 3],
    cancelled_served: [::metrics::Counter; 3],
    slots: ::metrics::Gauge,
    busy: ::metrics::Gauge,
    busy_micros: ::metrics::Counter,
    breaker_open: ::metrics::Gauge,
}

// === impl Reason ===

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::OverQuota => "over_quota",
            Reason::QueueTimeout => "queue_timeout",
            Reason::Unavailable => "ollama_unavailable",
        }
    }
}

// === impl Slot ===

impl Slot {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    pub fn entry(&self) -> Entry {
        self.entry
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Cmd::Release {
                phase: self.phase,
                held: self.granted.elapsed(),
                outcome: self.outcome,
            });
        }
    }
}

// === impl Handle ===

impl Handle {
    pub fn next_id(&self) -> Id {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a command; false when the dispatcher is gone.
    pub fn send(&self, cmd: Cmd) -> bool {
        self.tx.send(cmd).is_ok()
    }
}

// === impl Dispatcher ===

impl Dispatcher {
    pub fn new(params: GatewayParams) -> (Dispatcher, Handle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Metrics::new();
        metrics.slots.set(params.parallel as f64);
        let d = Dispatcher {
            rx,
            tx: tx.downgrade(),
            params,
            queue: FairQueue::default(),
            busy: 0,
            breaker: Breaker::Closed { failures: 0 },
            mean_hold: Duration::ZERO,
            metrics,
        };
        let handle = Handle {
            tx,
            next_id: AtomicU64::new(0),
        };
        (d, handle)
    }

    /// Runs until every [`Handle`] and [`Slot`] is gone.
    pub async fn run(mut self) {
        loop {
            self.dispatch();
            let reopen = match self.breaker {
                Breaker::Open { until } => Some(until),
                _ => None,
            };
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                () = sleep_until(reopen), if reopen.is_some() => {
                    self.breaker = Breaker::HalfOpen { probing: false };
                }
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Enqueue {
                id,
                phase,
                caller,
                reply,
            } => self.enqueue(id, phase, &caller, reply),
            Cmd::Leave { id, reply } => self.leave(id, reply),
            Cmd::Release {
                phase,
                held,
                outcome,
            } => self.release(phase, held, outcome),
            Cmd::Params(params) => {
                self.metrics.slots.set(params.parallel as f64);
                self.params = params;
            }
        }
    }

    /// Gives free slots to waiting requests, best first.
    fn dispatch(&mut self) {
        while self.busy < self.params.parallel {
            match self.breaker {
                Breaker::Open { .. } | Breaker::HalfOpen { probing: true } => return,
                _ => {}
            }
            let Some(Popped { phase, item, .. }) = self.queue.pop() else {
                return;
            };
            self.metrics.depth[phase as usize].set(self.queue.len(phase) as f64);
            let Some(tx) = self.tx.upgrade() else {
                return;
            };
            let slot = Slot {
                tx: Some(tx),
                phase,
                granted: Instant::now(),
                outcome: Outcome::Cancelled,
                entry: item.entry,
            };
            match item.reply.send(Admission::Granted(slot)) {
                Ok(()) => {
                    self.busy += 1;
                    self.metrics.busy.set(self.busy as f64);
                    self.metrics.admitted[phase as usize].increment(1);
                    self.metrics.wait[phase as usize].record(item.since.elapsed().as_secs_f64());
                    if let Breaker::HalfOpen { .. } = self.breaker {
                        self.breaker = Breaker::HalfOpen { probing: true };
                    }
                }
                Err(admission) => {
                    // The caller left before its Leave arrived; the slot was never taken.
                    if let Admission::Granted(mut slot) = admission {
                        slot.tx = None;
                    }
                    self.metrics.cancelled_queued[phase as usize].increment(1);
                }
            }
        }
    }

    fn enqueue(
        &mut self,
        id: Id,
        phase: Phase,
        caller: &Arc<str>,
        reply: oneshot::Sender<Admission>,
    ) {
        let now = Instant::now();
        if let Breaker::Open { until } = self.breaker {
            let refusal = Refusal {
                reason: Reason::Unavailable,
                position: 0,
                retry_after: until.saturating_duration_since(now),
            };
            self.refuse(phase, reply, refusal);
            return;
        }
        let bounds = Bounds {
            phase: self.params.queue.get(phase),
            caller: self.params.per_agent_queue,
        };
        let reason = match self.breaker {
            Breaker::HalfOpen { probing: true } => "breaker_probe",
            _ if self.busy >= self.params.parallel => "slots_busy",
            _ => "none",
        };
        let waiter = Waiter {
            phase,
            since: now,
            reply,
            entry: Entry {
                position: 0,
                reason,
            },
        };
        match self.queue.push(phase, caller, id, waiter, bounds) {
            Ok(position) => {
                if let Some(w) = self.queue.get_mut(id) {
                    w.entry.position = position;
                }
                self.metrics.depth[phase as usize].set(self.queue.len(phase) as f64)
            }
            Err((full, waiter)) => {
                let (reason, position) = match full {
                    Full::Phase { len } => (Reason::QueueFull, self.ahead_of(phase) + len + 1),
                    Full::Caller { len } => (Reason::OverQuota, len + 1),
                };
                let refusal = Refusal {
                    reason,
                    position,
                    retry_after: self.estimate(position),
                };
                self.refuse(phase, waiter.reply, refusal);
            }
        }
    }

    fn leave(&mut self, id: Id, reply: Option<oneshot::Sender<Option<Refusal>>>) {
        let Some((waiter, position)) = self.queue.remove(id) else {
            // Already admitted: the admission is in the request's channel.
            if let Some(reply) = reply {
                let _ = reply.send(None);
            }
            return;
        };
        let phase = waiter.phase;
        self.metrics.depth[phase as usize].set(self.queue.len(phase) as f64);
        match reply {
            Some(reply) => {
                let refusal = Refusal {
                    reason: Reason::QueueTimeout,
                    position,
                    retry_after: self.estimate(position),
                };
                self.metrics.rejected[phase as usize][reason_index(Reason::QueueTimeout)]
                    .increment(1);
                let _ = reply.send(Some(refusal));
            }
            None => self.metrics.cancelled_queued[phase as usize].increment(1),
        }
    }

    fn release(&mut self, phase: Phase, held: Duration, outcome: Outcome) {
        self.busy = self.busy.saturating_sub(1);
        self.metrics.busy.set(self.busy as f64);
        self.metrics.busy_micros.increment(held.as_micros() as u64);
        if outcome == Outcome::Cancelled {
            self.metrics.cancelled_served[phase as usize].increment(1);
        } else {
            // An exponentially weighted mean of how long a request holds a slot.
            self.mean_hold = if self.mean_hold.is_zero() {
                held
            } else {
                (self.mean_hold * 4 + held) / 5
            };
        }
        self.breaker = match (self.breaker, outcome) {
            (Breaker::HalfOpen { .. }, Outcome::Cancelled) => Breaker::HalfOpen { probing: false },
            (b, Outcome::Cancelled) => b,
            (Breaker::Closed { .. } | Breaker::HalfOpen { .. }, Outcome::Succeeded) => {
                self.metrics.breaker_open.set(0.0);
                Breaker::Closed { failures: 0 }
            }
            (Breaker::Closed { failures }, Outcome::Failed)
                if failures + 1 < self.params.breaker.failures =>
            {
                Breaker::Closed {
                    failures: failures + 1,
                }
            }
            (Breaker::Closed { .. } | Breaker::HalfOpen { .. }, Outcome::Failed) => {
                self.open();
                return;
            }
            // Requests admitted before the breaker opened finish while it is open.
            (b @ Breaker::Open { .. }, _) => b,
        };
    }

    /// Ollama is down: refuse everyone waiting now instead of letting them time out.
    fn open(&mut self) {
        let cooldown = self.params.breaker.cooldown;
        self.breaker = Breaker::Open {
            until: Instant::now() + cooldown,
        };
        self.metrics.breaker_open.set(1.0);
        tracing::warn!(
            cooldown_ms = cooldown.as_millis() as u64,
            queued = self.queue.total(),
            "ollama unreachable: refusing queued requests"
        );
        for Popped { phase, item, .. } in self.queue.drain() {
            let refusal = Refusal {
                reason: Reason::Unavailable,
                position: 0,
                retry_after: cooldown,
            };
            self.refuse(phase, item.reply, refusal);
        }
        for phase in Phase::ALL {
            self.metrics.depth[phase as usize].set(0.0);
        }
    }

    fn refuse(&self, phase: Phase, reply: oneshot::Sender<Admission>, refusal: Refusal) {
        self.metrics.rejected[phase as usize][reason_index(refusal.reason)].increment(1);
        let _ = reply.send(Admission::Refused(refusal));
    }

    /// Requests in phases served before `phase`.
    fn ahead_of(&self, phase: Phase) -> usize {
        Phase::ALL
            .iter()
            .take_while(|p| **p != phase)
            .map(|p| self.queue.len(*p))
            .sum()
    }

    /// When a request at `position` can expect a slot, within [1 s, max(1 s, queue timeout)].
    fn estimate(&self, position: usize) -> Duration {
        let rounds = position.div_ceil(self.params.parallel.max(1)) as u32;
        let floor = Duration::from_secs(1);
        (self.mean_hold * rounds).clamp(floor, self.params.queue_timeout.max(floor))
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn reason_index(reason: Reason) -> usize {
    REJECT_REASONS
        .iter()
        .position(|r| *r == reason)
        .expect("every reason is listed")
}

// === impl Metrics ===

impl Metrics {
    fn new() -> Self {
        use metrics::*;
        let per_phase =
            |f: &dyn Fn(&'static str) -> ::metrics::Counter| Phase::ALL.map(|p| f(p.as_str()));
        Self {
            depth: Phase::ALL
                .map(|p| ::metrics::gauge!(OLLAMA_QUEUE_DEPTH, "phase" => p.as_str())),
            wait: Phase::ALL
                .map(|p| ::metrics::histogram!(OLLAMA_QUEUE_WAIT, "phase" => p.as_str())),
            admitted: per_phase(&|p| ::metrics::counter!(OLLAMA_ADMITTED, "phase" => p)),
            rejected: Phase::ALL.map(|p| {
                REJECT_REASONS.map(|r| {
                    ::metrics::counter!(OLLAMA_REJECTED, "phase" => p.as_str(), "reason" => r.as_str())
                })
            }),
            cancelled_queued: per_phase(&|p| {
                ::metrics::counter!(OLLAMA_CANCELLED, "phase" => p, "reason" => "queued")
            }),
            cancelled_served: per_phase(&|p| {
                ::metrics::counter!(OLLAMA_CANCELLED, "phase" => p, "reason" => "served")
            }),
            slots: ::metrics::gauge!(OLLAMA_SLOTS),
            busy: ::metrics::gauge!(OLLAMA_SLOTS_BUSY),
            busy_micros: ::metrics::counter!(OLLAMA_SLOT_BUSY),
            breaker_open: ::metrics::gauge!(OLLAMA_BREAKER_OPEN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    struct Client {
        handle: Arc<Handle>,
    }

    impl Client {
        fn start(params: GatewayParams) -> Self {
            let (d, handle) = Dispatcher::new(params);
            tokio::spawn(d.run());
            Client {
                handle: Arc::new(handle),
            }
        }

        fn enqueue(&self, phase: Phase, caller: &str) -> (Id, oneshot::Receiver<Admission>) {
            let id = self.handle.next_id();
            let (reply, rx) = oneshot::channel();
            assert!(self.handle.send(Cmd::Enqueue {
                id,
                phase,
                caller: caller.into(),
                reply,
            }));
            (id, rx)
        }
    }

    async fn granted(rx: oneshot::Receiver<Admission>) -> Slot {
        match rx.await.expect("dispatcher answers") {
            Admission::Granted(slot) => slot,
            Admission::Refused(r) => panic!("refused: {r:?}"),
        }
    }

    async fn refused(rx: oneshot::Receiver<Admission>) -> Refusal {
        match rx.await.expect("dispatcher answers") {
            Admission::Granted(_) => panic!("granted"),
            Admission::Refused(r) => r,
        }
    }

    fn params() -> GatewayParams {
        GatewayParams::default()
    }

    #[tokio::test(start_paused = true)]
    async fn one_slot_goes_to_queued_critical_before_queued_specialized() {
        let gw = Client::start(params());
        let (_, first) = gw.enqueue(Phase::Specialized, "s0");
        let busy = granted(first).await;
        // While the slot is busy, a specialized and then a critical request queue up.
        let (_, spec) = gw.enqueue(Phase::Specialized, "s1");
        let (_, crit) = gw.enqueue(Phase::Critical, "c1");
        drop(busy);
        let mut crit_slot = granted(crit).await;
        assert_eq!(crit_slot.phase(), Phase::Critical);
        crit_slot.set_outcome(Outcome::Succeeded);
        drop(crit_slot);
        assert_eq!(granted(spec).await.phase(), Phase::Specialized);
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_bounds_slots_in_use() {
        let gw = Client::start(GatewayParams {
            parallel: 2,
            ..params()
        });
        let mut rxs: VecDeque<_> = (0..5)
            .map(|i| gw.enqueue(Phase::Performance, &format!("p{i}")).1)
            .collect();
        let a = granted(rxs.pop_front().unwrap()).await;
        let _b = granted(rxs.pop_front().unwrap()).await;
        let mut third = rxs.pop_front().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(third.try_recv().is_err(), "a third slot was given out");
        drop(a);
        let _c = granted(third).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_left_the_queue_is_skipped() {
        let gw = Client::start(params());
        let (_, first) = gw.enqueue(Phase::Critical, "a");
        let busy = granted(first).await;
        let (gone, gone_rx) = gw.enqueue(Phase::Critical, "b");
        let (_, next) = gw.enqueue(Phase::Critical, "c");
        drop(gone_rx);
        assert!(gw.handle.send(Cmd::Leave {
            id: gone,
            reply: None
        }));
        drop(busy);
        granted(next).await;
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_reports_the_position_held() {
        let gw = Client::start(params());
        let _busy = granted(gw.enqueue(Phase::Critical, "a").1).await;
        let _w1 = gw.enqueue(Phase::Critical, "b");
        let (id, _w2) = gw.enqueue(Phase::Specialized, "c");
        let (tx, rx) = oneshot::channel();
        gw.handle.send(Cmd::Leave {
            id,
            reply: Some(tx),
        });
        let refusal = rx.await.unwrap().expect("was still queued");
        assert_eq!(refusal.reason, Reason::QueueTimeout);
        assert_eq!(refusal.position, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn full_phase_is_503_and_own_quota_is_429() {
        let gw = Client::start(GatewayParams {
            per_agent_queue: 1,
            queue: mesh_config::ollama::PhaseQueues {
                critical: 2,
                ..Default::default()
            },
            ..params()
        });
        let _busy = granted(gw.enqueue(Phase::Critical, "a").1).await;
        let _q1 = gw.enqueue(Phase::Critical, "b");
        let over = refused(gw.enqueue(Phase::Critical, "b").1).await;
        assert_eq!(over.reason, Reason::OverQuota);
        let _q2 = gw.enqueue(Phase::Critical, "c");
        let full = refused(gw.enqueue(Phase::Critical, "d").1).await;
        assert_eq!((full.reason, full.position), (Reason::QueueFull, 3));
        assert!(full.retry_after >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_timeout_under_a_second_still_gives_retry_after() {
        let gw = Client::start(GatewayParams {
            queue_timeout: Duration::from_millis(200),
            per_agent_queue: 1,
            ..params()
        });
        let _busy = granted(gw.enqueue(Phase::Critical, "a").1).await;
        let _q = gw.enqueue(Phase::Critical, "b");
        let over = refused(gw.enqueue(Phase::Critical, "b").1).await;
        assert_eq!(over.retry_after, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_flushes_the_queue_then_probes_once() {
        let gw = Client::start(params());
        // Three consecutive failures open the breaker and refuse whoever waits.
        for i in 0..3 {
            let mut s = granted(gw.enqueue(Phase::Critical, "a").1).await;
            s.set_outcome(Outcome::Failed);
            if i < 2 {
                drop(s);
                continue;
            }
            let (_, waiting) = gw.enqueue(Phase::Specialized, "b");
            drop(s);
            assert_eq!(refused(waiting).await.reason, Reason::Unavailable);
        }
        // Open: new arrivals are refused at once.
        let r = refused(gw.enqueue(Phase::Critical, "a").1).await;
        assert_eq!(r.reason, Reason::Unavailable);
        assert!(r.retry_after <= Duration::from_secs(5));
        // After the cooldown one probe goes; a second waits for its outcome.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut probe = granted(gw.enqueue(Phase::Critical, "a").1).await;
        let (_, mut second) = gw.enqueue(Phase::Critical, "b");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            second.try_recv().is_err(),
            "second request went during the probe"
        );
        probe.set_outcome(Outcome::Succeeded);
        drop(probe);
        granted(second).await;
    }
}
