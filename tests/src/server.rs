//! Fake upstreams: an HTTP/1.1 + h2c (prior knowledge) server on `127.0.0.1:0` with one
//! behaviour per server, a label every response carries in `x-served-by`, and a request counter.
//!
//! ```ignore
//! let b = server::echo().label("b").run().await;
//! let slow = server::fixed(200, "ok").delay(Duration::from_millis(50)).run().await;
//! let held = server::fixed(200, "ok").hold().run().await; // answers only when released
//! ```
//!
//! Dropping a [`Server`] aborts its accept loop and every connection it accepted.

use crate::body::{self, Body, BodySender};
use crate::bounded;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// The header naming which fake upstream answered.
pub const SERVED_BY: &str = "x-served-by";

/// Answers every request with `status` and `body`.
pub fn fixed(status: u16, body: &'static str) -> Builder {
    Builder::new(Kind::Fixed {
        status: StatusCode::from_u16(status).expect("valid status code"),
        body,
    })
}

/// Answers with a JSON description of the request: method, path, version, host, authority,
/// headers and body (as UTF-8, lossy).
pub fn echo() -> Builder {
    Builder::new(Kind::Echo)
}

/// Answers with the request body, byte for byte.
pub fn echo_body() -> Builder {
    Builder::new(Kind::EchoBody)
}

/// Answers 200 at once with a body the test writes: each request hands a [`BodySender`] to
/// [`Server::next_stream`].
pub fn streaming() -> Builder {
    Builder::new(Kind::Stream)
}

/// gRPC-style: reads the whole request, answers its body back followed by trailers
/// `grpc-status: 0` and each request trailer as `x-echo-<name>`. When the request carried no
/// trailers it answers `grpc-status: 3` instead, so a lost trailer cannot pass unnoticed.
pub fn trailers() -> Builder {
    Builder::new(Kind::Trailers)
}

/// Answers an `Upgrade: websocket` request with 101 and then echoes the raw bytes of the
/// upgraded connection; anything else gets 426.
pub fn upgrade_echo() -> Builder {
    Builder::new(Kind::UpgradeEcho)
}

/// Configures a fake upstream before it starts.
#[derive(Debug)]
pub struct Builder {
    kind: Kind,
    label: String,
    delay: Option<Duration>,
    hold: bool,
    fail_first: u64,
}

/// A running fake upstream.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    label: String,
    state: Arc<State>,
    streams: tokio::sync::Mutex<mpsc::UnboundedReceiver<BodySender>>,
    accept: JoinHandle<()>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fixed {
        status: StatusCode,
        body: &'static str,
    },
    Echo,
    EchoBody,
    Stream,
    Trailers,
    UpgradeEcho,
}

#[derive(Debug)]
struct State {
    kind: Kind,
    label: HeaderValue,
    delay: Option<Duration>,
    /// `Some` when responses wait for a permit the test releases.
    gate: Option<Semaphore>,
    /// Requests that have arrived (counted before any delay or hold).
    arrived: watch::Sender<u64>,
    streams: mpsc::UnboundedSender<BodySender>,
    /// The `host` header (or authority) of every request, in arrival order.
    hosts: Mutex<Vec<String>>,
    /// Requests still to be failed with 503 ([`Builder::fail_first`]).
    fail_left: AtomicU64,
    /// Fail every request with 503 while set ([`Server::set_failing`]).
    failing: AtomicBool,
    /// The method of every request, in arrival order.
    methods: Mutex<Vec<String>>,
    /// The headers of every request, in arrival order.
    headers: Mutex<Vec<HeaderMap>>,
    /// Bumped by [`Server::close_connections`]: every open connection shuts down gracefully.
    close: watch::Sender<u64>,
    /// Connections accepted, and connections that have ended.
    accepted: watch::Sender<u64>,
    closed: watch::Sender<u64>,
}

// === impl Builder ===

