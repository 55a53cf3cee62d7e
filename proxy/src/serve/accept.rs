use super::detect::{detect, Detected};
use super::for_peer::ForPeer;
use super::head_timeout::{AnswerHeadTimeout, HeadState};
use super::in_flight::{Counted, Requests};
use super::limit::{ConnectionLimit, Held};
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
/// refused) when the drain starts; each connection then finishes its requests and closes. A
/// connection that has sent nothing yet closes at once; one with no request open closes within
/// `close_idle_after` even when its peer ignores GOAWAY and PING.
pub struct Accept<S> {
    pub name: &'static str,
    pub listener: TcpListener,
    pub builder: Arc<ServerBuilder>,
    pub service: S,
    pub detect_timeout: Duration,
    /// With an identity, the listener also answers mutual TLS and tells the service who
    /// called on each request (see [`super::Caller`]).
    pub tls: Option<Arc<Identity>>,
    pub close_idle_after: Duration,
    /// Connections this listener holds open at most (`limits.max_connections`).
    pub max_connections: usize,
}

/// After a drain has closed a connection's last request, how long hyper may go on writing
/// what it still buffers before the connection is dropped.
const FLUSH: Duration = Duration::from_secs(1);

impl<S, B> Accept<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + ForPeer
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
            close_idle_after,
            max_connections,
        } = self;
        let limit = ConnectionLimit::new(max_connections);
        let accepted = ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "listener" => name);
        loop {
            let (stream, peer) = tokio::select! {
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
            let Some(held) = limit.try_hold() else {
                limit.refuse(name, stream);
                continue;
            };
            let conn = Connection {
                _held: held,
                builder: builder.clone(),
                service: service.for_peer(peer),
                watch: watch.clone(),
                detect_timeout,
                tls: tls.clone(),
                close_idle_after,
            };
            tokio::spawn(conn.serve(stream));
        }
        drop(listener);
        tracing::info!(listener = name, "listener closed");
    }
}

struct Connection<S> {
    _held: Held,
    builder: Arc<ServerBuilder>,
    service: S,
    watch: Watch,
    detect_timeout: Duration,
    tls: Option<Arc<Identity>>,
    close_idle_after: Duration,
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
            _held,
            builder,
            service,
            mut watch,
            detect_timeout,
            tls,
            close_idle_after,
        } = self;
        let _ = stream.set_nodelay(true);
        let tagged = tls.is_some();
        let detected = tokio::select! {
            detected = detect(&stream, detect_timeout) => detected,
            // Silent so far: nothing to finish, so it must not hold the drain.
            _ = watch.signaled() => return,
        };
        match (detected, tls) {
            (Detected::Http, _) => {
                let service = PeerService::new(service, tagged, None);
                serve_io(&builder, stream, service, watch, close_idle_after).await
            }
            (Detected::Tls, Some(identity)) => {
                ::metrics::counter!(metrics::TLS_HANDSHAKES, "side" => "server").increment(1);
                match identity.accept(stream, detect_timeout).await {
                    Ok((tls, caller)) => {
                        let service = PeerService::new(service, true, Some(caller));
                        serve_io(&builder, tls, service, watch, close_idle_after).await
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
/// closes it: gracefully, or at `close_idle_after` once no request is open on it.
async fn serve_io<I, S, B>(
    builder: &ServerBuilder,
    io: I,
    service: S,
    mut watch: Watch,
    close_idle_after: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let requests = Arc::new(Requests::default());
    let head = Arc::new(HeadState::default());
    let conn = builder.serve_connection_with_upgrades(
        TokioIo::new(AnswerHeadTimeout::new(io, head.clone())),
        TowerToHyperService::new(Counted::new(service, requests.clone())),
    );
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = watch.signaled() => {
            // HTTP/1.1: close once idle; HTTP/2: GOAWAY, PING, and the final GOAWAY once the
            // peer answers. A peer that never answers, or never finishes its head, is not
            // waited for past `close_idle_after` unless a request is still open.
            conn.as_mut().graceful_shutdown();
            let no_request_left = async {
                tokio::time::sleep(close_idle_after).await;
                requests.none_open().await;
            };
            tokio::select! {
                res = conn.as_mut() => res,
                _ = no_request_left => match tokio::time::timeout(FLUSH, conn.as_mut()).await {
                    Ok(res) => res,
                    Err(_) => {
                        tracing::debug!("drain closed a connection with no request open");
                        Ok(())
                    }
                },
            }
        }
    };
    if let Err(e) = res {
        let kind = match classify(&*e) {
            // hyper's head timer also runs on a keep-alive connection waiting for its next
            // request: that one was idle, not slow, and is closed without an answer.
            Some(HEADER_TIMEOUT) if !head.timed_out() => None,
            kind => kind,
        };
        if let Some(kind) = kind {
            metrics::protocol_error(kind);
            tracing::info!(error = %e, kind, "connection closed on a protocol error");
        } else {
            tracing::debug!(error = %e, "connection ended");
        }
    }
}

/// A head not complete within `limits.header_read_timeout`: answered 408 on close.
const HEADER_TIMEOUT: &str = "header_timeout";

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
            return Some(HEADER_TIMEOUT);
        }
        // Resets, closes and HTTP/2 stream errors: the peer went away or gave up.
        return None;
    }
    if e.downcast_ref::<std::io::Error>().is_some() {
        return None;
    }
    Some("http")
}
