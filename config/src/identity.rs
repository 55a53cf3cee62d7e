//! `[identity]` in the policy (and so in every snapshot): the mesh's mutual-TLS rollout switch.
//!
//! `off` (the default): sidecars dial peers in plaintext; one with a certificate still
//! answers TLS. `permissive`: sidecars with a certificate dial peers over mutual TLS; inbound
//! accepts TLS and plaintext and counts plaintext callers. `strict`: inbound refuses
//! plaintext callers. A running mesh migrates `off` -> `permissive` -> `strict`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Off,
    Permissive,
    Strict,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshIdentity {
    #[serde(default)]
    pub mode: MtlsMode,
}

// === impl MeshIdentity ===

impl MeshIdentity {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

// === impl MtlsMode ===

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Off => "off",
            MtlsMode::Permissive => "permissive",
            MtlsMode::Strict => "strict",
        }
    }
}
