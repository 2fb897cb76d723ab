//! Policy-level verification: evidence + the aTLS nonce + the cluster's trust
//! roots + the image's expected measurements in, a verdict or a refusal with a
//! stable reason out. Pure data in and out; the gate does the I/O around it.
//!
//! [`verify_evidence`] is the public entry point for every verifier (join and
//! re-attestation). Its [`Verdict`] says what the evidence proves *by
//! itself*. For a join that is not enough with TPM evidence: the quote proves
//! the AK signed it, but only credential activation proves the AK lives in the
//! TPM of the certified EK. That step is a typestate: [`Verdict::bind`] yields
//! either a [`BoundVerdict`] (the evidence is signed by the hardware root
//! itself, SEV-SNP) or a [`PendingActivation`] whose only way forward is
//! [`PendingActivation::activate`] with the TPM's answer. Only a
//! [`BoundVerdict`] carries what a caller needs to admit a node, so a caller
//! cannot forget the activation.

use std::collections::BTreeMap;

use rand::RngCore;
use thiserror::Error;

use crate::evidence::{EVIDENCE_VERSION, Evidence, EvidenceEnvelope, EvidenceKind};
use crate::measurements::{MeasurementError, Measurements};
use crate::snp::launch::check_image_launch;
use crate::snp::{SnpError, SnpTrust, verify_snp};
use crate::tpm::{Challenge, TpmError, make_credential, verify_quote};

/// Trust roots and accepted evidence kinds (from the AttestationPolicy).
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Accepted kinds.
    pub evidence_kinds: Vec<EvidenceKind>,
    /// DER certificates of the trusted EK CAs.
    pub ek_cas: Vec<Vec<u8>>,
    pub snp: Option<SnpTrust>,
}

/// How the attesting key is tied to the hardware root of trust.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyBinding {
    /// The evidence is signed by a key the hardware vendor certifies
    /// directly (the SNP VCEK): nothing more to prove.
    Hardware,
    /// A TPM AK: bound to the certified EK only by credential activation.
    Activation {
        ak_name: Vec<u8>,
        ek_public: Vec<u8>,
    },
}

/// What the evidence proves about a node by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: EvidenceKind,
    /// Measured PCR values (TPM evidence).
    pub measured: BTreeMap<u8, [u8; 32]>,
    /// Stable identity of the attesting machine: hex SHA-256 of the AK public
    /// area (TPM), or of the chip ID with the per-VM report ID (SNP, see
    /// `snp::VerifiedReport::identity`).
    pub identity: String,
    /// warnOnly mismatches.
    pub warnings: Vec<String>,
    binding: KeyBinding,
}

/// A verdict whose attesting key is proven to belong to the certified
/// hardware: the only form from which a node may be admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundVerdict(Verdict);

impl BoundVerdict {
    pub fn verdict(&self) -> &Verdict {
        &self.0
    }
}

/// A TPM verdict waiting for the credential activation that proves its AK
/// lives next to the certified EK. Keep it only as long as the channel the
/// evidence was bound to.
#[derive(Debug)]
pub struct PendingActivation {
    verdict: Verdict,
    secret: [u8; 32],
    challenge: Challenge,
}

/// The next step after [`Verdict::bind`].
#[derive(Debug)]
pub enum Binding {
    Bound(BoundVerdict),
    NeedsActivation(PendingActivation),
}

impl Verdict {
    /// The verdict on a TPM quote a caller verified ([`verify_quote`]) and
    /// judged against its own expectations (an admin's tool comparing with
    /// several local measurement files): like every TPM verdict it still has
    /// to [`Verdict::bind`] its AK by credential activation.
    pub fn from_tpm_quote(quote: crate::tpm::VerifiedQuote, warnings: Vec<String>) -> Self {
        Self {
            kind: EvidenceKind::Tpm,
            measured: quote
                .pcrs
                .iter()
                .filter_map(|(k, v)| u8::try_from(*k).ok().map(|k| (k, *v)))
                .collect(),
            identity: quote.ak_fingerprint,
            warnings,
            binding: KeyBinding::Activation {
                ak_name: quote.ak_name,
                ek_public: quote.ek_public,
            },
        }
    }

    /// Starts binding the attesting key to the hardware root: SNP evidence
    /// is bound already; TPM evidence gets a fresh credential challenge.
    pub fn bind(self) -> Result<Binding, Refusal> {
        let challenge = match &self.binding {
            KeyBinding::Hardware => return Ok(Binding::Bound(BoundVerdict(self))),
            KeyBinding::Activation { ak_name, ek_public } => {
                let mut secret = [0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                (make_credential(ek_public, ak_name, &secret)?, secret)
            }
        };
        let (challenge, secret) = challenge;
        Ok(Binding::NeedsActivation(PendingActivation {
            verdict: self,
            secret,
            challenge,
        }))
    }
}

impl PendingActivation {
    /// What to send to the node for `TPM2_ActivateCredential`.
    pub fn challenge(&self) -> &Challenge {
        &self.challenge
    }

