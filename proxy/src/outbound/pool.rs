//! Connections to upstream endpoints, kept on the endpoint itself: idle HTTP/1.1 connections
//! (most recently used first, at most `pool_max_idle_per_endpoint`, closed after
//! `pool_idle_timeout`) and one shared, multiplexed HTTP/2 connection. A request that a
//! connection gave back unwritten (the peer closed it, or sent GOAWAY) goes to a fresh one.
//!
//! The per-endpoint locks guard a few pointer moves and are never held across an await.
//!
//! A connection to a peer sidecar is mutual TLS when this sidecar dials over TLS (see
//! [`crate::identity::Identity::dial`]); each pooled connection remembers whether it is, so
//! one made in plaintext is not reused once the mesh dials over TLS.

use crate::bootstrap::Upstream;
use crate::identity::Identity;
use crate::outbound::balance::Endpoint;
use crate::outbound::replay::RequestBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// An HTTP/2 connection with requests open that has read nothing for this long is pinged, and
/// closed when the ping goes unanswered for the timeout: a frozen peer (a stopped process, a
/// hung host) then fails its requests within seconds, so they are retried elsewhere and the
/// endpoint is ejected, instead of hanging to the route timeout. A live peer acks pings in its
/// HTTP/2 layer however long its app takes to answer.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(4);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP keepalive on every upstream socket, so a silently dead peer is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How upstream connections are made and kept; shared by every request of a listener.
#[derive(Clone, Debug)]
pub struct Pools {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// This sidecar's identity, for mutual TLS to peer sidecars.
    identity: Option<Arc<Identity>>,
}

/// The connections of one endpoint.
#[derive(Debug, Default)]
pub struct Conns {
    /// Oldest at the front, most recently used at the back.
    http1: Mutex<VecDeque<Idle>>,
    http2: Mutex<Option<Shared>>,
    /// Held while an HTTP/2 connection is being made, so concurrent first requests share one.
    http2_connect: tokio::sync::Mutex<u64>,
}

#[derive(Debug)]
struct Idle {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
    tls: bool,
}

#[derive(Debug)]
struct Shared {
    tx: http2::SendRequest<RequestBody>,
    used: Instant,
    /// Which connection of this endpoint it is, to retire exactly the one that failed.
    generation: u64,
    tls: bool,
}

