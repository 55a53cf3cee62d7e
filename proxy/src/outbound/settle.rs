//! Outcomes that wait for the end of the response body. A head that looked fine still fails if
//! its stream then breaks (the upstream reset it or fell silent), so an answer that is not a
//! failure by its status is judged when its body ends, as linkerd classifies at end of stream.

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
    pub fn finish(self, class: Class) {
        match self {
            Settle::Target(outcome) => outcome.record(class),
            Settle::Endpoint(backend, picked) => {
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
