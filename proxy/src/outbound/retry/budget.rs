//! A retry budget per target: over a sliding second, retries may add at most `ratio` of the
//! requests plus `min_per_second`, so a failing target sees at most (1 + ratio) times the
//! offered load (plus the floor) instead of `max_attempts` times. Lock-free counters in ten
//! buckets of 100 ms; a bucket reused for a new tenth may lose an increment racing its reset,
//! which only makes the budget slightly more generous for that tenth.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::Duration;
use tokio::time::Instant;

const BUCKETS: usize = 10;
const WIDTH: Duration = Duration::from_millis(100);

/// Budget parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub ratio: f64,
    pub min_per_second: u32,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which tenth of a second since `epoch` this bucket counts; `u64::MAX` when unused.
    seq: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// Requests and retries over the last second for one target.
#[derive(Debug)]
pub struct Budget {
    params: Params,
    epoch: Instant,
    buckets: [Bucket; BUCKETS],
}

impl Budget {
    pub fn new(params: Params) -> Self {
        let b = Self {
            params,
            epoch: Instant::now(),
            buckets: Default::default(),
        };
        for bucket in &b.buckets {
            bucket.seq.store(u64::MAX, Relaxed);
        }
        b
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    fn seq(&self) -> u64 {
        (Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos()
            / WIDTH.as_nanos()) as u64
    }

    fn bucket(&self, seq: u64) -> &Bucket {
        let b = &self.buckets[seq as usize % BUCKETS];
        let old = b.seq.load(Acquire);
        if old != seq && b.seq.compare_exchange(old, seq, AcqRel, Acquire).is_ok() {
            b.requests.store(0, Relaxed);
            b.retries.store(0, Relaxed);
        }
        b
    }

    /// Counts a request (its first attempt).
    pub fn deposit(&self) {
        self.bucket(self.seq()).requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let seq = self.seq();
        let oldest = seq.saturating_sub(BUCKETS as u64 - 1);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.seq.load(Acquire);
            if s >= oldest && s <= seq {
                requests += u64::from(b.requests.load(Relaxed));
                retries += u64::from(b.retries.load(Relaxed));
            }
        }
        let allowed = self.params.ratio * requests as f64 + f64::from(self.params.min_per_second);
        if (retries + 1) as f64 > allowed {
            return false;
        }
        self.bucket(seq).retries.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_plus_a_floor() {
        let b = Budget::new(Params {
            ratio: 0.2,
            min_per_second: 2,
        });
        for _ in 0..100 {
            b.deposit();
        }
        // 20% of 100 plus a floor of 2.
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 22);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let b = Budget::new(Params {
            ratio: 0.5,
            min_per_second: 0,
        });
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 5);
        // A second later those requests and retries have left the window.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!b.withdraw());
        for _ in 0..4 {
            b.deposit();
        }
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 2);
    }
}