/// An HTTP/1.1 connection lent to one exchange; it goes back to its endpoint when the response
/// body ends or is dropped, if it can take another request.
#[derive(Debug)]
pub struct Checkin {
    endpoint: Arc<Endpoint>,
    tx: Option<http1::SendRequest<RequestBody>>,
    pools: Pools,
    tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("handshake with {addr}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("request to {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

// === impl Error ===

impl Error {
    /// No connection was made: the request certainly never left.
    pub fn is_connect(&self) -> bool {
        !matches!(self, Error::Http { .. })
    }
}

// === impl Pools ===

impl Pools {
    pub fn new(cfg: &Upstream) -> Self {
        Self {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.pool_idle_timeout,
            max_idle: cfg.pool_max_idle_per_endpoint,
            identity: None,
        }
    }

    /// Dials peer sidecars over mutual TLS when `identity` says so.
    pub fn with_identity(mut self, identity: Arc<Identity>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The TLS client configuration for `endpoint`, when it is a peer sidecar this sidecar
    /// dials over mutual TLS.
    fn tls_for(&self, endpoint: &Endpoint, h2: bool) -> Option<Arc<rustls::ClientConfig>> {
        endpoint.peer.as_ref()?;
        self.identity.as_ref()?.dial(h2)
    }

    /// Sends `req` over HTTP/1.1 on an idle connection of `endpoint`, or a new one. The
    /// connection comes back with the response unless it was upgraded.
    pub async fn send_http1(
        self,
        endpoint: Arc<Endpoint>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Error> {
        let addr = endpoint.addr;
        let tls = self.tls_for(&endpoint, false);
        while let Some(mut tx) = self.checkout(&endpoint, tls.is_some()) {
            match tx.try_send_request(req).await {
                Ok(rsp) => {
                    let tls = tls.is_some();
                    return Ok((rsp, self.lend(endpoint, tx, tls)));
                }
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request was written: try another.
                    Some(back) => req = back,
                    None => {
                        let source = e.into_error();
                        return Err(Error::Http { addr, source });
                    }
                },
            }
        }
        // Boxed: the connect and handshake states would otherwise make every pooled send's
        // future (moved and copied with the request) several times larger.
        Box::pin(self.send_on_new_http1(endpoint, req, tls)).await
    }

    async fn send_on_new_http1(
        self,
        endpoint: Arc<Endpoint>,
        req: Request<RequestBody>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Error> {
        let addr = endpoint.addr;
        let tcp = self.connect(addr).await?;
        let is_tls = tls.is_some();
        let mut tx = match tls {
            Some(cfg) => handshake_http1(addr, tls_connect(tcp, cfg, &endpoint).await?).await?,
            None => handshake_http1(addr, tcp).await?,
        };
        match tx.try_send_request(req).await {
            Ok(rsp) => Ok((rsp, self.lend(endpoint, tx, is_tls))),
            Err(e) => Err(Error::Http {
                addr,
                source: e.into_error(),
            }),
        }
    }

    /// Sends `req` over the endpoint's shared HTTP/2 connection, opening one when there is none
    /// or it is closing.
    pub async fn send_http2(
        self,
        endpoint: Arc<Endpoint>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, Error> {
        let addr = endpoint.addr;
        let tls = self.tls_for(&endpoint, true);
        if let Some((mut tx, generation)) = self.shared(&endpoint, tls.is_some()) {
            match tx.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp),
                Err(mut e) => match e.take_message() {
                    // GOAWAY or a close before the stream opened: a fresh connection takes it.
                    Some(back) => {
                        req = back;
                        let mut slot = lock(&endpoint.conns.http2);
                        if slot.as_ref().is_some_and(|s| s.generation == generation) {
                            *slot = None;
                        }
                    }
                    None => {
                        let source = e.into_error();
                        return Err(Error::Http { addr, source });
                    }
                },
            }
        }
        let mut tx = Box::pin(self.connect_shared(&endpoint, tls)).await?;
        tx.try_send_request(req).await.map_err(|e| Error::Http {
            addr,
            source: e.into_error(),
        })
    }

    /// The endpoint's shared HTTP/2 connection, made by the first request that finds none.
    async fn connect_shared(
        &self,
        endpoint: &Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<http2::SendRequest<RequestBody>, Error> {
        let is_tls = tls.is_some();
        let tx = {
            let mut made = endpoint.conns.http2_connect.lock().await;
            // Another request may have connected while this one waited.
            match self.shared(endpoint, is_tls) {
                Some((tx, _)) => tx,
                None => {
                    let tx = self.connect_http2(endpoint, tls).await?;
                    *made += 1;
                    *lock(&endpoint.conns.http2) = Some(Shared {
                        tx: tx.clone(),
                        used: Instant::now(),
                        generation: *made,
                        tls: is_tls,
                    });
                    tx
                }
            }
        };
        Ok(tx)
    }

    /// The endpoint's HTTP/2 connection, unless it is closed or has idled out.
    fn shared(
        &self,
        endpoint: &Endpoint,
        tls: bool,
    ) -> Option<(http2::SendRequest<RequestBody>, u64)> {
        let now = Instant::now();
        let mut slot = lock(&endpoint.conns.http2);
        match slot.as_mut() {
            Some(s) if !s.tx.is_closed() && now - s.used < self.idle_timeout && s.tls == tls => {
                s.used = now;
                Some((s.tx.clone(), s.generation))
            }
            _ => {
                *slot = None;
                None
            }
        }
    }

    async fn connect_http2(
        &self,
        endpoint: &Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<http2::SendRequest<RequestBody>, Error> {
        let addr = endpoint.addr;
        let tcp = self.connect(addr).await?;
        match tls {
            Some(cfg) => handshake_http2(addr, tls_connect(tcp, cfg, endpoint).await?).await,
            None => handshake_http2(addr, tcp).await,
        }
    }

    /// The most recently used idle connection that is still open and not expired.
    /// A plaintext one is dropped when TLS is wanted, and the other way round.
    fn checkout(&self, endpoint: &Endpoint, tls: bool) -> Option<http1::SendRequest<RequestBody>> {
        let now = Instant::now();
        let mut idle = lock(&endpoint.conns.http1);
        while let Some(Idle {
            tx,
            since,
            tls: was,
        }) = idle.pop_back()
        {
            if now - since >= self.idle_timeout {
                // Everything older is expired too.
                idle.clear();
                return None;
            }
            if !tx.is_closed() && was == tls {
                return Some(tx);
            }
        }
        None
    }

    fn lend(
        self,
        endpoint: Arc<Endpoint>,
        tx: http1::SendRequest<RequestBody>,
        tls: bool,
    ) -> Option<Checkin> {
        Some(Checkin {
            endpoint,
            tx: Some(tx),
            pools: self,
            tls,
        })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::ConnectTimeout {
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| Error::Connect { addr, source })?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let sock = socket2::SockRef::from(&stream);
        sock.set_tcp_nodelay(true)
            .and_then(|()| sock.set_tcp_keepalive(&keepalive))
            .map_err(|source| Error::Connect { addr, source })?;
        Ok(stream)
    }

    fn put_back(&self, endpoint: &Endpoint, tx: http1::SendRequest<RequestBody>, tls: bool) {
        let now = Instant::now();
        let mut idle = lock(&endpoint.conns.http1);
        while idle
            .front()
            .is_some_and(|i| now - i.since >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < self.max_idle {
            idle.push_back(Idle {
                tx,
                since: now,
                tls,
            });
        }
    }
}

/// The TLS handshake with a peer sidecar, which must prove it is the agent `endpoint` serves.
async fn tls_connect(
    tcp: TcpStream,
    cfg: Arc<rustls::ClientConfig>,
    endpoint: &Endpoint,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let addr = endpoint.addr;
    let peer = endpoint.peer.as_deref().unwrap_or_default();
    let name =
        rustls::pki_types::ServerName::try_from(peer.to_owned()).map_err(|e| Error::Tls {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
    ::metrics::counter!(crate::metrics::TLS_HANDSHAKES, "side" => "client").increment(1);
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|source| Error::Tls { addr, source })
}

async fn handshake_http1<T>(
    addr: SocketAddr,
    io: T,
) -> Result<http1::SendRequest<RequestBody>, Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // One write per message: a head and a small body in one buffer cost one copy, where a
    // vectored write costs the kernel more than the copy saves.
    let (tx, conn) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| Error::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream connection closed");
        }
    });
    Ok(tx)
}

async fn handshake_http2<T>(
    addr: SocketAddr,
    io: T,
) -> Result<http2::SendRequest<RequestBody>, Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .adaptive_window(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| Error::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream connection closed");
        }
    });
    Ok(tx)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The critical sections cannot panic halfway; a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Checkin ===

impl Checkin {
    /// The response was a protocol switch: the connection now belongs to the tunnel.
    pub fn upgraded(mut self) {
        self.tx = None;
    }
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some(mut tx) = self.tx.take() else { return };
        if tx.is_ready() {
            self.pools.put_back(&self.endpoint, tx, self.tls);
            return;
        }
        if tx.is_closed() {
            return;
        }
        // Still finishing the exchange (the rest of the request body, say): it goes back once
        // it can take a request, or is closed when that takes longer than an idle period.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let endpoint = self.endpoint.clone();
        let pools = self.pools.clone();
        let tls = self.tls;
        rt.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(pools.idle_timeout, tx.ready()).await {
                pools.put_back(&endpoint, tx, tls);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(max_idle: usize) -> Pools {
        Pools {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(90),
            max_idle,
            identity: None,
        }
    }

    fn endpoint() -> Endpoint {
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    /// A sender over an in-memory stream whose connection runs until `peer` is dropped.
    async fn sender() -> (http1::SendRequest<RequestBody>, tokio::io::DuplexStream) {
        let (io, peer) = tokio::io::duplex(1024);
        let (mut tx, conn) = http1::handshake(TokioIo::new(io)).await.unwrap();
        tokio::spawn(conn);
        tx.ready().await.unwrap();
        (tx, peer)
    }

    #[tokio::test(start_paused = true)]
    async fn the_latest_idle_connection_is_reused_until_it_idles_out() {
        let (p, ep) = (pools(4), endpoint());
        let (old, _a) = sender().await;
        p.put_back(&ep, old, false);
        tokio::time::advance(Duration::from_secs(60)).await;
        let (new, _b) = sender().await;
        p.put_back(&ep, new, false);
        assert!(p.checkout(&ep, false).is_some());
        assert_eq!(lock(&ep.conns.http1).len(), 1);
        // The older one has now been idle for longer than the idle timeout.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(p.checkout(&ep, false).is_none());
        assert!(lock(&ep.conns.http1).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_idle_connections_are_kept() {
        let (p, ep) = (pools(2), endpoint());
        let mut peers = Vec::new();
        for _ in 0..3 {
            let (tx, peer) = sender().await;
            peers.push(peer);
            p.put_back(&ep, tx, false);
        }
        assert_eq!(lock(&ep.conns.http1).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_the_peer_closed_is_not_lent() {
        let (p, ep) = (pools(4), endpoint());
        let (io, peer) = tokio::io::duplex(1024);
        let (tx, conn) = http1::handshake::<_, RequestBody>(TokioIo::new(io))
            .await
            .unwrap();
        drop(peer);
        // The connection sees the peer's close and ends; the sender reports it closed.
        let _ = conn.await;
        assert!(tx.is_closed());
        p.put_back(&ep, tx, false);
        assert!(p.checkout(&ep, false).is_none());
    }
}
