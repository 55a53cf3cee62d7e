//! Inbound authorization: the snapshot's `[authorization]` rules decide whether the caller
//! (the `x-mesh-caller` that [`super::caller`] set from the verified certificate) may call this
//! agent with this method and path. A refusal is a 403 JSON naming the rule that decided,
//! counted in `agent_authz_denied_total{target,caller}` and written as an audit line. Rules
//! come with the snapshot, so an edit applies without a restart.

use crate::body::ProxyBody;
use crate::outbound::CALLER_HEADER;
use crate::state::State;
use futures_util::future::{Either, Ready};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_config::authz::Decision;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The `caller` label for a name the snapshot does not know (any caller could mint those).
const UNKNOWN_CALLER: &str = "(unknown)";

#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    state: Arc<State>,
    /// This agent: the target of every inbound call.
    target: Arc<str>,
}

// === impl Authorize ===

impl<S: crate::serve::ForPeer> crate::serve::ForPeer for Authorize<S> {
    fn for_peer(&self, peer: std::net::SocketAddr) -> Self {
        Self {
            inner: self.inner.for_peer(peer),
            state: self.state.clone(),
            target: self.target.clone(),
        }
    }
}

impl<S> Authorize<S> {
    pub fn new(inner: S, state: Arc<State>, target: &str) -> Self {
        Self {
            inner,
            state,
            target: target.into(),
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for Authorize<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<Response<ProxyBody>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let table = self.state.load();
        let Some(authz) = table.snapshot.authorization.as_ref() else {
            return Either::Left(self.inner.call(req));
        };
        let caller = req
            .headers()
            .get(CALLER_HEADER)
            .and_then(|v| v.to_str().ok());
        let known = caller.and_then(|c| table.snapshot.service(c));
        let decision = authz.decide(
            &self.target,
            caller,
            known.map(|s| s.phase),
            req.method().as_str(),
            req.uri().path(),
        );
        match decision {
            Decision::Allow(_) => Either::Left(self.inner.call(req)),
            Decision::Deny(rule) => {
                let label = known.map_or(UNKNOWN_CALLER, |s| s.name.as_str()).to_owned();
                ::metrics::counter!(crate::metrics::AUTHZ_DENIED,
                    "target" => self.target.to_string(), "caller" => label)
                .increment(1);
                tracing::warn!(audit = "authz_denied", target = %self.target,
                    caller = caller.unwrap_or(""), method = %req.method(),
                    path = req.uri().path(), %rule, "call refused by authorization policy");
                let rsp = refusal(crate::grpc::is_grpc(&req), &self.target, caller, &rule);
                Either::Right(futures_util::future::ready(Ok(rsp)))
            }
        }
    }
}

/// The answer to a refused call: `PERMISSION_DENIED` for a gRPC caller, which a gRPC client
/// reads as a status; for others a 403 JSON naming the rule.
fn refusal(grpc: bool, target: &str, caller: Option<&str>, rule: &str) -> Response<ProxyBody> {
    if grpc {
        let message = format!("call to {target} refused by authorization policy: {rule}");
        return crate::grpc::error_response(crate::grpc::Code::PermissionDenied, &message);
    }
    let body = serde_json::json!({
        "error": "forbidden",
        "target": target,
        "caller": caller,
        "rule": rule,
    });
    let mut rsp = Response::new(ProxyBody::json(body.to_string()));
    *rsp.status_mut() = StatusCode::FORBIDDEN;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_caller_reads_permission_denied_others_a_403_naming_the_rule() {
        let rsp = refusal(true, "b", Some("d"), "b: no rule allows this caller");
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "7");
        let message = rsp.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("no rule allows this caller"), "{message}");

        let rsp = refusal(false, "b", Some("d"), "b: no rule allows this caller");
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            rsp.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
    }
}
