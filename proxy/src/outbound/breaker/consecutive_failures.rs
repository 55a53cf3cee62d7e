//! Trips after `threshold` failures in a row; any success starts the count again.

/// Parameters of the consecutive-failures trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub threshold: u32,
}

/// Counts failures since the last success.
#[derive(Debug)]
pub struct ConsecutiveFailures {
    params: Params,
    failures: u32,
}

impl ConsecutiveFailures {
    pub fn new(params: Params) -> Self {
        Self {
            params,
            failures: 0,
        }
    }

    /// Records one outcome; true when this failure reaches the threshold.
    pub fn record(&mut self, failed: bool) -> bool {
        if failed {
            self.failures = self.failures.saturating_add(1);
            self.failures >= self.params.threshold
        } else {
            self.failures = 0;
            false
        }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_at_the_threshold_and_a_success_resets() {
        let mut p = ConsecutiveFailures::new(Params { threshold: 3 });
        assert!(!p.record(true));
        assert!(!p.record(true));
        // A success in between: the count starts over.
        assert!(!p.record(false));
        assert!(!p.record(true));
        assert!(!p.record(true));
        assert!(p.record(true));
    }
}
