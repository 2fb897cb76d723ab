//! Why one node's re-attestation failed ([`Failure`], which becomes the
//! `Verified` condition's reason and a metric label) and why a whole sweep
//! could not run ([`SweepError`]).

use confidential_attestation::atls;

/// Why one node's re-attestation failed. [`Failure::reason`] is the
/// `Verified` condition's reason; [`Failure::code`] the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("no attestation endpoint: {0}")]
    NoEndpoint(String),
    #[error("node unreachable: {0}")]
    Unreachable(String),
    #[error("node's answer is not attestation evidence: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    ImageNotTrusted(String),
    #[error("evidence refused ({reason}): {message}")]
    Evidence {
        reason: &'static str,
        message: String,
    },
    #[error(
        "the evidence is signed by AK {presented}, not by the AK {recorded} recorded at join: \
         another machine answers for this node"
    )]
    AkMismatch { recorded: String, presented: String },
    #[error("{0}")]
    WrongNode(String),
}

impl Failure {
    /// Stable, kebab-case code (metric label, logs).
    pub fn code(&self) -> &'static str {
        match self {
            Failure::NoEndpoint(_) => "no-endpoint",
            Failure::Unreachable(_) => "unreachable",
            Failure::BadAnswer(_) => "bad-answer",
            Failure::ImageNotTrusted(_) => "image-not-trusted",
            Failure::Evidence { reason, .. } => reason,
            Failure::AkMismatch { .. } => "ak-mismatch",
            Failure::WrongNode(_) => "wrong-node",
        }
    }

    /// CamelCase reason for conditions and Events (`pcr-mismatch` ->
    /// `PcrMismatch`), as the Kubernetes API conventions want.
    pub fn reason(&self) -> String {
        self.code()
            .split('-')
            .map(|word| {
                let mut chars = word.chars();
                chars
                    .next()
                    .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Whether the node did not answer at all (as opposed to answering
    /// with evidence that does not pass).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Failure::NoEndpoint(_) | Failure::Unreachable(_))
    }
}

/// Why a whole sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(
        "AttestationPolicy {0} does not exist; no node can be re-verified (attestations lapse at their expiry)"
    )]
    NoPolicy(String),
    #[error("AttestationPolicy {name} is unusable: {message}")]
    BadPolicy { name: String, message: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("aTLS client: {0}")]
    Atls(#[from] atls::AtlsError),
}
