//! A fake OpenTelemetry collector: an OTLP/HTTP receiver on `127.0.0.1:0` that decodes each
//! `POST /v1/traces` with the OpenTelemetry proto types and keeps the spans. It can answer
//! at once, or hold every export unanswered (a collector that hangs).

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
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
}

pub struct Collector {
    addr: SocketAddr,
    state: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    spans: Mutex<Vec<RecordedSpan>>,
    count: watch::Sender<usize>,
    /// Never answer (the exporter times out).
    hang: bool,
}

/// A collector that answers every export at once.
pub async fn collector() -> Collector {
    start(false).await
}

/// A collector that accepts connections and reads exports but never answers.
pub async fn hanging_collector() -> Collector {
    start(true).await
}

async fn start(hang: bool) -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake collector on 127.0.0.1:0");
    let addr = listener.local_addr().expect("collector address");
    let state = Arc::new(Shared {
        spans: Mutex::new(Vec::new()),
        count: watch::Sender::new(0),
        hang,
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
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path_ok = req.uri().path() == "/v1/traces";
    let content_type_ok = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-protobuf");
    let body = req.into_body().collect().await?.to_bytes();
    if state.hang {
        std::future::pending::<()>().await;
    }
    if !path_ok || !content_type_ok {
        let mut rsp = Response::new(Full::new(Bytes::from_static(
            b"not an OTLP/HTTP protobuf export",
        )));
        *rsp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(rsp);
    }
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        let mut rsp = Response::new(Full::new(Bytes::from_static(b"undecodable")));
        *rsp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(rsp);
    };
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
                });
            }
        }
    }
    let n = got.len();
    state.spans.lock().unwrap().extend(got);
    state.count.send_modify(|c| *c += n);
    let body = ExportTraceServiceResponse::default().encode_to_vec();
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(rsp)
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
