//! How long a streamed response body may go without a frame (Envoy's `stream_idle_timeout`).
//! An upstream that stops mid-stream without closing would otherwise hold the caller, the
//! upstream connection and any slot the request took (the one Ollama slot) for ever. The clock
//! runs only while the body waits, so a body whose frames are already read never arms it.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The error a body ends with when its upstream fell silent.
#[derive(Debug, thiserror::Error)]
#[error("no data from upstream for {0:?}")]
pub struct IdleTimeout(pub Duration);

#[derive(Debug)]
pub struct IdleTimer {
    after: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` counts from the start of the current wait.
    armed: bool,
}

impl IdleTimer {
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            sleep: None,
            armed: false,
        }
    }

    pub fn after(&self) -> Duration {
        self.after
    }

    /// A frame arrived: the next wait counts afresh.
    pub fn frame(&mut self) {
        self.armed = false;
    }

    /// The body is waiting: true once it has waited `after` since its last frame. Registers
    /// `cx` to be woken then.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let at = Instant::now() + self.after;
            match self.sleep.as_mut() {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    /// Polls the timer once, as a waiting body would.
    async fn expired(t: &mut IdleTimer) -> bool {
        poll_fn(|cx| Poll::Ready(t.poll_expired(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn fires_only_after_a_whole_silent_period() {
        let mut t = IdleTimer::new(Duration::from_secs(10));
        assert!(!expired(&mut t).await);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!expired(&mut t).await);
        // A frame restarts the count: 6 s more would have fired the first wait.
        t.frame();
        assert!(!expired(&mut t).await);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!expired(&mut t).await);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(expired(&mut t).await);
    }
}
