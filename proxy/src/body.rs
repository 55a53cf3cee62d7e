//! The response body every stack returns: the upstream's body streamed frame by frame, or a
//! small local answer. It carries the guards that must live exactly as long as the response.

use crate::access_log::AccessRecord;
use crate::idle::{IdleTimeout, IdleTimer};
use crate::outbound::settle::Settle;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream reset the body mid-stream.
pub const UPSTREAM_RESET: &str = "upstream_reset";
/// The upstream sent nothing for the idle timeout and the body was cut.
pub const UPSTREAM_IDLE: &str = "upstream_idle";

/// Whether a body's end kind says the upstream broke the answer off (rather than the caller
/// leaving): what breakers and the Ollama gateway count as a failed answer.
pub fn broken_by_upstream(kind: &str) -> bool {
    kind == UPSTREAM_RESET || kind == UPSTREAM_IDLE
}

/// A streaming response body. Dropping it before the end is a caller reset: the access record
/// notes it, and held permits are released at once.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Inner,
    bytes: u64,
    permit: Option<OwnedSemaphorePermit>,
    /// The calling address's place at the inbound limit, held with `permit`.
    client: Option<crate::inbound::clients::ClientPermit>,
    record: Option<AccessRecord>,
    on_end: Option<OnEnd>,
    /// Sees each data frame as it passes (the gateway reads token usage from a traced answer).
    tap: Option<Tap>,
    /// The upstream connection, returned to its pool when the body ends.
    conn: Option<crate::outbound::pool::Checkin>,
    idle: Option<IdleTimer>,
    /// Outcomes judged when the body ends: the target's breaker and the endpoint's.
    settle: [Option<Settle>; 2],
    /// What a `grpc-status` in the trailers stands for, read only while outcomes wait.
    trailer_status: Option<u16>,
}

/// Called with every data frame of the body, in order.
pub struct Tap(Box<dyn FnMut(&Bytes) + Send + Sync>);

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

/// Runs once when the body ends: with `None` when it ended cleanly, else the error kind
/// (`client_reset`, `upstream_reset`).
pub struct OnEnd(Box<dyn FnOnce(Option<&'static str>) + Send + Sync>);

impl std::fmt::Debug for OnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnEnd")
    }
}

#[derive(Debug)]
enum Inner {
    Upstream(Incoming),
    Local(Full<Bytes>),
    /// An upstream answer read whole before it was passed on: its data, then its trailers
    /// (boxed: rare, and inline they would double the size of every body).
    Whole(Option<Bytes>, Option<Box<HeaderMap>>),
}

// === impl ProxyBody ===

impl ProxyBody {
    pub fn upstream(body: Incoming) -> Self {
        Self::new(Inner::Upstream(body))
    }

    pub fn json(text: String) -> Self {
        Self::new(Inner::Local(Full::new(Bytes::from(text))))
    }

    pub fn bytes(bytes: Bytes) -> Self {
        Self::new(Inner::Local(Full::new(bytes)))
    }

    pub fn empty() -> Self {
        Self::new(Inner::Local(Full::new(Bytes::new())))
    }

    /// Reads the rest of the body (`len` bytes expected) into memory before anyone else sees
    /// it: what ends with the upstream body (outcomes, the pooled connection) ends now, and
    /// the data then goes out as one frame. An error is the upstream body's.
    pub async fn read_whole(&mut self, len: usize) -> Result<(), BoxError> {
        let (data, trailers) = read_frames(self, len).await?;
        self.inner = Inner::Whole((!data.is_empty()).then_some(data), trailers.map(Box::new));
        // Counted again as the caller reads it.
        self.bytes = 0;
        Ok(())
    }

    fn new(inner: Inner) -> Self {
        Self {
            inner,
            bytes: 0,
            permit: None,
            client: None,
            record: None,
            on_end: None,
            tap: None,
            conn: None,
            idle: None,
            settle: [None, None],
            trailer_status: None,
        }
    }

