//! A fake OpenTelemetry collector on `127.0.0.1:0` that decodes exports with the
//! OpenTelemetry proto types and keeps the spans. One port takes both OTLP transports:
//! OTLP/HTTP (`POST /v1/traces`, protobuf) and OTLP/gRPC (HTTP/2 with prior knowledge, the
//! unary `TraceService/Export` call in its length-prefixed gRPC frame, answered with
//! `grpc-status` in trailers). It can answer at once, hold every export unanswered (a
//! collector that hangs), or refuse every gRPC export with a gRPC error.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One received span, flattened for assertions: ids in lower-case hex.
#[derive(Clone, Debug)]
pub struct RecordedSpan {
    pub service: String,
    pub name: String,
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
    pub events: Vec<String>,
    pub error: bool,
    /// `"http"` or `"grpc"`: the transport the span arrived by.
    pub transport: &'static str,
}

/// How the collector answers an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Accept,
    /// Never answer (the exporter times out).
    Hang,
    /// Refuse every gRPC export with this `grpc-status` (keeping nothing).
    GrpcError(u32),
}

type Body = BoxBody<Bytes, std::convert::Infallible>;

const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

pub struct Collector {
    addr: SocketAddr,
    state: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    spans: Mutex<Vec<RecordedSpan>>,
    count: watch::Sender<usize>,
    /// gRPC exports refused (with [`Answer::GrpcError`]).
    refused: watch::Sender<usize>,
    answer: Answer,
}

/// A collector that answers every export at once.
pub async fn collector() -> Collector {
    start(Answer::Accept).await
}

/// A collector that accepts connections and reads exports but never answers.
pub async fn hanging_collector() -> Collector {
    start(Answer::Hang).await
}

/// A collector that reads each gRPC export and refuses it with `grpc-status: code`.
pub async fn refusing_grpc_collector(code: u32) -> Collector {
    start(Answer::GrpcError(code)).await
}

async fn start(answer: Answer) -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake collector on 127.0.0.1:0");
    let addr = listener.local_addr().expect("collector address");
    let state = Arc::new(Shared {
        spans: Mutex::new(Vec::new()),
        count: watch::Sender::new(0),
        refused: watch::Sender::new(0),
        answer,
    });
    let accept = tokio::spawn(accept_loop(listener, state.clone()));
    Collector {
        addr,
        state,
        accept,
    }
}

// === impl Collector ===

