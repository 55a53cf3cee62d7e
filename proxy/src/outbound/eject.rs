//! Outlier ejection: an endpoint that fails `consecutive_failures` times in a row leaves the
//! balancer for an interval that doubles with each ejection (up to `max_interval`). At most
//! `max_ejected_percent` of a target's endpoints are out at once, so ejection never empties a
//! target. Lock-free: the request path reads one timestamp per candidate endpoint.

use crate::metrics;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

/// Ejection parameters of one target, from the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub consecutive_failures: u32,
    pub interval: Duration,
    pub max_interval: Duration,
    pub max_ejected_percent: u8,
}

/// What ejection knows about one endpoint.
#[derive(Debug, Default)]
pub struct Health {
    failures: AtomicU32,
    /// Ejections since the endpoint was last healthy for `max_interval`: the doubling count.
    ejections: AtomicU32,
    /// Ejected until this time, in ms since [`epoch`]; 0 when never ejected.
    until_ms: AtomicU64,
    /// Counted among its target's ejected endpoints (cleared once the interval has passed).
    ejected: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process epoch, on tokio's clock (so paused-time tests drive it).
pub fn now_ms() -> u64 {
    // +1 so that 0 is never "now" and `until_ms == 0` always reads as not ejected.
    Instant::now()
        .saturating_duration_since(epoch())
        .as_millis() as u64
        + 1
}

// === impl Health ===

impl Health {
    #[inline]
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.until_ms.load(Relaxed) > now_ms
    }

    /// The endpoint answered well: its failure run ends.
    pub fn succeeded(&self, params: &Params, now_ms: u64) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        // Healthy for a full max_interval after its last return: the next ejection is short.
        let until = self.until_ms.load(Relaxed);
        if until != 0 && now_ms > until + params.max_interval.as_millis() as u64 {
            self.ejections.store(0, Relaxed);
        }
    }
}

/// Records a failure of `endpoint` (index `at` in `set`); ejects it when its run of failures
/// reaches the threshold and the target has room. `ejecting` serializes ejection decisions
/// within one target without blocking: a failure that loses the race leaves the decision to
/// the next one. Returns the ejection interval when it ejected.
pub fn failed<'a>(
    set: impl Iterator<Item = &'a Health> + Clone,
    endpoint: &Health,
    ejecting: &AtomicBool,
    params: &Params,
    now_ms: u64,
) -> Option<Duration> {
    let run = endpoint.failures.fetch_add(1, Relaxed) + 1;
    if run < params.consecutive_failures || endpoint.is_ejected(now_ms) {
        return None;
    }
    if ejecting
        .compare_exchange(false, true, Acquire, Relaxed)
        .is_err()
    {
        return None;
    }
    let mut total = 0usize;
    let mut out = 0usize;
    for h in set {
        total += 1;
        if h.ejected.load(Relaxed) {
            if h.is_ejected(now_ms) {
                out += 1;
            } else {
                // Its interval has passed: it is back and no longer counts.
                h.ejected.store(false, Relaxed);
            }
        }
    }
    let room = total * params.max_ejected_percent as usize / 100;
    let interval = if out < room {
        let k = endpoint.ejections.fetch_add(1, Relaxed).min(16);
        let interval = params
            .interval
            .saturating_mul(1 << k)
            .min(params.max_interval);
        endpoint
            .until_ms
            .store(now_ms + interval.as_millis() as u64, Relaxed);
        endpoint.ejected.store(true, Relaxed);
        endpoint.failures.store(0, Relaxed);
        Some(interval)
    } else {
        None
    };
    ejecting.store(false, Release);
    interval
}

/// Records a refusal of `endpoint` (no connection could be made): nothing listens there, so
/// it is ejected now rather than after `consecutive_failures`, with the same share and
/// interval rules as [`failed`].
pub fn refused<'a>(
    set: impl Iterator<Item = &'a Health> + Clone,
    endpoint: &Health,
    ejecting: &AtomicBool,
    params: &Params,
    now_ms: u64,
) -> Option<Duration> {
    let run_before_last = params.consecutive_failures.saturating_sub(1);
    endpoint.failures.fetch_max(run_before_last, Relaxed);
    failed(set, endpoint, ejecting, params, now_ms)
}

/// Counts an ejection and logs it.
pub fn report(target: &str, endpoint: &std::net::SocketAddr, interval: Duration) {
    ::metrics::counter!(metrics::EJECTIONS_TOTAL, "target" => target.to_owned()).increment(1);
    tracing::warn!(
        target_service = target,
        endpoint = %endpoint,
        interval_ms = interval.as_millis() as u64,
        "endpoint ejected"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Params = Params {
        consecutive_failures: 2,
        interval: Duration::from_secs(10),
        max_interval: Duration::from_secs(25),
        max_ejected_percent: 50,
    };

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_for_a_growing_interval() {
        let set: Vec<Health> = (0..2).map(|_| Health::default()).collect();
        let lock = AtomicBool::new(false);
        let t = now_ms();
        assert_eq!(failed(set.iter(), &set[0], &lock, &P, t), None);
        assert_eq!(
            failed(set.iter(), &set[0], &lock, &P, t),
            Some(Duration::from_secs(10))
        );
        assert!(set[0].is_ejected(t));
        assert!(!set[0].is_ejected(t + 10_000));
        // Back, and failing again at once: twice as long, then capped.
        let t = t + 10_000;
        failed(set.iter(), &set[0], &lock, &P, t);
        assert_eq!(
            failed(set.iter(), &set[0], &lock, &P, t),
            Some(Duration::from_secs(20))
        );
        let t = t + 20_000;
        failed(set.iter(), &set[0], &lock, &P, t);
        assert_eq!(
            failed(set.iter(), &set[0], &lock, &P, t),
            Some(Duration::from_secs(25))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_share() {
        let set: Vec<Health> = (0..4).map(|_| Health::default()).collect();
        let lock = AtomicBool::new(false);
        let t = now_ms();
        for h in &set {
            failed(set.iter(), h, &lock, &P, t);
            failed(set.iter(), h, &lock, &P, t);
        }
        // Half of four endpoints.
        assert_eq!(set.iter().filter(|h| h.is_ejected(t)).count(), 2);
        // Once the first two return, the others may go.
        let later = t + 10_001;
        failed(set.iter(), &set[3], &lock, &P, later);
        assert!(set[3].is_ejected(later));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_ejects_at_once_within_the_share() {
        let set: Vec<Health> = (0..4).map(|_| Health::default()).collect();
        let lock = AtomicBool::new(false);
        let t = now_ms();
        assert_eq!(
            refused(set.iter(), &set[0], &lock, &P, t),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            refused(set.iter(), &set[1], &lock, &P, t),
            Some(Duration::from_secs(10))
        );
        // Half of four are out: a third refusing endpoint stays in.
        assert_eq!(refused(set.iter(), &set[2], &lock, &P, t), None);
        assert!(!set[2].is_ejected(t));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_breaks_the_run() {
        let set: Vec<Health> = (0..2).map(|_| Health::default()).collect();
        let lock = AtomicBool::new(false);
        let t = now_ms();
        failed(set.iter(), &set[0], &lock, &P, t);
        set[0].succeeded(&P, t);
        assert_eq!(failed(set.iter(), &set[0], &lock, &P, t), None);
    }
}
