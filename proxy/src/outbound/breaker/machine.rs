//! One circuit breaker: a gate the request path reads (atomics only) and a task that owns the
//! policies and moves the gate: closed -> open -> half-open -> closed (or open again with a
//! longer cool-down). Failures and probe outcomes reach the task over a bounded channel;
//! ordinary successes, nearly every request, are only counted in the gate, and the task credits
//! them before it judges the next failure and once per failure-ratio bucket. The task is
//! spawned on the first outcome and ends when the breaker is dropped.

use super::consecutive_failures::{self, ConsecutiveFailures};
use super::failure_ratio::{self, FailureRatio};
use crate::metrics;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Outcomes waiting for the task; beyond this a burst is sampled rather than queued.
const CHANNEL: usize = 1024;

/// A breaker's parameters, from the snapshot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub consecutive: Option<consecutive_failures::Params>,
    pub ratio: Option<failure_ratio::Params>,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    pub probes: u32,
}

/// The gauge values of `agent_circuit_breaker_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// How a request was let through the gate; a probe's outcome decides a half-open breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Normal,
    Probe,
}

/// What became of an admitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Success,
    Failure,
    /// Ended without an answer for a reason that says nothing about the upstream (the caller
    /// went away); a probe's slot is given back.
    Cancelled,
}

#[derive(Debug)]
struct Outcome {
    class: Class,
    probe: bool,
}

/// The state every request reads.
#[derive(Debug)]
struct Gate {
    state: AtomicU8,
    probes: AtomicU32,
    /// When an open breaker half-opens, in milliseconds since `opened_at`'s epoch: the
    /// `Retry-After` a fallback answers with.
    reopen_ms: AtomicU64,
    epoch: Instant,
    /// Successes of normally admitted requests not yet credited by the task.
    successes: AtomicU32,
}

/// A circuit breaker for one target or one endpoint. Cheap to check; see the module doc.
#[derive(Debug)]
pub struct Breaker {
    params: Params,
    gate: Arc<Gate>,
    tx: OnceLock<mpsc::Sender<Outcome>>,
    target: Arc<str>,
    endpoint: Arc<str>,
}

// === impl BreakerState ===

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

// === impl Breaker ===

impl Breaker {
    /// `endpoint` is empty for a target's breaker.
    pub fn new(params: Params, target: &str, endpoint: &str) -> Self {
        let b = Self {
            params,
            gate: Arc::new(Gate {
                state: AtomicU8::new(BreakerState::Closed as u8),
                probes: AtomicU32::new(0),
                reopen_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                successes: AtomicU32::new(0),
            }),
            tx: OnceLock::new(),
            target: target.into(),
            endpoint: endpoint.into(),
        };
        ::metrics::gauge!(metrics::BREAKER_STATE, "target" => b.target.to_string(), "endpoint" => b.endpoint.to_string()).set(0.0);
        b
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.gate.state.load(Acquire))
    }

    /// Lets a request through, or not. Half-open admits up to `probes` requests.
    #[inline]
    pub fn admit(&self) -> Option<Admit> {
        match BreakerState::from_u8(self.gate.state.load(Acquire)) {
            BreakerState::Closed => Some(Admit::Normal),
            BreakerState::Open => None,
            BreakerState::HalfOpen => self
                .gate
                .probes
                .fetch_update(AcqRel, Acquire, |p| p.checked_sub(1))
                .ok()
                .map(|_| Admit::Probe),
        }
    }

    /// How long until an open breaker lets probes through (at least 1 s, for `Retry-After`).
    pub fn retry_after(&self) -> Duration {
        let at = self.gate.epoch + Duration::from_millis(self.gate.reopen_ms.load(Relaxed));
        at.saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1))
    }

    /// Reports what became of an admitted request. Never blocks: a full channel drops it.
    pub fn record(&self, admit: Admit, class: Class) {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(CHANNEL);
            let task = Task {
                params: self.params,
                gate: self.gate.clone(),
                target: self.target.clone(),
                endpoint: self.endpoint.clone(),
            };
            tokio::spawn(task.run(rx));
            tx
        });
        if admit == Admit::Normal {
            match class {
                Class::Success => {
                    self.gate.successes.fetch_add(1, Relaxed);
                    return;
                }
                // Says nothing about the upstream and decides no probe.
                Class::Cancelled => return,
                Class::Failure => {}
            }
        }
        let _ = tx.try_send(Outcome {
            class,
            probe: admit == Admit::Probe,
        });
    }
}

