//! The join decision as one pure function: the parsed request, the policy,
//! the pool, the attestation already recorded for the name and the
//! connection's nonce in; a [`Accepted`] plan or a [`Refusal`] out. No I/O:
//! the server reads its inputs from the watch caches (never from the API for
//! an unauthenticated request) and does the writes the plan asks for.
//!
//! Checks, in order: the request's shape; the policy and the pool exist; the
//! pool's image is trusted (the same [`TrustCache::image_trust`] rule as
//! admission); the evidence verifies against the policy's roots, this
//! connection's nonce and the image's measurements. Only then, so nobody
//! learns who holds a name without proving a measured machine first: name
//! ownership (a name recorded for another attesting key stays that key's,
//! whether or not a Node exists) and the state disk (a machine keeps the disk
//! recorded at its first join).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use confidential_api::endpoint::Endpoint;
use confidential_api::{AttestationPolicy, NodeAttestation, NodeVersion};
use confidential_attestation::evidence::EvidenceKind;
use confidential_attestation::protocol::JoinRequest;
use confidential_attestation::verify::{TrustPolicy, Verdict, verify_evidence};

use crate::verify::{ImageTrust, TrustCache};

/// Attestation lifetime when the policy sets none.
pub const DEFAULT_REATTESTATION_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Which endpoint the request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A machine joining (gets a bootstrap token).
    Join,
    /// A still-attested machine rebooting (no token).
    Rejoin,
}

/// Why a join was refused: a stable label for metrics and answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MalformedRequest,
    BodyTooLarge,
    BadNodeName,
    BadDiskUuid,
    /// The announced attestation endpoint is not `host:port`.
    BadAttestationEndpoint,
    /// The gate's caches have not synced or a watch is failing.
    NotReady,
    NoPolicy,
    PolicyInvalid,
    UnknownPool,
    ImageNotMeasured,
    MeasurementsSignature,
    /// The evidence did not verify; the verifier's own reason.
    Evidence(&'static str),
    NameTaken,
    NotAttested,
    DiskMismatch,
    /// The recorded attestation changed or vanished between the cache read
    /// and the write: the API server refused the conditional write.
    AttestationChanged,
    NoPendingJoin,
    RateLimited,
    Internal,
}

impl Reason {
    /// The label (`join_refusals_total{reason}`, `Refused::reason`).
    pub fn label(self) -> &'static str {
        match self {
            Reason::MalformedRequest => "malformed-request",
            Reason::BodyTooLarge => "body-too-large",
            Reason::BadNodeName => "bad-node-name",
            Reason::BadDiskUuid => "bad-disk-uuid",
            Reason::BadAttestationEndpoint => "bad-attestation-endpoint",
            Reason::NotReady => "not-ready",
            Reason::NoPolicy => "no-policy",
            Reason::PolicyInvalid => "policy-invalid",
            Reason::UnknownPool => "unknown-pool",
            Reason::ImageNotMeasured => "image-not-measured",
            Reason::MeasurementsSignature => "measurements-signature",
            Reason::Evidence(reason) => reason,
            Reason::NameTaken => "name-taken",
            Reason::NotAttested => "not-attested",
            Reason::DiskMismatch => "disk-mismatch",
            Reason::AttestationChanged => "attestation-changed",
            Reason::NoPendingJoin => "no-pending-join",
            Reason::RateLimited => "rate-limited",
            Reason::Internal => "internal",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::MalformedRequest
            | Reason::BadNodeName
            | Reason::BadDiskUuid
            | Reason::BadAttestationEndpoint => StatusCode::BAD_REQUEST,
            Reason::NotReady
            | Reason::NoPolicy
            | Reason::PolicyInvalid
            | Reason::AttestationChanged
            | Reason::Internal => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// A refusal: the reason and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// How the NodeAttestation is written: each form is conditional, so the API
/// server refuses the write if the cache the decision read was stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// No attestation for the name: create (AlreadyExists = someone else
    /// got the name first).
    Create,
    /// Our own attestation: replace exactly the version the decision saw
    /// (Conflict or NotFound = it changed or was deleted meanwhile).
    Replace { resource_version: String },
}

/// What an accepted (re)join will do once the attesting key is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinPlan {
    pub mode: Mode,
    pub node_name: String,
    pub image: String,
    pub pool: String,
    /// How long the new attestation is valid.
    pub valid_for: Duration,
    /// The state disk whose key the node gets: the one recorded at its
    /// first join, lower-case.
    pub disk_uuid: String,
    /// Where the node serves `/v1/attest`, as it announced it (canonical
    /// form); `None`: re-attestation dials the Node's InternalIP.
    pub attestation_endpoint: Option<String>,
    pub record: Record,
}

/// An accepted request: the plan, and the verdict that still has to be
/// bound to the hardware root before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub plan: JoinPlan,
    pub verdict: Verdict,
}

/// Everything [`decide`] reads.
pub struct Inputs<'a> {
    pub mode: Mode,
    pub request: &'a JoinRequest,
    /// The nonce of the connection the request came on (join purpose).
    pub nonce: &'a [u8; 32],
    pub policy_name: &'a str,
    pub policy: Option<&'a Arc<AttestationPolicy>>,
    /// The pool the request names, or the gate's default.
    pub pool_name: &'a str,
    pub pool: Option<&'a NodeVersion>,
    /// The NodeAttestation recorded under the requested name, if any.
    pub existing: Option<&'a NodeAttestation>,
    /// The image-trust memo shared with admission.
    pub trust: &'a TrustCache,
}

