//! Policy-level verification: evidence + the aTLS nonce + the cluster's trust
//! roots + the image's expected measurements in, a verdict or a refusal with a
//! stable reason out. Pure data in and out; the gate does the I/O around it.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::evidence::{EVIDENCE_VERSION, Evidence, EvidenceEnvelope};
use crate::measurements::{MeasurementError, Measurements};
use crate::snp::{SnpError, SnpTrust, verify_snp};
use crate::tpm::{TpmError, verify_quote};

/// Trust roots and accepted evidence kinds (from the AttestationPolicy).
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Accepted kinds, as [`Evidence::kind`] names them.
    pub evidence_kinds: Vec<String>,
    /// DER certificates of the trusted EK CAs.
    pub ek_cas: Vec<Vec<u8>>,
    pub snp: Option<SnpTrust>,
}

/// What the verifier concluded about an accepted node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: &'static str,
    /// Measured PCR values (TPM evidence).
    pub measured: BTreeMap<u8, [u8; 32]>,
    /// Stable identity of the attesting key: hex SHA-256 of the AK public area
    /// (TPM) or of the chip ID (SNP).
    pub identity: String,
    /// For TPM evidence: the AK name and EK public key, for the credential
    /// challenge that proves the AK lives next to the EK.
    pub ak_name: Option<Vec<u8>>,
    pub ek_public: Option<Vec<u8>>,
    /// warnOnly mismatches.
    pub warnings: Vec<String>,
}

/// Why evidence was refused. [`Refusal::reason`] is a metric label.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("evidence version {0} is not supported (this verifier knows {EVIDENCE_VERSION})")]
    Version(u32),
    #[error("evidence kind {0} is not accepted by the AttestationPolicy")]
    KindNotAccepted(&'static str),
    #[error("the AttestationPolicy has no trust roots for {0} evidence")]
    NoTrustRoots(&'static str),
    #[error(transparent)]
    Tpm(#[from] TpmError),
    #[error(transparent)]
    Snp(#[from] SnpError),
    #[error("measurements: {0}")]
    Measurements(#[from] MeasurementError),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Version(_) => "evidence-version",
            Refusal::KindNotAccepted(_) => "kind-not-accepted",
            Refusal::NoTrustRoots(_) => "no-trust-roots",
            Refusal::Tpm(e) => e.reason(),
            Refusal::Snp(e) => e.reason(),
            Refusal::Measurements(MeasurementError::Missing(_)) => "pcr-missing",
            Refusal::Measurements(_) => "pcr-mismatch",
        }
    }
}

/// Verifies `envelope` bound to `nonce` against `policy` and `expected`.
pub fn verify_evidence(
    envelope: &EvidenceEnvelope,
    nonce: &[u8; 32],
    policy: &TrustPolicy,
    expected: &Measurements,
) -> Result<Verdict, Refusal> {
    if envelope.version != EVIDENCE_VERSION {
        return Err(Refusal::Version(envelope.version));
    }
    let kind = envelope.evidence.kind();
    if !policy.evidence_kinds.iter().any(|k| k == kind) {
        return Err(Refusal::KindNotAccepted(kind));
    }
    match &envelope.evidence {
        Evidence::Tpm(tpm) => {
            if policy.ek_cas.is_empty() {
                return Err(Refusal::NoTrustRoots(kind));
            }
            let quote = verify_quote(tpm, nonce, &policy.ek_cas)?;
            let measured: BTreeMap<u8, [u8; 32]> = quote
                .pcrs
                .iter()
                .filter_map(|(k, v)| u8::try_from(*k).ok().map(|k| (k, *v)))
                .collect();
            let warnings = expected.compare(&measured)?;
            Ok(Verdict {
                kind,
                measured,
                identity: quote.ak_fingerprint,
                ak_name: Some(quote.ak_name),
                ek_public: Some(quote.ek_public),
                warnings,
            })
        }
        Evidence::SevSnp(snp) => {
            let trust = policy.snp.as_ref().ok_or(Refusal::NoTrustRoots(kind))?;
            let report = verify_snp(snp, nonce, trust)?;
            // The launch measurement is not a PCR; images measured by PCRs
            // need vTPM evidence. PCR expectations that are not warnOnly
            // therefore refuse SNP-only evidence (Missing).
            let warnings = expected.compare(&BTreeMap::new())?;
            use sha2::Digest;
            Ok(Verdict {
                kind,
                measured: BTreeMap::new(),
                identity: hex::encode(sha2::Sha256::digest(report.chip_id)),
                ak_name: None,
                ek_public: None,
                warnings,
            })
        }
    }
}