/// The next tick of the success-crediting interval; never, when there is none.
async fn tick(every: &mut Option<tokio::time::Interval>) {
    match every {
        Some(every) => {
            every.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How long an open breaker waits before its next probe, having been open for `open_for`:
/// `cooldown` at first and after a probe that failed early in an outage, so one probe sent just
/// before the upstream came back costs one cool-down, not a doubled one; half the time it has
/// been open once that is longer, so an upstream that stays down is probed ever more rarely (as
/// a doubling backoff would), up to `max_cooldown`.
fn cooldown(p: &Params, open_for: Duration) -> Duration {
    p.cooldown.max((open_for / 2).min(p.max_cooldown))
}

/// The owner of a breaker's policies.
struct Task {
    params: Params,
    gate: Arc<Gate>,
    target: Arc<str>,
    endpoint: Arc<str>,
}

// === impl Task ===

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Outcome>) {
        let p = self.params;
        let mut consecutive = p.consecutive.map(ConsecutiveFailures::new);
        let mut ratio = p.ratio.map(|r| FailureRatio::new(r, Instant::now()));
        // When the breaker opened, if it has not closed since: failed probes space the next
        // ones by the time it has been open (see `cooldown`).
        let mut opened: Option<Instant> = None;
        // Counted successes land in the ratio's bucket of their time, give or take a bucket.
        let mut credit = ratio.as_ref().map(|r| {
            let mut every = tokio::time::interval(r.width());
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every
        });
        let mut state = BreakerState::Closed;
        loop {
            state = match state {
                BreakerState::Closed => {
                    let o = tokio::select! {
                        o = rx.recv() => match o {
                            Some(o) => o,
                            None => return,
                        },
                        _ = tick(&mut credit) => {
                            self.credit(&mut consecutive, &mut ratio, Instant::now());
                            continue;
                        }
                    };
                    if o.probe || o.class == Class::Cancelled {
                        continue;
                    }
                    let failed = o.class == Class::Failure;
                    let now = Instant::now();
                    // Successes counted since the last look came before this outcome was read.
                    self.credit(&mut consecutive, &mut ratio, now);
                    let by_count = consecutive.as_mut().is_some_and(|c| c.record(failed));
                    let by_ratio = ratio.as_mut().is_some_and(|r| r.record(failed, now));
                    if !(by_count || by_ratio) {
                        continue;
                    }
                    BreakerState::Open
                }
                BreakerState::Open => {
                    let now = Instant::now();
                    let cooldown = cooldown(&p, now - *opened.get_or_insert(now));
                    let until = now + cooldown;
                    self.gate.reopen_ms.store(
                        until.saturating_duration_since(self.gate.epoch).as_millis() as u64,
                        Relaxed,
                    );
                    self.transition(BreakerState::Open, Some(cooldown));
                    // Outcomes of requests admitted before the trip say nothing new.
                    self.gate.successes.store(0, Release);
                    let sleep = tokio::time::sleep_until(until);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            o = rx.recv() => if o.is_none() { return },
                        }
                    }
                    BreakerState::HalfOpen
                }
                BreakerState::HalfOpen => {
                    self.gate.probes.store(p.probes, Release);
                    self.transition(BreakerState::HalfOpen, None);
                    let mut passed = 0;
                    let next = loop {
                        let Some(o) = rx.recv().await else { return };
                        if !o.probe {
                            continue;
                        }
                        match o.class {
                            Class::Success => {
                                passed += 1;
                                if passed >= p.probes {
                                    break BreakerState::Closed;
                                }
                            }
                            Class::Failure => break BreakerState::Open,
                            Class::Cancelled => {
                                self.gate.probes.fetch_add(1, AcqRel);
                            }
                        }
                    };
                    self.gate.probes.store(0, Release);
                    if next == BreakerState::Closed {
                        opened = None;
                        if let Some(c) = consecutive.as_mut() {
                            c.reset();
                        }
                        if let Some(r) = ratio.as_mut() {
                            r.reset();
                        }
                        self.gate.successes.store(0, Release);
                        self.transition(BreakerState::Closed, None);
                    }
                    next
                }
            };
        }
    }

    /// Takes the successes counted in the gate into the policies, as of `now`.
    fn credit(
        &self,
        consecutive: &mut Option<ConsecutiveFailures>,
        ratio: &mut Option<FailureRatio>,
        now: Instant,
    ) {
        let n = self.gate.successes.swap(0, AcqRel);
        if n == 0 {
            return;
        }
        if let Some(c) = consecutive.as_mut() {
            c.record(false);
        }
        if let Some(r) = ratio.as_mut() {
            r.succeeded(n, now);
        }
    }

    fn transition(&self, to: BreakerState, cooldown: Option<Duration>) {
        let from = BreakerState::from_u8(self.gate.state.swap(to as u8, AcqRel));
        let (target, endpoint) = (self.target.to_string(), self.endpoint.to_string());
        ::metrics::gauge!(metrics::BREAKER_STATE, "target" => target.clone(), "endpoint" => endpoint.clone())
            .set(to as u8 as f64);
        ::metrics::counter!(
            metrics::BREAKER_TRANSITIONS,
            "target" => target, "endpoint" => endpoint, "to" => to.as_str()
        )
        .increment(1);
        let cooldown_ms = cooldown.map(|c| c.as_millis() as u64);
        tracing::warn!(
            target_service = &*self.target,
            endpoint = &*self.endpoint,
            from = from.as_str(),
            to = to.as_str(),
            cooldown_ms,
            "circuit breaker transition"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            consecutive: Some(consecutive_failures::Params { threshold: 3 }),
            ratio: None,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(3),
            probes: 2,
        }
    }

    /// Half the requests of a 10 s window failing, once it holds four, opens the breaker.
    fn ratio_only() -> Params {
        Params {
            consecutive: None,
            ratio: Some(failure_ratio::Params {
                ratio: 0.5,
                window: Duration::from_secs(10),
                min_requests: 4,
            }),
            ..params()
        }
    }

    /// Lets the breaker task run until it has nothing left to do.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn fail(b: &Breaker) {
        let admit = b.admit().expect("admitted");
        b.record(admit, Class::Failure);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_threshold_and_half_opens_after_cooldown() {
        let b = Breaker::new(params(), "t", "");
        fail(&b);
        fail(&b);
        settle().await;
        assert_eq!(b.state(), BreakerState::Closed);
        // The third failure in a row opens it: requests are turned away.
        fail(&b);
        settle().await;
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), None);
        assert_eq!(b.retry_after(), Duration::from_secs(1));

        tokio::time::sleep(Duration::from_millis(999)).await;
        settle().await;
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(2)).await;
        settle().await;
        // Half-open: exactly two probes get through.
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p1 = b.admit();
        let p2 = b.admit();
        assert_eq!((p1, p2), (Some(Admit::Probe), Some(Admit::Probe)));
        assert_eq!(b.admit(), None);
        // Both succeed: closed again.
        b.record(Admit::Probe, Class::Success);
        settle().await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(Admit::Probe, Class::Success);
        settle().await;
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Some(Admit::Normal));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_are_spaced_by_the_cooldown_then_by_half_the_outage_capped() {
        let b = Breaker::new(params(), "t", "");
        for _ in 0..3 {
            fail(&b);
        }
        settle().await;
        // Open for 1 s, 2 s, 3 s when each probe fails: the next waits the 1 s cool-down, and
        // not a doubled one; from 4 s open, half of it (2 s, 3 s); then the 3 s cap.
        let mut expected = [1000, 1000, 1500, 2250, 3000, 3000].into_iter();
        tokio::time::sleep(Duration::from_secs(1)).await;
        for _ in 0..6 {
            settle().await;
            assert_eq!(b.state(), BreakerState::HalfOpen);
            let probe = b.admit().unwrap();
            b.record(probe, Class::Failure);
            settle().await;
            assert_eq!(b.state(), BreakerState::Open);
            let wait = Duration::from_millis(expected.next().unwrap());
            // `retry_after` rounds up to whole seconds of at least one.
            assert_eq!(b.retry_after(), wait.max(Duration::from_secs(1)));
            tokio::time::sleep(wait).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_back_just_after_a_failed_probe_is_found_one_cooldown_later() {
        let b = Breaker::new(params(), "t", "");
        for _ in 0..3 {
            fail(&b);
        }
        settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        // The probe fails just before the upstream is back.
        b.record(b.admit().unwrap(), Class::Failure);
        settle().await;
        // One cool-down later the probes pass and the breaker closes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        succeed_probes(&b, 2);
        settle().await;
        assert_eq!(b.state(), BreakerState::Closed);
    }

    fn succeed_probes(b: &Breaker, n: usize) {
        for _ in 0..n {
            let probe = b.admit().expect("a probe");
            assert_eq!(probe, Admit::Probe);
            b.record(probe, Class::Success);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_gives_its_slot_back() {
        let mut p = params();
        p.probes = 1;
        let b = Breaker::new(p, "t", "");
        for _ in 0..3 {
            fail(&b);
        }
        settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        let probe = b.admit().unwrap();
        assert_eq!(b.admit(), None);
        b.record(probe, Class::Cancelled);
        settle().await;
        assert_eq!(b.admit(), Some(Admit::Probe));
    }

    fn succeed(b: &Breaker, n: usize) {
        for _ in 0..n {
            b.record(b.admit().expect("admitted"), Class::Success);
        }
    }

    /// Fails `n` more requests and returns the state the task settles in.
    async fn after_failures(b: &Breaker, n: usize) -> BreakerState {
        for _ in 0..n {
            fail(b);
        }
        settle().await;
        b.state()
    }

    #[tokio::test(start_paused = true)]
    async fn a_counted_success_starts_the_failure_count_again() {
        let b = Breaker::new(params(), "t", "");
        assert_eq!(after_failures(&b, 2).await, BreakerState::Closed);
        succeed(&b, 1);
        assert_eq!(after_failures(&b, 2).await, BreakerState::Closed);
        assert_eq!(after_failures(&b, 1).await, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn counted_successes_leave_the_ratio_window_with_their_bucket() {
        let b = Breaker::new(ratio_only(), "t", "");
        succeed(&b, 20);
        settle().await;
        // Credited when they happened, the successes have left the window eleven seconds on:
        // four failures alone now make the ratio.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(after_failures(&b, 3).await, BreakerState::Closed);
        assert_eq!(after_failures(&b, 1).await, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn recent_counted_successes_hold_the_ratio_down() {
        let b = Breaker::new(ratio_only(), "t", "");
        succeed(&b, 20);
        assert_eq!(after_failures(&b, 19).await, BreakerState::Closed);
        assert_eq!(after_failures(&b, 1).await, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_from_before_the_trip_are_ignored() {
        let b = Breaker::new(params(), "t", "");
        let admitted: Vec<_> = (0..5).map(|_| b.admit().unwrap()).collect();
        for a in &admitted[..3] {
            b.record(*a, Class::Failure);
        }
        settle().await;
        assert_eq!(b.state(), BreakerState::Open);
        // Two successes from requests admitted while closed do not close it.
        for a in &admitted[3..] {
            b.record(*a, Class::Success);
        }
        settle().await;
        assert_eq!(b.state(), BreakerState::Open);
    }
}
