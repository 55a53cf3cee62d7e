//! Clients for the proxy's listeners: HTTP/1.1 or h2c (prior knowledge) over a fresh TCP
//! connection per [`Client`] request, a reusable [`Conn`], and raw TCP for malformed input.
//!
//! ```ignore
//! let reply = client::http1(proxy.outbound()).get("b.mesh", "/hello").await;
//! assert_eq!(reply.status, 200);
//! ```

use crate::body::{self, Body, BoxError};
use crate::{bounded, WAIT};
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which HTTP version a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 with prior knowledge, without TLS.
    Http2,
}

/// Sends each request on a new connection to `addr`.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    addr: SocketAddr,
    proto: Proto,
}

/// One open connection; requests on it share the TCP stream.
pub enum Conn {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

/// A whole response: status, headers, body and trailers (if any were sent).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

pub fn http1(addr: SocketAddr) -> Client {
    Client::new(addr, Proto::Http1)
}

pub fn http2(addr: SocketAddr) -> Client {
    Client::new(addr, Proto::Http2)
}

// === impl Client ===

impl Client {
    pub fn new(addr: SocketAddr, proto: Proto) -> Self {
        Self { addr, proto }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A request builder aimed at `authority` and `path`: HTTP/1.1 puts the authority in
    /// `Host`, h2 in the `:authority` pseudo-header.
    pub fn request(&self, method: Method, authority: &str, path: &str) -> http::request::Builder {
        match self.proto {
            Proto::Http1 => Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, authority),
            Proto::Http2 => Request::builder()
                .method(method)
                .version(Version::HTTP_2)
                .uri(format!("http://{authority}{path}")),
        }
    }

    /// GETs `path` from `authority`; panics if the exchange fails.
    pub async fn get(&self, authority: &str, path: &str) -> Reply {
        let req = self
            .request(Method::GET, authority, path)
            .body(body::empty())
            .expect("valid request");
        self.send(req).await
    }

    /// Sends `req` and reads the whole response; panics if the exchange fails.
    pub async fn send(&self, req: Request<Body>) -> Reply {
        let what = format!("{} {} via {}", req.method(), req.uri(), self.addr);
        match self.try_send(req).await {
            Ok(reply) => reply,
            Err(e) => panic!("{what} failed: {e}"),
        }
    }

    /// Sends `req` and reads the whole response, returning transport errors.
    pub async fn try_send(&self, req: Request<Body>) -> Result<Reply, BoxError> {
        let rsp = self.try_send_streaming(req).await?;
        read_reply(rsp).await
    }

    /// Sends `req` and returns as soon as the response head arrives; the body is read by the
    /// caller frame by frame (see [`next_data`]).
    pub async fn send_streaming(&self, req: Request<Body>) -> Response<Incoming> {
        let what = format!("{} {} via {}", req.method(), req.uri(), self.addr);
        match self.try_send_streaming(req).await {
            Ok(rsp) => rsp,
            Err(e) => panic!("{what} failed: {e}"),
        }
    }

    pub async fn try_send_streaming(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut conn = self.try_connect().await?;
        conn.try_send_streaming(req).await
    }

    /// Opens a connection; panics if that fails.
    pub async fn connect(&self) -> Conn {
        match self.try_connect().await {
            Ok(conn) => conn,
            Err(e) => panic!("connecting to {} failed: {e}", self.addr),
        }
    }

    pub async fn try_connect(&self) -> Result<Conn, BoxError> {
        let what = format!("a connection to {}", self.addr);
        let stream = bounded(&what, TcpStream::connect(self.addr)).await?;
        let io = TokioIo::new(stream);
        match self.proto {
            Proto::Http1 => {
                let (send, conn) = bounded(&what, http1::handshake(io)).await?;
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                Ok(Conn::Http1(send))
            }
            Proto::Http2 => {
                let (send, conn) =
                    bounded(&what, http2::handshake(TokioExecutor::new(), io)).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Conn::Http2(send))
            }
        }
    }

    /// Sends an HTTP/1.1 `Upgrade: websocket` request; returns the response head and, when the
    /// answer is 101, the upgraded byte stream.
    pub async fn upgrade(
        &self,
        authority: &str,
        path: &str,
    ) -> (Response<()>, Option<TokioIo<Upgraded>>) {
        assert_eq!(self.proto, Proto::Http1, "upgrades are HTTP/1.1 only");
        let req = self
            .request(Method::GET, authority, path)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(body::empty())
            .expect("valid request");
        let mut rsp = self.send_streaming(req).await;
        let on_upgrade = hyper::upgrade::on(&mut rsp);
        let (parts, _) = rsp.into_parts();
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            return (Response::from_parts(parts, ()), None);
        }
        let upgraded = bounded("the upgraded connection", on_upgrade)
            .await
            .expect("upgrade after 101");
        (
            Response::from_parts(parts, ()),
            Some(TokioIo::new(upgraded)),
        )
    }
}

// === impl Conn ===

impl Conn {
    pub async fn send(&mut self, req: Request<Body>) -> Reply {
        let what = format!("{} {}", req.method(), req.uri());
        match self.try_send_streaming(req).await {
            Ok(rsp) => match read_reply(rsp).await {
                Ok(reply) => reply,
                Err(e) => panic!("{what}: reading the response failed: {e}"),
            },
            Err(e) => panic!("{what} failed: {e}"),
        }
    }

    pub async fn try_send_streaming(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let what = format!("the response head of {} {}", req.method(), req.uri());
        match self {
            Conn::Http1(send) => {
                bounded("the connection to be ready", send.ready()).await?;
                Ok(bounded(&what, send.send_request(req)).await?)
            }
            Conn::Http2(send) => {
                bounded("the connection to be ready", send.ready()).await?;
                Ok(bounded(&what, send.send_request(req)).await?)
            }
        }
    }
}

// === impl Reply ===

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| v.to_str().ok())
    }
}

/// Reads the whole of a response.
pub async fn read_reply(rsp: Response<Incoming>) -> Result<Reply, BoxError> {
    let (parts, body) = rsp.into_parts();
    let collected = bounded("the response body", body.collect()).await?;
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    })
}

/// The next data frame of a streaming body, skipping trailers; `None` at the end.
pub async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = bounded("the next response body frame", body.frame()).await?;
        let frame = frame.unwrap_or_else(|e| panic!("reading the response body failed: {e}"));
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

// === raw TCP ===

/// Writes `bytes` to a new connection and reads until the peer closes it (EOF or reset),
/// without closing our write side first, so the close is the peer's decision; panics if the peer keeps it open past [`WAIT`].
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = bounded("a raw connection", TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("raw connect to {addr} failed: {e}"));
    // The peer may close before taking every byte (that is what some tests provoke): a failed
    // write still leaves its answer, if any, to be read.
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        panic!(
            "{addr} kept the connection open for {WAIT:?} after {} raw bytes; read so far: {:?}",
            bytes.len(),
            String::from_utf8_lossy(&out)
        );
    }
    out
}

/// The status code on the first line of a raw HTTP/1.1 response, if there is one.
pub fn raw_status(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}
