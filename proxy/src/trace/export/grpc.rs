//! OTLP/gRPC transport without a gRPC framework: each batch is one unary call of
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` over one HTTP/2 (h2c)
//! connection held with hyper's client, which the sidecar already carries (with the request
//! body type of the outbound pool, so the HTTP/2 client code is shared). The request is the
//! `ExportTraceServiceRequest` that opentelemetry-proto builds (as the OTLP/HTTP exporter
//! builds it), in one length-prefixed gRPC message. A call succeeded only when the collector
//! ended it with `grpc-status: 0`; any other status, a broken connection or the timeout fails
//! the batch, and the caller counts its spans dropped. Spans the collector reports rejected in
//! `partial_success` are counted dropped too.

use crate::outbound::replay::RequestBody;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::trace::SpanData;
use opentelemetry_sdk::Resource;
use prost::Message;
use std::time::Duration;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// A collector's answer is a few bytes; anything near this is not an OTLP answer.
const MAX_RESPONSE: usize = 64 * 1024;

/// One collector reached over OTLP/gRPC, with the connection of the last call kept open.
pub struct Exporter {
    host: String,
    port: u16,
    uri: Uri,
    timeout: Duration,
    resource: ResourceAttributesWithSchema,
    conn: Option<http2::SendRequest<RequestBody>>,
}

/// Why a batch did not reach the collector.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP/2 with the collector: {0}")]
    Http(#[from] hyper::Error),
    #[error("the collector answered HTTP {0}")]
    Status(StatusCode),
    #[error("the collector answered grpc-status {code}: {message}")]
    Grpc { code: u32, message: String },
    #[error("the collector's answer: {0}")]
    Malformed(&'static str),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

// === impl Exporter ===

impl Exporter {
    /// `endpoint` is `http://host:port` (checked at bootstrap: no path, no TLS).
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let parsed: Uri = endpoint.parse().map_err(|e| format!("{endpoint}: {e}"))?;
        let authority = parsed
            .authority()
            .ok_or_else(|| format!("{endpoint}: no host"))?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(EXPORT_PATH)
            .build()
            .map_err(|e| format!("{endpoint}: {e}"))?;
        Ok(Self {
            host: authority.host().trim_matches(['[', ']']).to_owned(),
            port: authority.port_u16().unwrap_or(80),
            uri,
            timeout,
            resource: ResourceAttributesWithSchema::default(),
            conn: None,
        })
    }

    pub fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }

    /// Sends `batch` in one call; on success, how many spans the collector rejected.
    pub async fn export(&mut self, batch: Vec<SpanData>) -> Result<u64, CallError> {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        let body = frame(&request);
        let timeout = self.timeout;
        let out = match tokio::time::timeout(timeout, self.call(body)).await {
            Ok(out) => out,
            Err(_) => Err(CallError::Timeout(timeout)),
        };
        if matches!(
            out,
            Err(CallError::Http(_) | CallError::Timeout(_) | CallError::Malformed(_))
        ) {
            // The connection may be the fault: the next batch opens a new one.
            self.conn = None;
        }
        out
    }

    async fn call(&mut self, body: Bytes) -> Result<u64, CallError> {
        let conn = match &mut self.conn {
            Some(c) if !c.is_closed() => c,
            _ => self.conn.insert(self.connect().await?),
        };
        conn.ready().await?;
        let mut req = Request::post(self.uri.clone())
            .version(http::Version::HTTP_2)
            .body(RequestBody::replay(body, None))
            .expect("a fixed URI and headers");
        let headers = req.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        headers.insert("grpc-timeout", grpc_timeout(self.timeout));
        let rsp = conn.send_request(req).await?;
        let (head, body) = rsp.into_parts();
        if head.status != StatusCode::OK {
            return Err(CallError::Status(head.status));
        }
        // A refusal may come "trailers-only": the status in the response head.
        if head.headers.contains_key("grpc-status") {
            grpc_status(&head.headers)?;
        }
        let got = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => CallError::Http(*e),
                Err(_) => CallError::Malformed("longer than 64 KiB"),
            })?;
        let trailers = got.trailers().cloned().unwrap_or_default();
        if !head.headers.contains_key("grpc-status") {
            grpc_status(&trailers)?;
        }
        let message = unframe(got.to_bytes())?;
        let answer = ExportTraceServiceResponse::decode(message)
            .map_err(|_| CallError::Malformed("not an ExportTraceServiceResponse"))?;
        Ok(answer
            .partial_success
            .map_or(0, |p| p.rejected_spans.max(0) as u64))
    }

    async fn connect(&self) -> Result<http2::SendRequest<RequestBody>, CallError> {
        let peer = format!("{}:{}", self.host, self.port);
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| CallError::Connect(peer.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(collector = %peer, error = %e, "collector connection closed");
            }
        });
        Ok(tx)
    }
}

/// One uncompressed gRPC message: flag 0, big-endian length, the protobuf.
fn frame(request: &ExportTraceServiceRequest) -> Bytes {
    let len = request.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    request
        .encode(&mut out)
        .expect("the buffer holds the encoded length");
    out.freeze()
}

/// The one message of a unary answer (an empty body is an empty message).
fn unframe(body: Bytes) -> Result<Bytes, CallError> {
    if body.is_empty() {
        return Ok(body);
    }
    if body.len() < 5 {
        return Err(CallError::Malformed("a truncated gRPC message"));
    }
    if body[0] != 0 {
        return Err(CallError::Malformed(
            "a compressed message (none was offered)",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + len {
        return Err(CallError::Malformed("gRPC message length and body differ"));
    }
    Ok(body.slice(5..))
}

/// `grpc-status` 0 is success; anything else (or none) fails the call.
fn grpc_status(headers: &HeaderMap) -> Result<(), CallError> {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or(CallError::Malformed("no grpc-status"))?;
    if code == 0 {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Err(CallError::Grpc { code, message })
}

/// The deadline the collector is told, in milliseconds (at most 8 digits, as gRPC allows).
fn grpc_timeout(t: Duration) -> HeaderValue {
    let ms = t.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_its_frame() {
        let request = ExportTraceServiceRequest::default();
        let framed = frame(&request);
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 0]);
        assert_eq!(unframe(framed).unwrap().len(), 0);
        let answer = Bytes::from_static(&[0, 0, 0, 0, 2, 0x12, 0x00]);
        assert_eq!(unframe(answer).unwrap().as_ref(), &[0x12, 0x00]);
        assert!(unframe(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
    }

    #[test]
    fn only_grpc_status_zero_is_success() {
        let mut h = HeaderMap::new();
        assert!(matches!(grpc_status(&h), Err(CallError::Malformed(_))));
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(grpc_status(&h).is_ok());
        h.insert("grpc-status", HeaderValue::from_static("14"));
        h.insert("grpc-message", HeaderValue::from_static("unavailable"));
        assert!(matches!(
            grpc_status(&h),
            Err(CallError::Grpc { code: 14, .. })
        ));
    }

    #[test]
    fn the_endpoint_names_the_collector() {
        let e = Exporter::new("http://otel-collector:4317", Duration::from_secs(2)).unwrap();
        assert_eq!(e.host, "otel-collector");
        assert_eq!(e.port, 4317);
        assert_eq!(
            e.uri,
            "http://otel-collector:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(grpc_timeout(Duration::from_secs(2)), "2000m");
    }
}
