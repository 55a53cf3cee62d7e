//! Connection pools to upstream endpoints: one HTTP/1.1 and one HTTP/2 (prior knowledge)
//! client, each keeping idle connections per endpoint until they time out.

use crate::bootstrap::Upstream;
use crate::outbound::replay::RequestBody;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mesh_config::Protocol;
use std::time::Duration;

pub type HttpClient = Client<HttpConnector, RequestBody>;

/// Shared by every request of a listener; cloning is cheap.
#[derive(Clone, Debug)]
pub struct Pools {
    http1: HttpClient,
    http2: HttpClient,
}

impl Pools {
    pub fn new(cfg: &Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(true);

        // A request queued for a pooled connection that the peer closes (reset, GOAWAY)
        // before the request went out is sent on a fresh connection instead of failing.
        let mut http1 = Client::builder(TokioExecutor::new());
        http1
            .retry_canceled_requests(true)
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let mut http2 = Client::builder(TokioExecutor::new());
        http2
            .retry_canceled_requests(true)
            .http2_only(true)
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_adaptive_window(true);
        Self {
            http1: http1.build(connector.clone()),
            http2: http2.build(connector),
        }
    }

    pub fn client(&self, protocol: Protocol) -> &HttpClient {
        match protocol {
            Protocol::Http1 => &self.http1,
            Protocol::Http2 => &self.http2,
        }
    }
}