impl Builder {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            label: "upstream".to_owned(),
            delay: None,
            hold: false,
            fail_first: 0,
        }
    }

    /// Names this upstream in the `x-served-by` response header.
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.to_owned();
        self
    }

    /// Waits this long before each response: the upstream's own latency, part of the scenario.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Answers the first `n` requests with 503 (`x-served-by` still set), then as usual.
    pub fn fail_first(mut self, n: u64) -> Self {
        self.fail_first = n;
        self
    }

    /// Holds each response until the test calls [`Server::release`].
    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// Binds `127.0.0.1:0` and starts accepting.
    pub async fn run(self) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake upstream local addr");
        let (streams_tx, streams_rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            kind: self.kind,
            label: HeaderValue::from_str(&self.label).expect("label is a valid header value"),
            delay: self.delay,
            gate: self.hold.then(|| Semaphore::new(0)),
            arrived: watch::Sender::new(0),
            streams: streams_tx,
            hosts: Mutex::new(Vec::new()),
            fail_left: AtomicU64::new(self.fail_first),
            failing: AtomicBool::new(false),
            methods: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
            close: watch::Sender::new(0),
            accepted: watch::Sender::new(0),
            closed: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Server {
            addr,
            label: self.label,
            state,
            streams: tokio::sync::Mutex::new(streams_rx),
            accept,
        }
    }
}

// === impl Server ===

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// How many requests have arrived so far.
    pub fn requests(&self) -> u64 {
        *self.state.arrived.borrow()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_requests(&self, n: u64) {
        let mut rx = self.state.arrived.subscribe();
        let what = format!("{n} request(s) to reach upstream {:?}", self.label);
        bounded(&what, rx.wait_for(|seen| *seen >= n))
            .await
            .expect("fake upstream state outlives its server");
    }

    /// The `host` header (or the h2 authority when there is none) of each request so far.
    pub fn hosts(&self) -> Vec<String> {
        self.state.hosts.lock().expect("hosts lock").clone()
    }

    /// The method of each request so far.
    pub fn methods(&self) -> Vec<String> {
        self.state.methods.lock().expect("methods lock").clone()
    }

    /// The headers of each request so far.
    pub fn request_headers(&self) -> Vec<HeaderMap> {
        self.state.headers.lock().expect("headers lock").clone()
    }

    /// How many connections this upstream has accepted.
    pub fn connections(&self) -> u64 {
        *self.state.accepted.borrow()
    }

    /// Shuts every open connection down gracefully, as a peer going idle or away does: an idle
    /// HTTP/1.1 keep-alive connection is closed (its last response promised keep-alive), an
    /// HTTP/2 connection gets GOAWAY. Returns once every accepted connection has ended.
    pub async fn close_connections(&self) {
        self.state.close.send_modify(|n| *n += 1);
        let accepted = self.connections();
        let mut rx = self.state.closed.subscribe();
        let what = format!("upstream {:?} to close its connections", self.label);
        bounded(&what, rx.wait_for(|closed| *closed >= accepted))
            .await
            .expect("fake upstream state outlives its server");
    }

    /// While `on`, every request gets 503: an upstream that is down, then recovers.
    pub fn set_failing(&self, on: bool) {
        self.state.failing.store(on, Ordering::SeqCst);
    }

    /// Lets `n` held responses go (see [`Builder::hold`]).
    pub fn release(&self, n: usize) {
        self.state
            .gate
            .as_ref()
            .expect("release() on a server built without hold()")
            .add_permits(n);
    }

    /// The body writer of the next streaming request, once it has reached this upstream.
    pub async fn next_stream(&self) -> BodySender {
        let mut rx = self.streams.lock().await;
        let what = format!("a streaming request to reach upstream {:?}", self.label);
        bounded(&what, rx.recv())
            .await
            .expect("fake upstream state outlives its server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The accept task owns every connection task (a JoinSet): aborting it ends them all.
        self.accept.abort();
    }
}

// === serving ===

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                state.accepted.send_modify(|n| *n += 1);
                conns.spawn(async move {
                    let mut close = state.close.subscribe();
                    let handler = state.clone();
                    let service = hyper::service::service_fn(move |req| {
                        handle(handler.clone(), req)
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    // Errors here are the peer going away mid-request; tests see them on
                    // their side of the connection.
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = close.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    state.closed.send_modify(|n| *n += 1);
                });
            }
            // Reap finished connections so the set does not grow without end.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    state.hosts.lock().expect("hosts lock").push(host.clone());
    state
        .methods
        .lock()
        .expect("methods lock")
        .push(req.method().to_string());
    state
        .headers
        .lock()
        .expect("headers lock")
        .push(req.headers().clone());
    state.arrived.send_modify(|n| *n += 1);

    let fail_now = state.failing.load(Ordering::SeqCst)
        || state
            .fail_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if fail_now {
        drain(req).await;
        let mut rsp = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(body::full("failing on cue"))
            .expect("valid response");
        rsp.headers_mut()
            .insert(HeaderName::from_static(SERVED_BY), state.label.clone());
        return Ok(rsp);
    }

    // An upgrade must be taken from the request before the 101 is answered.
    let on_upgrade = matches!(state.kind, Kind::UpgradeEcho).then(|| hyper::upgrade::on(&mut req));

    if let Some(gate) = &state.gate {
        gate.acquire()
            .await
            .expect("the gate is never closed")
            .forget();
    }
    if let Some(delay) = state.delay {
        tokio::time::sleep(delay).await;
    }

    let mut rsp = match state.kind {
        Kind::Fixed { status, body } => {
            drain(req).await;
            Response::builder()
                .status(status)
                .body(body::full(body))
                .expect("valid response")
        }
        Kind::Echo => echo_json(req, host).await,
        Kind::EchoBody => {
            let bytes = collect(req).await.0;
            Response::new(body::full(bytes))
        }
        Kind::Stream => {
            let (tx, body) = body::channel();
            // The test may have stopped listening; the body then just never ends.
            let _ = state.streams.send(tx);
            Response::new(body)
        }
        Kind::Trailers => grpc_echo(req).await,
        Kind::UpgradeEcho => upgrade(req, on_upgrade.expect("taken above")),
    };
    rsp.headers_mut()
        .insert(HeaderName::from_static(SERVED_BY), state.label.clone());
    Ok(rsp)
}

async fn echo_json(req: Request<Incoming>, host: String) -> Response<Body> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let authority = req.uri().authority().map(|a| a.to_string());
    // Repeated headers are joined with ", " so a test sees every value that arrived.
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::String(seen)) => {
                seen.push_str(", ");
                seen.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), value.into());
            }
        }
    }
    let (bytes, _) = collect(req).await;
    let json = serde_json::json!({
        "method": method,
        "path": path,
        "version": version,
        "host": host,
        "authority": authority,
        "headers": headers,
        "body": String::from_utf8_lossy(&bytes),
    });
    Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .body(body::full(json.to_string()))
        .expect("valid response")
}

