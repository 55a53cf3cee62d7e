//! The request body sent upstream: the caller's body streamed as it arrives, a small body
//! held in memory so that a retry can send it again, or a body of unknown length streamed and
//! kept at once (`tee.rs`).

use crate::outbound::tee::{TeeBody, TeeError};
use crate::upload::{UploadClock, UploadLimits};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Why a request body stopped: the caller's body failed, or a retry took it over.
pub type BodyError = TeeError<hyper::Error>;

/// A request body on its way upstream. `Replay` and `Tee` hold at most the retry policy's
/// bound.
#[derive(Debug)]
pub enum RequestBody {
    /// The caller's body as it arrives, timed by its upload clock (`upload.rs`).
    Stream(Incoming, UploadClock),
    /// One attempt of a body streamed and kept for replay at once.
    Tee(TeeBody<Incoming>),
    /// Cloning the `Bytes` is a reference count, so each attempt sends the same buffer.
    Replay {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

impl RequestBody {
    pub fn replay(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        RequestBody::Replay {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }

    /// Times a streamed body of declared length against `limits`.
    pub fn time_upload(&mut self, limits: UploadLimits) {
        if let RequestBody::Stream(body, clock) = self {
            if !body.is_end_stream() {
                *clock = UploadClock::new(limits, body.size_hint().exact());
            }
        }
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        RequestBody::Stream(body, UploadClock::default())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Stream(b, clock) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        clock.received(data.len());
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(TeeError::Source))),
                Poll::Pending => match clock.poll_expired(cx) {
                    Some(slow) => Poll::Ready(Some(Err(TeeError::TooSlow(slow)))),
                    None => Poll::Pending,
                },
            },
            RequestBody::Tee(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Replay { data, trailers } => Poll::Ready(
                data.take()
                    .map(|d| Ok(Frame::data(d)))
                    .or_else(|| trailers.take().map(|t| Ok(Frame::trailers(t)))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(b, _) => b.is_end_stream(),
            RequestBody::Tee(b) => b.is_end_stream(),
            RequestBody::Replay { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(b, _) => b.size_hint(),
            RequestBody::Tee(b) => b.size_hint(),
            RequestBody::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
