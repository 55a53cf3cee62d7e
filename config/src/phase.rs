use serde::{Deserialize, Serialize};
use std::fmt;

/// The platform's three agent phases, in priority order (critical first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Critical,
    Performance,
    Specialized,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Critical, Phase::Performance, Phase::Specialized];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Critical => "critical",
            Phase::Performance => "performance",
            Phase::Specialized => "specialized",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
