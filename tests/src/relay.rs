//! A fake agent app that calls another agent: every request it receives is sent on through its
//! own sidecar's outbound listener to a target, carrying the `x-mesh-timeout-ms` budget it was
//! given, as the platform's agent SDK does. It answers with the onward reply's status and body.
//!
//! ```ignore
//! let app_b = relay::to("c").run().await;          // bound before its sidecar exists
//! let sidecar_b = proxy::builder().inbound_app(app_b.addr()).snapshot(..).start().await;
//! app_b.via(sidecar_b.outbound());                   // then told where its sidecar listens
//! ```

use crate::body::{self, Body};
use crate::client;
use http::{HeaderName, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The deadline header a sidecar gives its app and the app passes on.
const TIMEOUT_HEADER: HeaderName = HeaderName::from_static("x-mesh-timeout-ms");

/// A relay that will call `target`.
pub fn to(target: &str) -> Builder {
    Builder {
        target: target.to_owned(),
    }
}

#[derive(Debug)]
pub struct Builder {
    target: String,
}

/// A running relay app. Dropping it aborts its accept loop and connections.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: String,
    /// The sidecar's outbound listener, set once it is known.
    sidecar: OnceLock<SocketAddr>,
}

// === impl Builder ===

impl Builder {
    /// Binds `127.0.0.1:0` and starts accepting.
    pub async fn run(self) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay app on 127.0.0.1:0");
        let addr = listener.local_addr().expect("relay local addr");
        let shared = Arc::new(Shared {
            target: self.target,
            sidecar: OnceLock::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Relay {
            addr,
            shared,
            accept,
        }
    }
}

// === impl Relay ===

impl Relay {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends onward calls through the sidecar whose outbound listener is `outbound`.
    pub fn via(&self, outbound: SocketAddr) {
        self.shared
            .sidecar
            .set(outbound)
            .expect("via() is called once");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        relay(shared.clone(), req)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let Some(&sidecar) = shared.sidecar.get() else {
        return Ok(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "relay has no sidecar yet",
        ));
    };
    let c = client::http1(sidecar);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut onward = c.request(req.method().clone(), &shared.target, path);
    if let Some(budget) = req.headers().get(TIMEOUT_HEADER) {
        onward = onward.header(TIMEOUT_HEADER, budget);
    }
    let onward = onward.body(body::empty()).expect("valid onward request");
    let (status, text) = match c.try_send(onward).await {
        Ok(reply) => (reply.status, reply.body),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string().into()),
    };
    Ok(answer(status, text))
}

fn answer(status: StatusCode, text: impl Into<bytes::Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(body::full(text))
        .expect("valid response")
}
