//! A request body of unknown length (chunked HTTP/1.1, HTTP/2 without `content-length`) that
//! streams to the first attempt as it arrives and keeps a copy, up to a bound, so that a retry
//! can send it again. The copy holds the frames' `Bytes` (reference counts, no byte copies);
//! once the body outgrows the bound the copy is dropped and the request is no longer replayable.
//!
//! Each attempt gets its own [`TeeBody`]: it first replays what earlier attempts read, then
//! reads on from the caller. Starting an attempt supersedes the previous one, whose body then
//! fails so its upstream request is aborted rather than ending short.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

/// The retry loop's handle on a teed body: hands out one [`TeeBody`] per attempt.
#[derive(Debug)]
pub struct Tee<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

/// One attempt's view of the body. Only the latest attempt may read.
#[derive(Debug)]
pub struct TeeBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    attempt: u32,
    /// Chunks of the copy this attempt has sent.
    pos: usize,
    trailers_sent: bool,
}

/// Why an attempt's body stopped early.
#[derive(Debug)]
pub enum TeeError<E> {
    /// The caller's body failed.
    Source(E),
    /// A later attempt took over the body.
    Superseded,
    /// The caller sent its body too slowly (`upload.rs`).
    TooSlow(crate::upload::TooSlow),
}

#[derive(Debug)]
struct Shared<B> {
    source: B,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    /// Bytes read from the caller so far.
    len: u64,
    max: u64,
    /// The copy is gone (too large, caller's body failed, or no longer needed).
    dropped: bool,
    /// The caller's body has ended.
    ended: bool,
    /// The attempt allowed to read.
    attempt: u32,
}

fn lock<B>(m: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    // Only this request's attempts share the lock; a panic while holding it leaves
    // consistent state (every update is a single assignment), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Tee ===

impl<B> Tee<B> {
    /// Tees `source`, keeping at most `max` bytes.
    pub fn new(source: B, max: u64) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                chunks: Vec::new(),
                trailers: None,
                len: 0,
                max,
                dropped: false,
                ended: false,
                attempt: 0,
            })),
        }
    }

    /// Whether another attempt could send the whole body.
    pub fn replayable(&self) -> bool {
        let s = lock(&self.shared);
        s.attempt == 0 || !s.dropped
    }

    /// The body for the next attempt, superseding the previous one; `None` when the body can
    /// no longer be replayed.
    pub fn attempt(&self) -> Option<TeeBody<B>> {
        let mut s = lock(&self.shared);
        if s.attempt > 0 && s.dropped {
            return None;
        }
        s.attempt += 1;
        Some(TeeBody {
            shared: self.shared.clone(),
            attempt: s.attempt,
            pos: 0,
            trailers_sent: false,
        })
    }

    /// No more attempts will be made: stop keeping a copy and free what was kept.
    pub fn release(&self) {
        let mut s = lock(&self.shared);
        s.dropped = true;
        s.chunks = Vec::new();
        s.trailers = None;
    }
}

// === impl TeeBody ===

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = TeeError<B::Error>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut s = lock(&this.shared);
        if s.attempt != this.attempt {
            return Poll::Ready(Some(Err(TeeError::Superseded)));
        }
        if let Some(chunk) = s.chunks.get(this.pos) {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.ended {
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let frame = match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                this.trailers_sent = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                // What was read cannot be completed: no attempt can send this body again.
                s.dropped = true;
                s.chunks = Vec::new();
                return Poll::Ready(Some(Err(TeeError::Source(e))));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                s.len += data.len() as u64;
                if !s.dropped {
                    if s.len > s.max {
                        // Too large to keep: it streams on, but is no longer replayable.
                        s.dropped = true;
                        s.chunks = Vec::new();
                    } else {
                        s.chunks.push(data.clone());
                        this.pos += 1;
                    }
                }
                Frame::data(data)
            }
            Err(frame) => {
                if let Some(t) = frame.trailers_ref() {
                    s.ended = true;
                    this.trailers_sent = true;
                    if !s.dropped {
                        s.trailers = Some(t.clone());
                    }
                }
                frame
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.attempt == self.attempt
            && s.ended
            && self.pos >= s.chunks.len()
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        let kept: u64 = s
            .chunks
            .get(self.pos..)
            .map_or(0, |rest| rest.iter().map(|c| c.len() as u64).sum());
        if s.ended {
            SizeHint::with_exact(kept)
        } else {
            let mut hint = SizeHint::new();
            hint.set_lower(kept + s.source.size_hint().lower());
            hint
        }
    }
}

