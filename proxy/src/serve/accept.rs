use super::detect::{detect, Detected};
use super::peer::PeerService;
use crate::bootstrap::Limits;
use crate::drain::Watch;
use crate::identity::Identity;
use crate::metrics;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub type ServerBuilder = auto::Builder<TokioExecutor>;

/// HTTP/1.1 and prior-knowledge HTTP/2 on one port, with header limits and timeouts.
pub fn server_builder(limits: &Limits) -> Arc<ServerBuilder> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        // Head and a small body in one write: a vectored write costs the kernel more.
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .adaptive_window(true);
    Arc::new(builder)
}

/// An accept loop for one listener. Stops accepting (closing the socket, so new connects are
/// refused) when the drain starts; each connection then finishes its requests and closes.
pub struct Accept<S> {
    pub name: &'static str,
    pub listener: TcpListener,
    pub builder: Arc<ServerBuilder>,
    pub service: S,
    pub detect_timeout: Duration,
    /// With an identity, the listener also answers mutual TLS and tells the service who
    /// called on each request (see [`super::Caller`]).
    pub tls: Option<Arc<Identity>>,
}

impl<S, B> Accept<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub async fn run(self, mut watch: Watch) {
        let Accept {
            name,
            listener,
            builder,
            service,
            detect_timeout,
            tls,
        } = self;
        let accepted = ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "listener" => name);
        loop {
            let (stream, _peer) = tokio::select! {
                biased;
                _ = watch.signaled() => break,
                res = listener.accept() => match res {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors or similar: back off instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            accepted.increment(1);
            let conn = Connection {
                builder: builder.clone(),
                service: service.clone(),
                watch: watch.clone(),
                detect_timeout,
                tls: tls.clone(),
            };
            tokio::spawn(conn.serve(stream));
        }
        drop(listener);
        tracing::info!(listener = name, "listener closed");
    }
}

struct Connection<S> {
    builder: Arc<ServerBuilder>,
    service: S,
    watch: Watch,
    detect_timeout: Duration,
    tls: Option<Arc<Identity>>,
}

impl<S, B> Connection<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn serve(self, stream: TcpStream) {
        let Connection {
            builder,
            service,
            watch,
            detect_timeout,
            tls,
        } = self;
        let _ = stream.set_nodelay(true);
        let tagged = tls.is_some();
        match (detect(&stream, detect_timeout).await, tls) {
            (Detected::Http, _) => {
                let service = PeerService::new(service, tagged, None);
                serve_io(&builder, stream, service, watch).await
            }
            (Detected::Tls, Some(identity)) => {
                ::metrics::counter!(metrics::TLS_HANDSHAKES, "side" => "server").increment(1);
                match identity.accept(stream, detect_timeout).await {
                    Ok((tls, caller)) => {
                        let service = PeerService::new(service, true, Some(caller));
                        serve_io(&builder, tls, service, watch).await
                    }
                    Err(reason) => {
                        ::metrics::counter!(metrics::TLS_HANDSHAKE_FAILURES, "reason" => reason)
                            .increment(1);
                        tracing::info!(reason, "closed connection: mutual TLS refused");
                    }
                }
            }
            (Detected::Tls | Detected::Unknown(_), _) => {
                metrics::protocol_error("unknown_protocol");
                tracing::info!("closed connection: not HTTP");
            }
            (Detected::Nothing, _) => {}
        }
    }
}

/// Serves HTTP on one accepted connection, plaintext or TLS, until it ends or the drain
/// closes it gracefully.
async fn serve_io<I, S, B>(builder: &ServerBuilder, io: I, service: S, mut watch: Watch)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = watch.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        let kind = classify(&*e);
        if let Some(kind) = kind {
            metrics::protocol_error(kind);
            tracing::info!(error = %e, kind, "connection closed on a protocol error");
        } else {
            tracing::debug!(error = %e, "connection ended");
        }
    }
}

/// Names protocol violations; `None` for a peer that simply went away.
fn classify(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_parse_too_large() {
            return Some("header_too_large");
        }
        if h.is_parse() || h.is_parse_status() {
            return Some("malformed_request");
        }
        if h.is_timeout() {
            return Some("header_timeout");
        }
        // Resets, closes and HTTP/2 stream errors: the peer went away or gave up.
        return None;
    }
    if e.downcast_ref::<std::io::Error>().is_some() {
        return None;
    }
    Some("http")
}