    /// What the evidence proved so far (not enough to admit the node).
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// Checks the TPM's answer in constant time; the verdict is bound when it
    /// is the secret the challenge carried.
    pub fn activate(self, answer: &[u8]) -> Result<BoundVerdict, Refusal> {
        let same = answer.len() == self.secret.len()
            && answer
                .iter()
                .zip(self.secret.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(BoundVerdict(self.verdict))
        } else {
            Err(Refusal::ActivationFailed)
        }
    }
}

/// Why evidence was refused. [`Refusal::reason`] is a metric label.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("evidence version {0} is not supported (this verifier knows {EVIDENCE_VERSION})")]
    Version(u32),
    #[error("evidence kind {0} is not accepted by the AttestationPolicy")]
    KindNotAccepted(EvidenceKind),
    #[error("the AttestationPolicy has no trust roots for {0} evidence")]
    NoTrustRoots(EvidenceKind),
    #[error(transparent)]
    Tpm(#[from] TpmError),
    #[error(transparent)]
    Snp(#[from] SnpError),
    #[error("measurements: {0}")]
    Measurements(#[from] MeasurementError),
    #[error("credential activation failed: the AK is not in the TPM of the certified EK")]
    ActivationFailed,
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
            Refusal::ActivationFailed => "activation-failed",
        }
    }
}

/// Verifies `envelope` bound to `nonce` against `policy` and `expected`.
///
/// The verdict proves what the evidence alone proves; a join must still
/// [`Verdict::bind`] it. A re-attestation of a node whose AK was bound at
/// join compares [`Verdict::identity`] with the recorded one instead.
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
    if !policy.evidence_kinds.contains(&kind) {
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
            Ok(Verdict::from_tpm_quote(quote, warnings))
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
                warnings: Vec::new(),
                binding: KeyBinding::Hardware,
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
            evidence_kinds: vec![EvidenceKind::Tpm],
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
        assert_eq!(v.kind, EvidenceKind::Tpm);
        assert!(v.warnings.is_empty());
        assert!(matches!(v.binding, KeyBinding::Activation { .. }));
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
        policy.evidence_kinds = vec![EvidenceKind::SevSnp];
        assert_eq!(
            verify_evidence(&env, &NONCE, &policy, &m).unwrap_err(),
            Refusal::KindNotAccepted(EvidenceKind::Tpm)
        );
        policy.evidence_kinds = vec![EvidenceKind::Tpm];
        let cas = std::mem::take(&mut policy.ek_cas);
        assert_eq!(
            verify_evidence(&env, &NONCE, &policy, &m).unwrap_err(),
            Refusal::NoTrustRoots(EvidenceKind::Tpm)
        );
        policy.ek_cas = cas;
        env.version = 2;
        assert_eq!(
            verify_evidence(&env, &NONCE, &policy, &m).unwrap_err(),
            Refusal::Version(2)
        );
    }

    #[test]
    fn tpm_verdict_is_bound_only_by_the_challenge_secret() {
        let (env, policy, pcr4) = fixture();
        let verdict =
            verify_evidence(&env, &NONCE, &policy, &expect(4, pcr4, false)).expect("trusted");
        let Binding::NeedsActivation(pending) = verdict.clone().bind().expect("challenge") else {
            panic!("TPM evidence must need activation");
        };
        assert!(!pending.challenge().credential_blob.is_empty());
        let secret = pending.secret;
        // Wrong answers: other bytes, a prefix, an extension, nothing.
        for wrong in [
            vec![0u8; 32],
            secret[..31].to_vec(),
            [secret.as_slice(), &[0]].concat(),
            Vec::new(),
        ] {
            let Binding::NeedsActivation(p) = verdict.clone().bind().expect("challenge") else {
                panic!("TPM evidence must need activation");
            };
            assert_eq!(p.activate(&wrong).unwrap_err(), Refusal::ActivationFailed);
        }
        let bound = pending.activate(&secret).expect("the right secret binds");
        assert_eq!(bound.verdict().identity, verdict.identity);
        // Every challenge carries a fresh secret.
        let Binding::NeedsActivation(again) = verdict.bind().expect("challenge") else {
            panic!("TPM evidence must need activation");
        };
        assert_ne!(again.secret, secret);
    }

    #[test]
    fn hardware_signed_verdict_is_bound_at_once() {
        let verdict = Verdict {
            kind: EvidenceKind::SevSnp,
            measured: BTreeMap::new(),
            identity: "chip".into(),
            warnings: vec![],
            binding: KeyBinding::Hardware,
        };
        let Binding::Bound(bound) = verdict.clone().bind().expect("bound") else {
            panic!("SNP evidence needs no activation");
        };
        assert_eq!(bound.verdict(), &verdict);
    }

    #[test]
    fn snp_evidence_is_bound_to_the_connection_before_anything_else() {
        let (ev, trust) = crate::snp::tests::sample();
        let report = crate::snp::verify_report(&ev, &trust).expect("AMD sample verifies");
        let policy = TrustPolicy {
            evidence_kinds: vec![EvidenceKind::SevSnp],
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
