//! A small Consul HTTP client for the few endpoints the mesh uses, on the same hyper stack as
//! the rest of the mesh. Blocking queries return the `X-Consul-Index` beside the body and give
//! up when the answer takes longer than the wait plus a small margin ([`blocking_limit`]).
//! Answers are handed on as JSON values: what they may hold is decided in [`super::admit`].

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Why a Consul call failed; every variant names the request.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("{path}: {source}")]
    Transport {
        path: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{path}: no answer within {after:?}")]
    Timeout { path: String, after: Duration },
    #[error("{path}: reading the body: {source}")]
    Body {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{path}: status {status}: {body}")]
    Status {
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("{path}: X-Consul-Index missing or not a number")]
    Index { path: String },
    #[error("{path}: unexpected response: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("/v1/status/leader: the Consul cluster has no leader")]
    NoLeader,
    #[error("no answer: the liveness probe failed ({0})")]
    Down(String),
    #[error("{0:?} is not a Consul address (host:port)")]
    Address(String),
}

/// A blocking query's position: `index` 0 asks for the current state at once.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub index: u64,
    pub wait: Duration,
}

/// A response with the index to block on next.
#[derive(Debug)]
pub struct Indexed<T> {
    pub index: u64,
    pub value: T,
}

#[derive(Clone, Debug)]
pub struct ConsulClient {
    authority: http::uri::Authority,
    http: Client<HttpConnector, Full<Bytes>>,
}

// === impl ConsulClient ===

impl ConsulClient {
    /// `address` is the local agent's HTTP API, e.g. `127.0.0.1:8500`.
    pub fn new(address: &str) -> Result<Self, ConsulError> {
        let authority = address
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(|_| ConsulError::Address(address.to_owned()))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Self { authority, http })
    }

    /// `/v1/catalog/services`: service names and their tags, as Consul wrote them (a tag list
    /// may be `null`); [`super::admit::services`] reads them one by one.
    pub async fn catalog_services(
        &self,
        q: Query,
    ) -> Result<Indexed<BTreeMap<String, Value>>, ConsulError> {
        self.blocking("/v1/catalog/services?", q).await
    }

    /// `/v1/health/service/<name>`: every instance with its node and checks, one JSON value
    /// each, so one malformed entry costs only itself ([`super::admit::instances`]). The
    /// `passing` filter is not asked for: health is read from each entry's `Checks`, and the
    /// kind of an instance whose checks fail is still seen. `name` must be a valid service
    /// name (it goes into the path as is).
    pub async fn instances(
        &self,
        service: &str,
        q: Query,
    ) -> Result<Indexed<Vec<Value>>, ConsulError> {
        let path = format!("/v1/health/service/{service}?");
        self.blocking(&path, q).await
    }

    /// `/v1/status/leader`: a cheap liveness probe. An empty answer means the cluster has no
    /// leader, so reads fail or go stale.
    pub async fn leader(&self, limit: Duration) -> Result<(), ConsulError> {
        let path = "/v1/status/leader";
        let (status, _, body) = self.call(Method::GET, path, None, limit).await?;
        if status != StatusCode::OK {
            return Err(ConsulError::Status {
                path: path.to_owned(),
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        match serde_json::from_slice::<String>(&body) {
            Ok(leader) if !leader.is_empty() => Ok(()),
            Ok(_) => Err(ConsulError::NoLeader),
            Err(source) => Err(ConsulError::Decode {
                path: path.to_owned(),
                source,
            }),
        }
    }

    async fn blocking<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
        q: Query,
    ) -> Result<Indexed<T>, ConsulError> {
        let wait = q.wait.as_secs().max(1);
        let pq = format!("{path_and_query}index={}&wait={wait}s", q.index);
        let limit = blocking_limit(Duration::from_secs(wait));
        let (status, headers, body) = self.call(Method::GET, &pq, None, limit).await?;
        let path = strip_query(&pq);
        if status != StatusCode::OK {
            return Err(ConsulError::Status {
                path,
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        let index = headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ConsulError::Index { path: path.clone() })?;
        let value =
            serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { path, source })?;
        Ok(Indexed { index, value })
    }

    /// `PUT /v1/agent/...` with an optional JSON body; success is any 2xx.
    pub async fn put(&self, path: &str, body: Option<Bytes>) -> Result<(), ConsulError> {
        let (status, _, rsp) = self
            .call(Method::PUT, path, body, Duration::from_secs(5))
            .await?;
        if !status.is_success() {
            return Err(ConsulError::Status {
                path: path.to_owned(),
                status,
                body: String::from_utf8_lossy(&rsp).chars().take(200).collect(),
            });
        }
        Ok(())
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        limit: Duration,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ConsulError> {
        let path = strip_query(path_and_query);
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ConsulError::Address(path_and_query.to_owned()))?;
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| ConsulError::Address(path_and_query.to_owned()))?;
        let fut = async {
            let rsp = self
                .http
                .request(req)
                .await
                .map_err(|source| ConsulError::Transport {
                    path: path.clone(),
                    source,
                })?;
            let (parts, body) = rsp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|source| ConsulError::Body {
                    path: path.clone(),
                    source,
                })?
                .to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(res) => res,
            Err(_) => Err(ConsulError::Timeout {
                path: path.clone(),
                after: limit,
            }),
        }
    }
}

/// How long a blocking query may take before it counts as hung: the wait, the up to wait/16
/// of jitter Consul adds, and one second for the answer to travel.
pub fn blocking_limit(wait: Duration) -> Duration {
    wait + wait / 16 + Duration::from_secs(1)
}

fn strip_query(pq: &str) -> String {
    pq.split('?').next().unwrap_or(pq).to_owned()
}
