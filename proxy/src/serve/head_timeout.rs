//! A request head that `limits.header_read_timeout` cuts is answered `408 Request Timeout`
//! before the connection closes (Apache's `mod_reqtimeout`, nginx's `client_header_timeout`),
//! so a slow caller learns why. hyper closes on that timeout without writing anything and
//! offers no hook, so the connection's IO is wrapped: it notes whether part of a head has
//! arrived since the last answer, the connection marks the timeout once hyper reports it, and
//! the wrapper writes the answer, without waiting, when hyper drops it.
//!
//! hyper's timer also runs while a keep-alive connection waits for its next request; such a
//! connection has sent nothing since its last answer and is closed silently, as an idle one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
content-length: 34\r\nconnection: close\r\n\r\n{\"error\":\"request_header_timeout\"}";

const IDLE: u8 = 0;
/// Bytes arrived since the last answer: a head is (or may be) under way.
const PARTIAL: u8 = 1;
/// Set by the connection: hyper gave up waiting for the head.
const TIMED_OUT: u8 = 2;

/// What the connection and its IO share.
#[derive(Debug, Default)]
pub struct HeadState(AtomicU8);

/// The connection's IO; see the module docs.
#[derive(Debug)]
pub struct AnswerHeadTimeout<I: AsyncWrite + Unpin> {
    io: I,
    state: Arc<HeadState>,
    /// A copy of the `PARTIAL` bit, so the hot path touches the shared state only on changes.
    partial: bool,
}

// === impl HeadState ===

impl HeadState {
    /// Called once hyper has returned its header timeout. Returns whether part of a head had
    /// arrived (the caller is slow, and gets a 408) rather than nothing (an idle keep-alive).
    pub fn timed_out(&self) -> bool {
        self.0.fetch_or(TIMED_OUT, Ordering::AcqRel) & PARTIAL != 0
    }
}

// === impl AnswerHeadTimeout ===

impl<I: AsyncWrite + Unpin> AnswerHeadTimeout<I> {
    pub fn new(io: I, state: Arc<HeadState>) -> Self {
        Self {
            io,
            state,
            partial: false,
        }
    }

    fn set_partial(&mut self, partial: bool) {
        if self.partial != partial {
            self.partial = partial;
            let bits = if partial { PARTIAL } else { IDLE };
            self.state.0.store(bits, Ordering::Release);
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for AnswerHeadTimeout<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.set_partial(true);
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for AnswerHeadTimeout<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.set_partial(false);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.set_partial(false);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<I: AsyncWrite + Unpin> Drop for AnswerHeadTimeout<I> {
    fn drop(&mut self) {
        if self.state.0.load(Ordering::Acquire) != PARTIAL | TIMED_OUT {
            return;
        }
        // Best effort, never waiting: an idle connection's socket buffer has room for it.
        let mut cx = Context::from_waker(Waker::noop());
        let mut io = Pin::new(&mut self.io);
        if let Poll::Ready(Ok(n)) = io.as_mut().poll_write(&mut cx, ANSWER) {
            if n == ANSWER.len() {
                let _ = io.as_mut().poll_flush(&mut cx);
                let _ = io.poll_shutdown(&mut cx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_partial_head_gets_the_answer_and_an_idle_connection_nothing() {
        // Partial head, then the timeout: the peer reads a 408.
        let (client, server) = tokio::io::duplex(4096);
        let (mut client, state) = (client, Arc::new(HeadState::default()));
        let mut io = AnswerHeadTimeout::new(server, state.clone());
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(n, 18);
        assert!(state.timed_out());
        drop(io);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, ANSWER);
        let body = &answer[answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(body.len(), 34);

        // A request answered, then the timeout while waiting for the next: closed silently.
        let (mut client, server) = tokio::io::duplex(4096);
        let state = Arc::new(HeadState::default());
        let mut io = AnswerHeadTimeout::new(server, state.clone());
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        io.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        assert!(!state.timed_out());
        drop(io);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[tokio::test]
    async fn without_the_timeout_nothing_is_written_on_close() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut io = AnswerHeadTimeout::new(server, Arc::new(HeadState::default()));
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = io.read(&mut buf).await.unwrap();
        drop(io);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