// === impl TeeError ===

impl<E: fmt::Display> fmt::Display for TeeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeeError::Source(e) => write!(f, "request body: {e}"),
            TeeError::Superseded => f.write_str("a later attempt took over the request body"),
            TeeError::TooSlow(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for TeeError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TeeError::Source(e) => Some(e),
            TeeError::Superseded | TeeError::TooSlow(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A caller's body fed by the test: `Pending` when nothing is queued and it is not closed.
    #[derive(Default)]
    struct Source {
        frames: VecDeque<Frame<Bytes>>,
        closed: bool,
        fail: bool,
    }

    #[derive(Debug)]
    struct Broken;

    impl fmt::Display for Broken {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("broken")
        }
    }

    impl Body for Source {
        type Data = Bytes;
        type Error = Broken;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
            let this = self.get_mut();
            match this.frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None if this.fail => Poll::Ready(Some(Err(Broken))),
                None if this.closed => Poll::Ready(None),
                None => Poll::Pending,
            }
        }
    }

    fn source(chunks: &[&'static str], trailers: bool) -> Source {
        let mut frames: VecDeque<_> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "1".parse().unwrap());
            frames.push_back(Frame::trailers(t));
        }
        Source {
            frames,
            closed: true,
            fail: false,
        }
    }

    /// Reads what is ready without waiting: the frames' data joined, whether the body ended.
    fn read_ready<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> (String, bool)
    where
        B::Error: fmt::Debug,
    {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut out = String::new();
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        out.push_str(std::str::from_utf8(&d).unwrap());
                    }
                }
                Poll::Ready(Some(Err(e))) => panic!("{e:?}"),
                Poll::Ready(None) => return (out, true),
                Poll::Pending => return (out, false),
            }
        }
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_body_and_trailers() {
        let tee = Tee::new(source(&["ab", "cd"], true), 64);
        let first = tee.attempt().unwrap().collect().await.unwrap();
        assert_eq!(first.trailers().unwrap()["x-sum"], "1");
        assert_eq!(first.to_bytes(), "abcd");
        assert!(tee.replayable());
        let again = tee.attempt().unwrap();
        assert_eq!(again.size_hint().exact(), Some(4));
        let again = again.collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["x-sum"], "1");
        assert_eq!(again.to_bytes(), "abcd");
    }

    #[test]
    fn the_first_attempt_streams_before_the_body_ends() {
        // Nothing waits for the whole body: the first chunk goes out while the rest is pending.
        let mut src = source(&["ab"], false);
        src.closed = false;
        let tee = Tee::new(src, 64);
        let mut first = tee.attempt().unwrap();
        assert_eq!(read_ready(&mut first), ("ab".to_owned(), false));
        // The first attempt failed before the body ended: the retry replays the kept prefix,
        // then reads on from the caller.
        let mut second = tee.attempt().unwrap();
        {
            let mut s = lock(&tee.shared);
            s.source
                .frames
                .push_back(Frame::data(Bytes::from_static(b"cd")));
            s.source.closed = true;
        }
        assert_eq!(read_ready(&mut second), ("abcd".to_owned(), true));
        // The superseded attempt fails rather than ending short.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(matches!(
            Pin::new(&mut first).poll_frame(&mut cx),
            Poll::Ready(Some(Err(TeeError::Superseded)))
        ));
    }

    #[tokio::test]
    async fn a_body_over_the_bound_streams_once_and_is_not_replayable() {
        let tee = Tee::new(source(&["abc", "def", "ghi"], false), 5);
        let first = tee.attempt().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(first, "abcdefghi");
        assert!(!tee.replayable());
        assert!(tee.attempt().is_none());
    }

    #[test]
    fn a_failed_caller_body_is_not_replayable() {
        let mut src = source(&["ab"], false);
        src.closed = false;
        src.fail = true;
        let tee = Tee::new(src, 64);
        let mut first = tee.attempt().unwrap();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(matches!(
            Pin::new(&mut first).poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(matches!(
            Pin::new(&mut first).poll_frame(&mut cx),
            Poll::Ready(Some(Err(TeeError::Source(Broken))))
        ));
        assert!(tee.attempt().is_none());
    }

    #[tokio::test]
    async fn release_frees_the_copy() {
        let tee = Tee::new(source(&["ab"], false), 64);
        tee.attempt().unwrap().collect().await.unwrap();
        tee.release();
        assert!(lock(&tee.shared).chunks.is_empty());
        assert!(tee.attempt().is_none());
    }
}
