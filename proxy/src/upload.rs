//! How long a caller may take to send a request body of declared length, as Apache's
//! `mod_reqtimeout` (`body=10,MinRate=1024`): `limits.body_timeout` from the moment the body
//! first keeps the proxy waiting, plus one second for every `limits.body_min_rate` bytes
//! received. A caller that dribbles a declared body (one byte every few seconds) is cut within
//! about `body_timeout` and gets 408, instead of holding the request, its upstream connection
//! and any concurrency slot for the route timeout. Bodies of unknown length (chunked, gRPC
//! streams) are streams whose pace is the application's: they are not timed here.
//!
//! The clock costs nothing for a body that never makes the proxy wait (the common small body):
//! its timer is created at the first wait.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// `[limits]` `body_timeout` and `body_min_rate`.
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    pub timeout: Duration,
    /// Bytes a second; each that many received earns another second.
    pub min_rate: u64,
}

/// The error a request body ends with when its caller sent it too slowly.
#[derive(Debug, thiserror::Error)]
#[error("request body too slow: not complete within {allowed:?} ({received} bytes received)")]
pub struct TooSlow {
    pub allowed: Duration,
    pub received: u64,
}

/// One request body's clock; `off` for bodies that are not timed.
#[derive(Debug, Default)]
pub struct UploadClock {
    limits: Option<UploadLimits>,
    received: u64,
    started: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline `sleep` is set to was computed with this many bytes received.
    armed_at: u64,
}

impl UploadClock {
    /// A clock for a body of `declared` length (none: not timed).
    pub fn new(limits: UploadLimits, declared: Option<u64>) -> Self {
        Self {
            limits: declared.filter(|n| *n > 0).map(|_| limits),
            ..Self::default()
        }
    }

    /// Data arrived.
    pub fn received(&mut self, bytes: usize) {
        self.received += bytes as u64;
    }

    /// The body is waiting: `Some` once the caller has used up its time. Registers `cx` to be
    /// woken at the deadline.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<TooSlow> {
        let limits = self.limits?;
        let started = *self.started.get_or_insert_with(Instant::now);
        let allowed = limits.timeout
            + Duration::from_secs_f64(self.received as f64 / limits.min_rate.max(1) as f64);
        let at = started + allowed;
        match self.sleep.as_mut() {
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            Some(sleep) if self.armed_at != self.received => sleep.as_mut().reset(at),
            Some(_) => {}
        }
        self.armed_at = self.received;
        let sleep = self.sleep.as_mut()?;
        sleep.as_mut().poll(cx).is_ready().then_some(TooSlow {
            allowed,
            received: self.received,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    const LIMITS: UploadLimits = UploadLimits {
        timeout: Duration::from_secs(10),
        min_rate: 100,
    };

    async fn expired(c: &mut UploadClock) -> bool {
        poll_fn(|cx| Poll::Ready(c.poll_expired(cx).is_some())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_dribbling_body_is_cut_after_the_timeout_plus_what_its_bytes_earned() {
        let mut c = UploadClock::new(LIMITS, Some(1000));
        assert!(!expired(&mut c).await);
        // One byte every 5 s earns 10 ms each: the body is cut just after 10 s.
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.received(1);
        assert!(!expired(&mut c).await);
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.received(1);
        assert!(!expired(&mut c).await);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(expired(&mut c).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_never_cut() {
        let mut c = UploadClock::new(LIMITS, Some(100_000));
        for _ in 0..60 {
            assert!(!expired(&mut c).await);
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.received(100);
        }
        assert!(!expired(&mut c).await);
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_of_unknown_length_are_not_timed() {
        let mut c = UploadClock::new(LIMITS, None);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!expired(&mut c).await);
    }
}
