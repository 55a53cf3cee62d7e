//! Outcomes that wait for the end of the response body. A head that looked fine still fails if
//! its stream then breaks (the upstream reset it or fell silent), or it is a gRPC call whose
//! trailers carry a failing `grpc-status`, so an answer that is not a failure by its status is
//! judged when its body ends, as linkerd classifies at end of stream.

use crate::body::broken_by_upstream;
use crate::outbound::balance::Picked;
use crate::outbound::breaker::machine::Class;
use crate::outbound::breaker::TargetOutcome;
use crate::state::Backend;
use std::sync::Arc;

/// Where one answer's outcome goes.
#[derive(Debug)]
pub enum Settle {
    /// A target's breaker, with how the request was admitted and where it went.
    Target(TargetOutcome),
    /// The endpoint that answered: its breaker and outlier ejection.
    Endpoint(Arc<Backend>, Picked),
}

impl Settle {
    /// `trailer_status`: the HTTP status a gRPC answer's trailers stand for, judged against
    /// the target's failure statuses as a head's would be.
    pub fn finish(self, class: Class, trailer_status: Option<u16>) {
        let failed = |backend: &Backend| {
            trailer_status.is_some_and(|s| backend.resilience.failures.contains(s))
        };
        match self {
            Settle::Target(outcome) => {
                let class = match class {
                    Class::Success if failed(outcome.backend()) => Class::Failure,
                    class => class,
                };
                outcome.record(class)
            }
            Settle::Endpoint(backend, picked) => {
                let class = match class {
                    Class::Success if failed(&backend) => Class::Failure,
                    class => class,
                };
                backend.endpoints.record(&picked, class, &backend.name)
            }
        }
    }

    /// How a body's end counts: `error` is the end's error kind, `complete` whether every frame
    /// had arrived (a caller leaving after the last byte did not cut anything short).
    pub fn class(error: Option<&str>, complete: bool) -> Class {
        match error {
            None => Class::Success,
            Some(kind) if broken_by_upstream(kind) => Class::Failure,
            Some(_) if complete => Class::Success,
            Some(_) => Class::Cancelled,
        }
    }
}