/// Whether `name` is a valid Node name (DNS subdomain).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The canonical (lower-case) form of a disk UUID, when it is one
/// (8-4-4-4-12 hex digits).
pub fn canonical_disk_uuid(uuid: &str) -> Option<String> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    let ok = groups.len() == lengths.len()
        && groups
            .iter()
            .zip(lengths)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| uuid.to_ascii_lowercase())
}

/// The kind as the NodeAttestation records it.
pub fn api_kind(kind: EvidenceKind) -> confidential_api::EvidenceKind {
    match kind {
        EvidenceKind::Tpm => confidential_api::EvidenceKind::Tpm,
        EvidenceKind::SevSnp => confidential_api::EvidenceKind::SevSnp,
    }
}

/// The verifier's view of an AttestationPolicy's trust roots.
pub fn trust_policy(policy: &AttestationPolicy) -> Result<TrustPolicy, Refusal> {
    crate::verify::trust_roots(&policy.spec).map_err(|e| {
        Refusal::new(
            Reason::PolicyInvalid,
            format!("an EK CA certificate of the AttestationPolicy does not parse: {e}"),
        )
    })
}

/// How long an attestation under `policy` is valid.
pub fn reattestation_interval(policy: &AttestationPolicy) -> Duration {
    policy
        .spec
        .reattestation_interval
        .as_deref()
        .and_then(confidential_api::duration::parse_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_REATTESTATION_INTERVAL)
}

/// Decides a (re)join. See the module docs for the order of the checks.
pub fn decide(inputs: &Inputs<'_>) -> Result<Accepted, Refusal> {
    let request = inputs.request;
    if !valid_node_name(&request.node_name) {
        return Err(Refusal::new(
            Reason::BadNodeName,
            format!("{:?} is not a valid node name", request.node_name),
        ));
    }
    let disk_uuid = canonical_disk_uuid(&request.disk_uuid).ok_or_else(|| {
        Refusal::new(
            Reason::BadDiskUuid,
            format!("{:?} is not a disk UUID", request.disk_uuid),
        )
    })?;
    // Only a hint for re-attestation and `verify` (whoever answers there
    // must quote with the AK recorded here), but recorded for every later
    // reader: one canonical `host:port` or nothing.
    let attestation_endpoint = request
        .attestation_endpoint
        .as_deref()
        .map(|e| {
            e.parse::<Endpoint>()
                .map(|e| e.to_string())
                .map_err(|e| Refusal::new(Reason::BadAttestationEndpoint, e.to_string()))
        })
        .transpose()?;
    let policy = inputs.policy.ok_or_else(|| {
        Refusal::new(
            Reason::NoPolicy,
            format!("AttestationPolicy {} does not exist", inputs.policy_name),
        )
    })?;
    let pool = inputs.pool.ok_or_else(|| {
        Refusal::new(
            Reason::UnknownPool,
            format!("NodeVersion {} does not exist", inputs.pool_name),
        )
    })?;
    let image = pool.spec.image.clone();
    let expected = match inputs
        .trust
        .image_trust(&image, std::slice::from_ref(policy))
    {
        ImageTrust::Trusted { measurements, .. } => measurements,
        ImageTrust::NotListed => {
            return Err(Refusal::new(
                Reason::ImageNotMeasured,
                format!("image {image} has no measurements in the AttestationPolicy"),
            ));
        }
        ImageTrust::Untrusted(reasons) => {
            return Err(Refusal::new(
                Reason::MeasurementsSignature,
                format!(
                    "the measurements of image {image} are not signed by a trusted publisher: {}",
                    reasons.join("; ")
                ),
            ));
        }
    };
    let trust = trust_policy(policy)?;
    let verdict = verify_evidence(&request.evidence, inputs.nonce, &trust, &expected)
        .map_err(|e| Refusal::new(Reason::Evidence(e.reason()), e.to_string()))?;

    let record = match (inputs.existing, inputs.mode) {
        (Some(att), _) if att.spec.ak_fingerprint != verdict.identity => {
            return Err(Refusal::new(
                Reason::NameTaken,
                format!(
                    "node name {} is held by another attested machine; its NodeAttestation must be deleted before another machine can take the name",
                    request.node_name
                ),
            ));
        }
        (None, Mode::Rejoin) => {
            return Err(Refusal::new(
                Reason::NotAttested,
                format!("{} has no attestation to rejoin with", request.node_name),
            ));
        }
        (None, Mode::Join) => Record::Create,
        (Some(att), _) => {
            let recorded = att
                .spec
                .disk_uuid
                .as_deref()
                .map(|d| canonical_disk_uuid(d).unwrap_or_else(|| d.to_owned()));
            if let Some(recorded) = recorded
                && recorded != disk_uuid
            {
                return Err(Refusal::new(
                    Reason::DiskMismatch,
                    format!(
                        "{} was attested with state disk {recorded}; it cannot ask for the key of disk {disk_uuid}",
                        request.node_name
                    ),
                ));
            }
            let resource_version = att.metadata.resource_version.clone().ok_or_else(|| {
                Refusal::new(
                    Reason::AttestationChanged,
                    format!(
                        "the NodeAttestation of {} has no resourceVersion; retry",
                        request.node_name
                    ),
                )
            })?;
            Record::Replace { resource_version }
        }
    };
    Ok(Accepted {
        plan: JoinPlan {
            mode: inputs.mode,
            node_name: request.node_name.clone(),
            image,
            pool: inputs.pool_name.to_owned(),
            valid_for: reattestation_interval(policy),
            disk_uuid,
            attestation_endpoint,
            record,
        },
        verdict,
    })
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "decide_properties.rs"]
mod properties;