async fn grpc_echo(req: Request<Incoming>) -> Response<Body> {
    let (bytes, req_trailers) = collect(req).await;
    let mut trailers = HeaderMap::new();
    match req_trailers {
        Some(req_trailers) if !req_trailers.is_empty() => {
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            for (name, value) in &req_trailers {
                let echoed = HeaderName::from_bytes(format!("x-echo-{name}").as_bytes())
                    .expect("prefixed header name stays valid");
                trailers.append(echoed, value.clone());
            }
        }
        _ => {
            trailers.insert("grpc-status", HeaderValue::from_static("3"));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static("request trailers missing"),
            );
        }
    }
    let (tx, body) = body::channel();
    tx.send(bytes);
    tx.trailers(trailers);
    Response::builder()
        .header(CONTENT_TYPE, "application/grpc")
        .body(body)
        .expect("valid response")
}

fn upgrade(req: Request<Incoming>, on_upgrade: hyper::upgrade::OnUpgrade) -> Response<Body> {
    let wants_ws = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !wants_ws {
        return Response::builder()
            .status(StatusCode::UPGRADE_REQUIRED)
            .body(body::full("upgrade: websocket required"))
            .expect("valid response");
    }
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "websocket")
        .body(body::empty())
        .expect("valid response")
}

/// Reads a whole request body and its trailers; a broken body reads as what arrived.
async fn collect(req: Request<Incoming>) -> (Bytes, Option<HeaderMap>) {
    match req.into_body().collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), None),
    }
}

async fn drain(req: Request<Incoming>) {
    let _ = collect(req).await;
}
