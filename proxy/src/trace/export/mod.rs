//! Span export: ended spans go into a bounded queue and a background task sends them to the
//! collector in batches, over OTLP/HTTP protobuf with `opentelemetry-otlp` (over hyper; the
//! default) or over OTLP/gRPC (`grpc.rs`: the same protobuf in a gRPC call on hyper's HTTP/2
//! client). A request never waits for the collector: when the queue is full (the collector
//! slow or down) a span is dropped and counted in
//! `agent_trace_spans_dropped_total{reason="queue_full"}`; a batch the collector refuses or
//! does not take in time, and spans it reports rejected, are counted with
//! `reason="export_failed"`.

pub mod grpc;

use crate::bootstrap::{Trace as Config, TraceProtocol};
use crate::metrics;
use opentelemetry::KeyValue;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use std::time::Duration;
use tokio::sync::mpsc;

/// The request side of the exporter: hand over a span or drop it, never wait.
#[derive(Debug)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: ::metrics::Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("trace exporter: {0}")]
pub struct ExportError(String);

// === impl Queue ===

impl Queue {
    pub fn send(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.increment(1);
        }
    }
}

/// Builds the exporter for `[trace]` and starts its task on the current runtime.
pub fn start(cfg: &Config, agent: &str, phase: &str) -> Result<Queue, ExportError> {
    let resource = Resource::builder_empty()
        .with_service_name(agent.to_owned())
        .with_attribute(KeyValue::new("agent.id", agent.to_owned()))
        .with_attribute(KeyValue::new("agent.phase", phase.to_owned()))
        .build();
    let exporter = match cfg.protocol {
        TraceProtocol::HttpProtobuf => {
            let mut http = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(HyperClient::with_default_connector(
                    cfg.export_timeout,
                    None,
                ))
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(traces_url(&cfg.endpoint))
                .with_timeout(cfg.export_timeout)
                .build()
                .map_err(|e| ExportError(e.to_string()))?;
            http.set_resource(&resource);
            Exporter::Http(Box::new(http))
        }
        TraceProtocol::Grpc => {
            let mut grpc =
                grpc::Exporter::new(&cfg.endpoint, cfg.export_timeout).map_err(ExportError)?;
            grpc.set_resource(&resource);
            Exporter::Grpc(grpc)
        }
    };
    let (tx, rx) = mpsc::channel(cfg.queue_size);
    let dropped = ::metrics::counter!(metrics::TRACE_SPANS_DROPPED, "reason" => "queue_full");
    tokio::spawn(run(exporter, rx, cfg.max_batch, cfg.flush_interval));
    Ok(Queue { tx, dropped })
}

/// `[trace] endpoint` names the collector; OTLP/HTTP takes traces at `/v1/traces`.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The collector's transport, chosen by `[trace] protocol`.
enum Exporter {
    Http(Box<opentelemetry_otlp::SpanExporter>),
    Grpc(grpc::Exporter),
}

// === impl Exporter ===

impl Exporter {
    /// Sends one batch; on success, how many of its spans the collector rejected.
    async fn export(&mut self, batch: Vec<SpanData>) -> Result<u64, String> {
        match self {
            Exporter::Http(e) => e.export(batch).await.map(|()| 0).map_err(|e| e.to_string()),
            Exporter::Grpc(e) => e.export(batch).await.map_err(|e| e.to_string()),
        }
    }
}

/// Sends a batch when it is full or `every` after its first span; ends when every [`Queue`]
/// is gone, after sending what is left.
async fn run(
    mut exporter: Exporter,
    mut rx: mpsc::Receiver<SpanData>,
    max_batch: usize,
    every: Duration,
) {
    let failed = ::metrics::counter!(metrics::TRACE_SPANS_DROPPED, "reason" => "export_failed");
    let exported = ::metrics::counter!(metrics::TRACE_SPANS_EXPORTED);
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let due = tokio::time::Instant::now() + every;
        let mut open = true;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(due, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let sent = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
        match exporter.export(sent).await {
            Ok(rejected) => {
                let rejected = rejected.min(n);
                exported.increment(n - rejected);
                failed.increment(rejected);
            }
            Err(e) => {
                failed.increment(n);
                tracing::debug!(error = %e, spans = n, "trace export failed");
            }
        }
        if !open {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_address_gets_the_traces_path_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
