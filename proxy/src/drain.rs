//! One drain signal shared by every listener and connection. Draining stops accepting, lets
//! requests in flight finish, and completes when the last connection has closed.

use tokio::sync::{mpsc, watch};

/// Owned by the process: starts the drain and waits for it.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// Held by every listener and connection; the drain completes once all are dropped.
#[derive(Clone, Debug)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl Drain {
    pub fn new() -> (Drain, Watch) {
        let (signal, rx) = watch::channel(false);
        let (alive, done) = mpsc::channel(1);
        (
            Drain { signal, done },
            Watch {
                signal: rx,
                _alive: alive,
            },
        )
    }

    /// Whether draining has started, for readiness; holding it does not delay the drain.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Signals every holder of a [`Watch`] and waits until all have let go.
    pub async fn drain(mut self) {
        self.signal.send_replace(true);
        // `recv` returns `None` once every sender (every `Watch`) is dropped.
        while self.done.recv().await.is_some() {}
    }
}

impl Watch {
    /// Resolves when draining starts.
    pub async fn signaled(&mut self) {
        // An error means the `Drain` is gone: that is a drain too.
        let _ = self.signal.wait_for(|draining| *draining).await;
    }
}

/// Resolves once a background-task stop flag is set (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (drain, watch) = Drain::new();
        let mut conn = watch.clone();
        drop(watch);
        let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            conn.signaled().await;
            // The connection finishes its work after the signal, then lets go.
            closed_tx.send(()).unwrap();
            drop(conn);
        });
        drain.drain().await;
        // The drain cannot complete before the connection has closed.
        assert!(closed_rx.try_recv().is_ok());
        task.await.unwrap();
    }
}
