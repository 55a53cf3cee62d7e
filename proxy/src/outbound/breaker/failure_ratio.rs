//! Trips when failures over requests in a sliding window reach a ratio, once the window holds
//! at least `min_requests`. The window is ten buckets, so it slides in tenths.

use std::time::Duration;
use tokio::time::Instant;

const BUCKETS: usize = 10;
/// A sequence number no live bucket has.
const EMPTY: (u64, u32, u32) = (u64::MAX, 0, 0);

/// Parameters of the failure-ratio trigger.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub ratio: f64,
    pub window: Duration,
    pub min_requests: u32,
}

/// Request and failure counts per tenth of the window.
#[derive(Debug)]
pub struct FailureRatio {
    params: Params,
    origin: Instant,
    width: Duration,
    /// (bucket sequence number, requests, failures); a stale sequence means an empty bucket.
    buckets: [(u64, u32, u32); BUCKETS],
}

impl FailureRatio {
    pub fn new(params: Params, now: Instant) -> Self {
        Self {
            params,
            origin: now,
            width: (params.window / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [EMPTY; BUCKETS],
        }
    }

    /// How far apart successes may be credited without moving them to another bucket.
    pub fn width(&self) -> Duration {
        self.width
    }

    /// Records `n` successes at `now`.
    pub fn succeeded(&mut self, n: u32, now: Instant) {
        let (_, slot) = self.slot(now);
        slot.1 = slot.1.saturating_add(n);
    }

    /// Records one outcome at `now`; true when the window's ratio reaches the threshold.
    pub fn record(&mut self, failed: bool, now: Instant) -> bool {
        let (seq, slot) = self.slot(now);
        slot.1 += 1;
        slot.2 += failed as u32;
        if !failed {
            return false;
        }
        let oldest = seq.saturating_sub(BUCKETS as u64 - 1);
        let (requests, failures) = self
            .buckets
            .iter()
            .filter(|b| b.0 >= oldest && b.0 <= seq)
            .fold((0u32, 0u32), |(r, f), b| (r + b.1, f + b.2));
        requests >= self.params.min_requests
            && f64::from(failures) >= self.params.ratio * f64::from(requests)
    }

    pub fn reset(&mut self) {
        self.buckets = [EMPTY; BUCKETS];
    }

    /// The bucket `now` falls in, emptied if it held an older tenth.
    fn slot(&mut self, now: Instant) -> (u64, &mut (u64, u32, u32)) {
        let seq =
            (now.saturating_duration_since(self.origin).as_nanos() / self.width.as_nanos()) as u64;
        let slot = &mut self.buckets[seq as usize % BUCKETS];
        if slot.0 != seq {
            *slot = (seq, 0, 0);
        }
        (seq, slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Params = Params {
        ratio: 0.5,
        window: Duration::from_secs(10),
        min_requests: 10,
    };

    #[tokio::test(start_paused = true)]
    async fn trips_at_the_ratio_only_with_enough_requests() {
        let t0 = Instant::now();
        let mut p = FailureRatio::new(P, t0);
        // Nine requests, all failed: below min_requests, no trip.
        for _ in 0..9 {
            assert!(!p.record(true, t0));
        }
        // The tenth (a failure) brings the window to 10 requests, 10 failures.
        assert!(p.record(true, t0));
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_slide_out_of_the_window() {
        let t0 = Instant::now();
        let mut p = FailureRatio::new(P, t0);
        for _ in 0..9 {
            p.record(true, t0);
        }
        // Eleven seconds later the nine failures have left the window.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..5 {
            p.record(false, t1);
        }
        for _ in 0..4 {
            assert!(!p.record(true, t1));
        }
        // 5 successes + 5 failures = 10 requests at 50%.
        assert!(p.record(true, t1));
    }

    #[tokio::test(start_paused = true)]
    async fn successes_keep_the_ratio_below_threshold() {
        let t0 = Instant::now();
        let mut p = FailureRatio::new(P, t0);
        for i in 0..100 {
            assert!(!p.record(i % 3 == 0, t0), "at {i}");
        }
    }
}
