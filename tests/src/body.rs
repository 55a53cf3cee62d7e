//! Bodies shared by the fake upstreams and the clients: whole, empty, or fed frame by frame by
//! the test through a channel (data chunks, then optional trailers).

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every harness request and response uses.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body the test feeds: each `send` becomes one data frame, `trailers` ends it with a
/// trailers frame, and dropping the sender ends it.
pub fn channel() -> (BodySender, Body) {
    let (tx, rx) = mpsc::unbounded_channel();
    (BodySender { tx }, ChannelBody { rx }.boxed())
}

/// The writing end of [`channel`].
#[derive(Clone, Debug)]
pub struct BodySender {
    tx: mpsc::UnboundedSender<Frame<Bytes>>,
}

struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Frame<Bytes>>,
}

// === impl BodySender ===

impl BodySender {
    /// Queues one data frame; panics if the body was already dropped by its reader.
    pub fn send(&self, chunk: impl Into<Bytes>) {
        self.tx
            .send(Frame::data(chunk.into()))
            .expect("body reader dropped before the chunk was sent");
    }

    /// Queues one data frame; gives it back when the reader has dropped the body.
    pub fn try_send(&self, chunk: impl Into<Bytes>) -> Result<(), Bytes> {
        self.tx.send(Frame::data(chunk.into())).map_err(|e| {
            e.0.into_data()
                .unwrap_or_else(|_| unreachable!("only data frames are sent here"))
        })
    }

    /// Resolves once the reader has dropped the body (the peer went away).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Ends the body with trailers.
    pub fn trailers(self, trailers: HeaderMap) {
        self.tx
            .send(Frame::trailers(trailers))
            .expect("body reader dropped before the trailers were sent");
    }

    /// Ends the body (the same as dropping the sender).
    pub fn finish(self) {}
}

// === impl ChannelBody ===

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