impl Collector {
    /// The `[trace] endpoint` that names this collector.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<RecordedSpan> {
        self.state.spans.lock().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` spans have arrived; returns them all.
    pub async fn wait_spans(&self, n: usize) -> Vec<RecordedSpan> {
        let mut rx = self.state.count.subscribe();
        crate::bounded(&format!("{n} spans at the collector"), async {
            rx.wait_for(|c| *c >= n).await.expect("collector alive");
        })
        .await;
        self.spans()
    }

    /// Waits (bounded) until at least `n` gRPC exports have been refused.
    pub async fn wait_refused(&self, n: usize) {
        let mut rx = self.state.refused.subscribe();
        crate::bounded(&format!("{n} refused gRPC exports"), async {
            rx.wait_for(|c| *c >= n).await.expect("collector alive");
        })
        .await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The bootstrap section that sends spans to `endpoint`, flushing every 20 ms.
pub fn trace_bootstrap(endpoint: &str) -> String {
    format!("\n[trace]\nendpoint = {endpoint:?}\nflush_interval = \"20ms\"\n")
}

/// The same over OTLP/gRPC.
pub fn grpc_trace_bootstrap(endpoint: &str) -> String {
    format!("{}protocol = \"grpc\"\n", trace_bootstrap(endpoint))
}

async fn accept_loop(listener: TcpListener, state: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Shared>,
) -> Result<Response<Body>, hyper::Error> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        handle_grpc(req, state).await
    } else {
        handle_http(req, state).await
    }
}

async fn handle_http(
    req: Request<Incoming>,
    state: Arc<Shared>,
) -> Result<Response<Body>, hyper::Error> {
    let path_ok = req.uri().path() == "/v1/traces";
    let content_type_ok = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-protobuf");
    let body = req.into_body().collect().await?.to_bytes();
    if state.answer == Answer::Hang {
        std::future::pending::<()>().await;
    }
    if !path_ok || !content_type_ok {
        return Ok(bad_request("not an OTLP/HTTP protobuf export"));
    }
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return Ok(bad_request("undecodable"));
    };
    record(&state, export, "http");
    let body = ExportTraceServiceResponse::default().encode_to_vec();
    let mut rsp = Response::new(full(Bytes::from(body)));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(rsp)
}

/// One unary gRPC call: HTTP/2, the export path, one uncompressed length-prefixed message.
async fn handle_grpc(
    req: Request<Incoming>,
    state: Arc<Shared>,
) -> Result<Response<Body>, hyper::Error> {
    let call_ok = req.version() == http::Version::HTTP_2 && req.uri().path() == GRPC_EXPORT;
    let body = req.into_body().collect().await?.to_bytes();
    if state.answer == Answer::Hang {
        std::future::pending::<()>().await;
    }
    if !call_ok {
        return Ok(grpc_answer(None, 12, "not the OTLP trace export"));
    }
    let export = match unframe(&body) {
        Some(message) => ExportTraceServiceRequest::decode(message).ok(),
        None => None,
    };
    let Some(export) = export else {
        return Ok(grpc_answer(None, 13, "not one ExportTraceServiceRequest"));
    };
    if let Answer::GrpcError(code) = state.answer {
        state.refused.send_modify(|c| *c += 1);
        return Ok(grpc_answer(None, code, "the collector is refusing exports"));
    }
    record(&state, export, "grpc");
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    Ok(grpc_answer(Some(&answer), 0, ""))
}

/// The message of a gRPC request body: flag 0 (uncompressed), big-endian length, protobuf.
fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (head, message) = (body.get(..5)?, body.get(5..)?);
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    (head[0] == 0 && message.len() == len).then_some(message)
}

/// A gRPC answer: HTTP 200, the framed message if any, then `grpc-status` in trailers.
fn grpc_answer(message: Option<&[u8]>, code: u32, text: &str) -> Response<Body> {
    let mut frames = Vec::new();
    if let Some(m) = message {
        let mut data = BytesMut::with_capacity(5 + m.len());
        data.put_u8(0);
        data.put_u32(m.len() as u32);
        data.put_slice(m);
        frames.push(Ok(Frame::data(data.freeze())));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code));
    if !text.is_empty() {
        trailers.insert("grpc-message", HeaderValue::from_str(text).expect("ASCII"));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let mut rsp = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    rsp
}

fn full(body: Bytes) -> Body {
    Full::new(body).boxed()
}

fn bad_request(why: &'static str) -> Response<Body> {
    let mut rsp = Response::new(full(Bytes::from_static(why.as_bytes())));
    *rsp.status_mut() = StatusCode::BAD_REQUEST;
    rsp
}

/// Keeps the spans of one export and wakes the waiters.
fn record(state: &Shared, export: ExportTraceServiceRequest, transport: &'static str) {
    let mut got = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(RecordedSpan {
                    service: service.clone(),
                    name: s.name.clone(),
                    kind: s.kind,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.clone(),
                                value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                            )
                        })
                        .collect(),
                    events: s.events.iter().map(|e| e.name.clone()).collect(),
                    // STATUS_CODE_ERROR
                    error: s.status.as_ref().is_some_and(|st| st.code == 2),
                    transport,
                });
            }
        }
    }
    let n = got.len();
    state.spans.lock().unwrap().extend(got);
    state.count.send_modify(|c| *c += n);
}

fn value_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
