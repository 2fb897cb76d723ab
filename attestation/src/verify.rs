//! Policy-level verification: evidence + the aTLS nonce + the cluster's trust
//! roots + the image's expected measurements in, a verdict or a refusal with a
//! stable reason out. Pure data in and out; the gate does the I/O around it.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::evidence::{EVIDENCE_VERSION, Evidence, EvidenceEnvelope};
use crate::measurements::{MeasurementError, Measurements};
use crate::snp::launch::check_image_launch;
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
    /// Stable identity of the attesting machine: hex SHA-256 of the AK public
    /// area (TPM), or of the chip ID with the per-VM report ID (SNP, see
    /// `snp::VerifiedReport::identity`).
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
            // The image's signed launch values, not PCRs, say what an SNP
            // guest must be: SNP evidence carries no PCRs, and an image
            // without launch values cannot be attested by SNP alone.
            check_image_launch(&report, expected.snp())?;
            Ok(Verdict {
                kind,
                measured: BTreeMap::new(),
                identity: report.identity(),
                ak_name: None,
                ek_public: None,
                warnings: Vec::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::TpmEvidence;
    use crate::measurements::Expected;
    use crate::tpm::parse_certificates;

    const NONCE: [u8; 32] = [0x11; 32];

    fn fixture() -> (EvidenceEnvelope, TrustPolicy, [u8; 32]) {
        let ev: TpmEvidence =
            serde_json::from_str(include_str!("../testdata/tpm/quote.json")).expect("fixture");
        let pcr4: [u8; 32] = hex::decode(include_str!("../testdata/tpm/image-pcr4.hex").trim())
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        let policy = TrustPolicy {
            evidence_kinds: vec!["tpm".into()],
            ek_cas: parse_certificates(include_str!("../testdata/tpm/ek-ca.pem")).expect("CA"),
            snp: None,
        };
        (EvidenceEnvelope::new(Evidence::Tpm(ev)), policy, pcr4)
    }

    fn expect(pcr: u8, value: [u8; 32], warn_only: bool) -> Measurements {
        Measurements::new(BTreeMap::from([(
            pcr,
            Expected {
                expected: value,
                warn_only,
            },
        )]))
        .expect("valid")
    }

    #[test]
    fn matching_measurements_are_trusted() {
        let (env, policy, pcr4) = fixture();
        let v = verify_evidence(&env, &NONCE, &policy, &expect(4, pcr4, false)).expect("trusted");
        assert_eq!(v.kind, "tpm");
        assert!(v.warnings.is_empty());
        assert!(v.ak_name.is_some() && v.ek_public.is_some());
    }

    #[test]
    fn mismatch_refuses_unless_warn_only() {
        let (env, policy, _) = fixture();
        let err = verify_evidence(&env, &NONCE, &policy, &expect(4, [0; 32], false)).unwrap_err();
        assert_eq!(err.reason(), "pcr-mismatch");
        let v = verify_evidence(&env, &NONCE, &policy, &expect(4, [0; 32], true)).expect("warn");
        assert_eq!(v.warnings.len(), 1);
        // A PCR that was not quoted cannot be checked.
        let err = verify_evidence(&env, &NONCE, &policy, &expect(9, [0; 32], false)).unwrap_err();
        assert_eq!(err.reason(), "pcr-missing");
    }

    #[test]
    fn policy_gates_kind_version_and_roots() {
        let (mut env, mut policy, pcr4) = fixture();
        let m = expect(4, pcr4, false);
        policy.evidence_kinds = vec!["sev-snp".into()];
        assert_eq!(
            verify_evidence(&env, &NONCE, &policy, &m).unwrap_err(),
            Refusal::KindNotAccepted("tpm")
        );
        policy.evidence_kinds = vec!["tpm".into()];
        let cas = std::mem::take(&mut policy.ek_cas);
        assert_eq!(
            verify_evidence(&env, &NONCE, &policy, &m).unwrap_err(),
            Refusal::NoTrustRoots("tpm")
        );
        policy.ek_cas = cas;
        env.version = 2;
        assert_eq!(
            verify_evidence(&env, &NONCE, &policy, &m).unwrap_err(),
            Refusal::Version(2)
        );
    }

    #[test]
    fn snp_evidence_is_bound_to_the_connection_before_anything_else() {
        let (ev, trust) = crate::snp::tests::sample();
        let report = crate::snp::verify_report(&ev, &trust).expect("AMD sample verifies");
        let policy = TrustPolicy {
            evidence_kinds: vec!["sev-snp".into()],
            ek_cas: Vec::new(),
            snp: Some(trust),
        };
        let env = EvidenceEnvelope::new(Evidence::SevSnp(ev));
        // The sample's REPORT_DATA is AMD's, not one of our nonces; the
        // launch checks after it are tested on the verified report in
        // `snp::launch`.
        let nonce: [u8; 32] = report.report_data[..32].try_into().expect("32 bytes");
        let launch = Measurements::default().with_snp(Some(crate::snp::launch::SnpLaunchPolicy {
            measurement: report.measurement,
            vmpl: 0,
            allow_smt: true,
            allow_migration_agent: false,
        }));
        assert_eq!(
            verify_evidence(&env, &nonce, &policy, &launch).unwrap_err(),
            Refusal::Snp(SnpError::Nonce)
        );
    }
}