    /// Reports `outcome` when the body ends: a success if it ends whole, a failure if the
    /// upstream breaks it off.
    pub fn settle_at_end(&mut self, outcome: Settle) {
        match self.settle.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(outcome),
            // Two layers judge an answer; a third has nowhere to wait, so it is told now.
            None => outcome.finish(Settle::class(None, true), None),
        }
    }

    /// Cuts the body (error kind `upstream_idle`) when the upstream sends nothing for `after`.
    pub fn idle_timeout(&mut self, after: Duration) {
        self.idle = Some(IdleTimer::new(after));
    }

    /// Returns the upstream connection to its pool when the body ends (or is dropped).
    pub fn return_conn(&mut self, conn: crate::outbound::pool::Checkin) {
        self.conn = Some(conn);
    }

    /// Holds a concurrency permit until the body ends or is dropped.
    pub fn hold_permit(&mut self, permit: OwnedSemaphorePermit) {
        self.permit = Some(permit);
    }

    /// Holds the calling address's place at the inbound limit until the body ends or is dropped.
    pub fn hold_client(&mut self, client: crate::inbound::clients::ClientPermit) {
        self.client = Some(client);
    }

    /// Shows `f` every data frame as it passes to the caller.
    pub fn tap(&mut self, f: impl FnMut(&Bytes) + Send + Sync + 'static) {
        self.tap = Some(Tap(Box::new(f)));
    }

    /// Calls `f` when the body ends or is dropped (a gateway slot is released there).
    pub fn on_end(&mut self, f: impl FnOnce(Option<&'static str>) + Send + Sync + 'static) {
        self.on_end = Some(OnEnd(Box::new(f)));
    }

    /// Completes the access record when the body ends (or is dropped).
    pub fn attach_record(&mut self, record: AccessRecord) {
        if self.inner_is_end() {
            record.finish(0, None);
        } else {
            self.record = Some(record);
        }
    }

    fn inner_is_end(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_end_stream(),
            Inner::Whole(data, trailers) => data.is_none() && trailers.is_none(),
        }
    }

    fn end(&mut self, error: Option<&'static str>) {
        self.permit = None;
        self.client = None;
        self.conn = None;
        if self.settle.iter().any(Option::is_some) {
            let class = Settle::class(error, self.inner_is_end());
            for outcome in self.settle.iter_mut().filter_map(Option::take) {
                outcome.finish(class, self.trailer_status);
            }
        }
        if let Some(OnEnd(f)) = self.on_end.take() {
            // A body that was complete before anyone polled it was not cut short.
            f(error.filter(|_| !self.inner_is_end()));
        }
        if let Some(record) = self.record.take() {
            record.finish(self.bytes, error);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Inner::Upstream(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(frame) => {
                    if let Some(idle) = this.idle.as_mut() {
                        idle.frame();
                    }
                    frame.map(|r| r.map_err(Into::into))
                }
                Poll::Pending => {
                    let Some(idle) = this.idle.as_mut() else {
                        return Poll::Pending;
                    };
                    if !idle.poll_expired(cx) {
                        return Poll::Pending;
                    }
                    let after = idle.after();
                    this.idle = None;
                    this.end(Some(UPSTREAM_IDLE));
                    // Dropping the upstream body now closes its stream or connection.
                    this.inner = Inner::Local(Full::new(Bytes::new()));
                    return Poll::Ready(Some(Err(IdleTimeout(after).into())));
                }
            },
            Inner::Local(b) => {
                ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(|e| match e {}))
            }
            Inner::Whole(data, trailers) => match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            },
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(Tap(tap)) = this.tap.as_mut() {
                        tap(data);
                    }
                } else if let Some(trailers) = f.trailers_ref() {
                    if this.settle.iter().any(Option::is_some) {
                        this.trailer_status = crate::grpc::trailer_status(trailers);
                    }
                }
                if this.inner_is_end() {
                    this.end(None);
                }
            }
            Some(Err(_)) => this.end(Some(UPSTREAM_RESET)),
            None => this.end(None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner_is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(b) => b.size_hint(),
            Inner::Whole(data, _) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len()) as u64)
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if self.record.is_some() || self.on_end.is_some() || self.settle.iter().any(Option::is_some)
        {
            self.end(Some("client_reset"));
        }
    }
}

/// Reads `body` to its end: its data (`len` bytes expected) and its trailers. By hand rather
/// than `collect()`: nearly always the data is one frame, kept as it came without a copy.
async fn read_frames<B>(body: &mut B, len: usize) -> Result<(Bytes, Option<HeaderMap>), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(chunk) => match (joined.as_mut(), first.take()) {
                (Some(buf), _) => buf.extend_from_slice(&chunk),
                (None, None) => first = Some(chunk),
                (None, Some(head)) => {
                    let mut buf = BytesMut::with_capacity(len.max(head.len() + chunk.len()));
                    buf.extend_from_slice(&head);
                    buf.extend_from_slice(&chunk);
                    joined = Some(buf);
                }
            },
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let data = joined.map(BytesMut::freeze).or(first).unwrap_or_default();
    Ok((data, trailers))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[tokio::test]
    async fn a_body_read_whole_keeps_its_frames_in_order_and_its_trailers() {
        use http_body_util::StreamBody;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"hel"))),
            Ok(http_body::Frame::data(Bytes::from_static(b"lo "))),
            Ok(http_body::Frame::data(Bytes::from_static(b"mesh"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut body = StreamBody::new(futures_util::stream::iter(frames));
        let (data, t) = read_frames(&mut body, 10).await.unwrap();
        assert_eq!(data, Bytes::from_static(b"hello mesh"));
        assert_eq!(t.unwrap()["grpc-status"], "0");

        // One frame is passed on as it came.
        let one = Bytes::from_static(b"ok");
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> =
            vec![Ok(http_body::Frame::data(one.clone()))];
        let mut body = StreamBody::new(futures_util::stream::iter(frames));
        let (data, t) = read_frames(&mut body, 2).await.unwrap();
        assert_eq!(data.as_ptr(), one.as_ptr());
        assert!(t.is_none());
    }

    #[test]
    fn a_local_body_is_no_larger_than_an_upstream_one() {
        // Every response moves a `ProxyBody` several times on its way out: a variant larger
        // than the upstream body's would make each of those copies longer.
        let tag = std::mem::size_of::<usize>();
        assert!(
            std::mem::size_of::<Inner>() <= std::mem::size_of::<Incoming>() + tag,
            "Inner is {} bytes, Incoming {}",
            std::mem::size_of::<Inner>(),
            std::mem::size_of::<Incoming>()
        );
    }
}
