//! A cap on the connections one listener holds open (`limits.max_connections`), so a flood of
//! idle connections costs a bounded amount of memory. A connection over the cap is answered
//! `503` with `x-mesh-refused: connection_limit` and closed, not silently dropped, and counted
//! in `agent_connections_refused_total{listener}`.

use crate::metrics;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a refused connection is given to read its answer before it is closed.
const LINGER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One open connection; dropping it makes room for another.
#[derive(Debug)]
pub struct Held(Arc<AtomicUsize>);

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// Room for one more connection, if the listener is below its cap.
    pub fn try_hold(&self) -> Option<Held> {
        if self.open.fetch_add(1, Ordering::AcqRel) < self.max {
            return Some(Held(self.open.clone()));
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
        None
    }

    /// Answers `stream` with a 503 and closes it, in a task of its own.
    pub fn refuse(&self, listener: &'static str, mut stream: TcpStream) {
        ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "listener" => listener).increment(1);
        let max = self.max;
        tokio::spawn(async move {
            let body = format!(
                "{{\"error\":\"overloaded\",\"message\":\"the {listener} listener is at its limit of {max} connections\"}}"
            );
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nx-mesh-refused: connection_limit\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(LINGER, async {
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await?;
                // Read what the client sent until it closes: closing with unread bytes would
                // reset the connection and could discard the answer before it is read.
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
        });
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
