//! SEV-SNP evidence verification (pure Rust, `sev` crate with `crypto_nossl`):
//! ARK → ASK → VCEK chain against pinned AMD roots, the report signature by
//! the VCEK, the reported TCB against the TCB the VCEK was issued for (its
//! X.509 extensions) and against the policy minimum, and the REPORT_DATA
//! binding to the aTLS nonce.
//!
//! What the report says about the guest is checked against the node image's
//! signed launch values in [`launch`] (launch measurement, guest policy,
//! VMPL); [`binding`] verifies a vTPM attestation key committed to in
//! REPORT_DATA; [`issuer`] turns the secure processor's answer into evidence
//! (the `/dev/sev-guest` call itself is behind the `snp-issuer` feature and
//! needs SEV-SNP hardware, which the test suite does not have; the wire format
//! is tested with the sample). Verification is tested with AMD-signed sample
//! data (`testdata/snp/`).
//!
//! # Why the node identity is not the chip ID
//!
//! CHIP_ID names the physical processor: every VM on a host reports the same
//! one, so a second VM the host launches on that chip (with the same image)
//! would be indistinguishable from the first and could take over its node
//! name, disk key and attestation. The identity is therefore
//! SHA-256(label || CHIP_ID || REPORT_ID): REPORT_ID is a random ID the
//! secure processor generates for each guest at launch, which the host can
//! neither choose nor copy into another guest's signed report. It is stable
//! for the life of the VM (re-attestation keeps it) and changes when the VM is
//! launched again, which makes a relaunched VM a new machine, as node
//! replacement assumes.

pub mod binding;
pub mod issuer;
pub mod launch;

use sev::certs::snp::{Certificate, Chain, Verifiable, ca};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use thiserror::Error;

use crate::evidence::SnpEvidence;

/// An SEV-SNP TCB version (the components the policy can set a minimum for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl Tcb {
    /// Whether every component is at least `min`'s.
    pub fn at_least(&self, min: &Tcb) -> bool {
        self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
    }
}

impl std::fmt::Display for Tcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bl={} tee={} snp={} ucode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// Pinned AMD roots and the minimum TCB.
#[derive(Debug, Clone)]
pub struct SnpTrust {
    pub ark_pem: Vec<u8>,
    pub ask_pem: Vec<u8>,
    pub minimum_tcb: Tcb,
}

/// Why SNP evidence was refused. [`SnpError::reason`] is the metric label.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnpError {
    #[error("malformed SNP evidence: {0}")]
    Malformed(String),
    #[error("certificate chain ARK → ASK → VCEK does not verify: {0}")]
    Chain(String),
    #[error("report signature does not verify with the VCEK")]
    Signature,
    #[error("reported TCB ({reported}) differs from the VCEK's TCB ({vcek})")]
    TcbMismatch { reported: Tcb, vcek: Tcb },
    #[error("reported TCB ({reported}) is below the policy minimum ({minimum})")]
    TcbTooLow { reported: Tcb, minimum: Tcb },
    #[error("REPORT_DATA is not bound to this connection (nonce mismatch): replayed or relayed")]
    Nonce,
    #[error(
        "the node image has no signed SEV-SNP launch values (measurement, guest policy, VMPL); add them to its measurement file and sign it again"
    )]
    NoLaunchPolicy,
    #[error("launch measurement {actual} differs from the image's signed {expected}")]
    Measurement { expected: String, actual: String },
    #[error(
        "guest policy {policy:#x} allows debugging: the hypervisor can read and change guest memory"
    )]
    DebugAllowed { policy: u64 },
    #[error(
        "guest policy {policy:#x} allows a migration agent, which the image's launch values do not"
    )]
    MigrationAgentAllowed { policy: u64 },
    #[error("guest policy {policy:#x} allows SMT, which the image's launch values do not")]
    SmtAllowed { policy: u64 },
    #[error(
        "report was requested at VMPL {actual}; the image's launch values require VMPL {expected}"
    )]
    Vmpl { expected: u32, actual: u32 },
    #[error("REPORT_DATA does not commit to this attestation key and connection")]
    AkBinding,
}

impl SnpError {
    pub fn reason(&self) -> &'static str {
        match self {
            SnpError::Malformed(_) => "malformed-evidence",
            SnpError::Chain(_) => "snp-chain",
            SnpError::Signature => "snp-signature",
            SnpError::TcbMismatch { .. } => "snp-tcb-mismatch",
            SnpError::TcbTooLow { .. } => "snp-tcb-too-low",
            SnpError::Nonce => "nonce-mismatch",
            SnpError::NoLaunchPolicy => "snp-no-launch-policy",
            SnpError::Measurement { .. } => "snp-measurement",
            SnpError::DebugAllowed { .. } => "snp-debug",
            SnpError::MigrationAgentAllowed { .. } => "snp-migration-agent",
            SnpError::SmtAllowed { .. } => "snp-smt",
            SnpError::Vmpl { .. } => "snp-vmpl",
            SnpError::AkBinding => "snp-ak-binding",
        }
    }
}

/// What a verified report establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReport {
    /// The launch measurement.
    pub measurement: [u8; 48],
    pub report_data: [u8; 64],
    pub reported_tcb: Tcb,
    pub chip_id: [u8; 64],
    /// The guest policy the VM was launched with (ABI spec, Table 9).
    pub guest_policy: u64,
    /// The VMPL the report was requested at.
    pub vmpl: u32,
    /// The random ID the secure processor gave this guest at launch.
    pub report_id: [u8; 32],
}

/// Domain separation of the SNP node identity.
const IDENTITY_LABEL: &[u8] = b"kubectl-confidential sev-snp identity v1";

impl VerifiedReport {
    /// The node identity: hex SHA-256(label || CHIP_ID || REPORT_ID), per VM,
    /// not per chip (see the module documentation for why).
    pub fn identity(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(IDENTITY_LABEL);
        h.update(self.chip_id);
        h.update(self.report_id);
        hex::encode(h.finalize())
    }
}

const OID_BL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE: &str = "1.3.6.1.4.1.3704.1.3.8";

/// The TCB a VCEK was issued for, from its extensions.
pub fn vcek_tcb(vcek_der: &[u8]) -> Result<Tcb, SnpError> {
    let (_, cert) = x509_parser::parse_x509_certificate(vcek_der)
        .map_err(|e| SnpError::Malformed(format!("VCEK: {e}")))?;
    let get = |oid: &str| -> Result<u8, SnpError> {
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)
            .ok_or_else(|| SnpError::Malformed(format!("VCEK lacks extension {oid}")))?;
        // A DER INTEGER (tag 2) of one or two bytes (a leading 0 for >127).
        match ext.value {
            [2, len, rest @ ..] if usize::from(*len) == rest.len() && !rest.is_empty() => {
                Ok(rest[rest.len() - 1])
            }
            _ => Err(SnpError::Malformed(format!(
                "VCEK extension {oid} is not a small INTEGER"
            ))),
        }
    };
    Ok(Tcb {
        bootloader: get(OID_BL)?,
        tee: get(OID_TEE)?,
        snp: get(OID_SNP)?,
        microcode: get(OID_UCODE)?,
    })
}

/// Offset of the signature in a report; the signed part precedes it.
const SIGNED_LEN: usize = 0x2a0;
/// ECDSA P-384 with SHA-384, the only report signature algorithm.
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// Verifies the report's ECDSA P-384 signature over its first 0x2a0 bytes
/// with ring (the `sev` crate's pure-Rust P-384 path is several times
/// slower). r and s are stored little-endian in 72-byte fields.
fn verify_report_signature(raw: &[u8], sig_algo: u32, vcek_sec1: &[u8]) -> Result<(), SnpError> {
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(SnpError::Malformed(format!(
            "signature algorithm {sig_algo}"
        )));
    }
    let field = |at: usize| -> Result<[u8; 48], SnpError> {
        let le = raw
            .get(at..at + 72)
            .ok_or_else(|| SnpError::Malformed("report too short".into()))?;
        if le[48..].iter().any(|b| *b != 0) {
            return Err(SnpError::Signature);
        }
        let mut be = [0u8; 48];
        for (i, b) in le[..48].iter().enumerate() {
            be[47 - i] = *b;
        }
        Ok(be)
    };
    let mut sig = field(SIGNED_LEN)?.to_vec();
    sig.extend_from_slice(&field(SIGNED_LEN + 72)?);
    let signed = raw
        .get(..SIGNED_LEN)
        .ok_or_else(|| SnpError::Malformed("report too short".into()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, vcek_sec1)
        .verify(signed, &sig)
        .map_err(|_| SnpError::Signature)
}

/// Verifies the report and chain without the nonce binding.
pub fn verify_report(evidence: &SnpEvidence, trust: &SnpTrust) -> Result<VerifiedReport, SnpError> {
    let report = AttestationReport::from_bytes(&evidence.report)
        .map_err(|e| SnpError::Malformed(format!("report: {e}")))?;
    let ark =
        Certificate::from_pem(&trust.ark_pem).map_err(|e| SnpError::Chain(format!("ARK: {e}")))?;
    let ask =
        Certificate::from_pem(&trust.ask_pem).map_err(|e| SnpError::Chain(format!("ASK: {e}")))?;
    let vcek =
        Certificate::from_der(&evidence.vcek).map_err(|e| SnpError::Chain(format!("VCEK: {e}")))?;
    let chain = Chain {
        ca: ca::Chain { ark, ask },
        vek: vcek,
    };
    let vcek_cert = (&chain)
        .verify()
        .map_err(|e| SnpError::Chain(e.to_string()))?;
    verify_report_signature(
        &evidence.report,
        report.sig_algo,
        vcek_cert.public_key_sec1(),
    )?;
    let reported = Tcb {
        bootloader: report.reported_tcb.bootloader,
        tee: report.reported_tcb.tee,
        snp: report.reported_tcb.snp,
        microcode: report.reported_tcb.microcode,
    };
    let vcek = vcek_tcb(&evidence.vcek)?;
    if reported != vcek {
        return Err(SnpError::TcbMismatch { reported, vcek });
    }
    if !reported.at_least(&trust.minimum_tcb) {
        return Err(SnpError::TcbTooLow {
            reported,
            minimum: trust.minimum_tcb,
        });
    }
    Ok(VerifiedReport {
        measurement: report.measurement,
        report_data: report.report_data,
        reported_tcb: reported,
        chip_id: report.chip_id,
        guest_policy: guest_policy(&evidence.report)?,
        vmpl: report.vmpl,
        report_id: report.report_id,
    })
}

/// Offset of the 64-bit little-endian guest policy in a report.
const POLICY_OFFSET: usize = 0x08;

/// The raw guest policy word (the `sev` crate's type hides reserved bits).
fn guest_policy(raw: &[u8]) -> Result<u64, SnpError> {
    raw.get(POLICY_OFFSET..POLICY_OFFSET + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| SnpError::Malformed("report too short".into()))
}

/// REPORT_DATA for an aTLS nonce: the nonce, then 32 zero bytes.
pub fn report_data_for(nonce: &[u8; 32]) -> [u8; 64] {
    let mut data = [0u8; 64];
    data[..32].copy_from_slice(nonce);
    data
}

/// Verifies SNP evidence bound to `nonce`.
pub fn verify_snp(
    evidence: &SnpEvidence,
    nonce: &[u8; 32],
    trust: &SnpTrust,
) -> Result<VerifiedReport, SnpError> {
    let verified = verify_report(evidence, trust)?;
    if verified.report_data != report_data_for(nonce) {
        return Err(SnpError::Nonce);
    }
    Ok(verified)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> (SnpEvidence, SnpTrust) {
        let hex_report = include_str!("../testdata/snp/report_milan.hex");
        let report = hex::decode(hex_report.trim()).expect("sample report is hex");
        (
            SnpEvidence {
                report,
                vcek: include_bytes!("../testdata/snp/vcek_milan.der").to_vec(),
            },
            SnpTrust {
                ark_pem: include_bytes!("../testdata/snp/ark_milan.pem").to_vec(),
                ask_pem: include_bytes!("../testdata/snp/ask_milan.pem").to_vec(),
                minimum_tcb: Tcb::default(),
            },
        )
    }

    #[test]
    fn amd_sample_report_verifies() {
        let (ev, trust) = sample();
        let v = verify_report(&ev, &trust).expect("AMD sample verifies");
        assert_eq!(v.reported_tcb, vcek_tcb(&ev.vcek).expect("tcb"));
    }

    #[test]
    fn bad_signature_is_refused() {
        let (mut ev, trust) = sample();
        // Flip a bit of the measurement: signed content changes.
        ev.report[0x90] ^= 0x01;
        assert_eq!(verify_report(&ev, &trust), Err(SnpError::Signature));
    }

    #[test]
    fn tcb_below_minimum_is_refused() {
        let (ev, mut trust) = sample();
        let actual = verify_report(&ev, &trust).expect("ok").reported_tcb;
        trust.minimum_tcb = Tcb {
            snp: actual.snp.saturating_add(1),
            ..actual
        };
        assert!(matches!(
            verify_report(&ev, &trust),
            Err(SnpError::TcbTooLow { .. })
        ));
    }

    #[test]
    fn vcek_from_another_root_is_refused() {
        let (ev, mut trust) = sample();
        // The ASK posing as the root: the chain must not verify.
        trust.ark_pem = include_bytes!("../testdata/snp/ask_milan.pem").to_vec();
        assert!(matches!(
            verify_report(&ev, &trust),
            Err(SnpError::Chain(_))
        ));
    }

    #[test]
    fn sample_fields_are_read_from_the_signed_report() {
        let (ev, trust) = sample();
        let v = verify_report(&ev, &trust).expect("AMD sample verifies");
        // SMT allowed (bit 16) and the reserved bit 17; no debug, no MA.
        assert_eq!(v.guest_policy, 0x30000);
        assert_eq!(v.vmpl, 0);
        assert_eq!(hex::encode(&v.report_id[..4]), "92b3b47d");
        assert_eq!(hex::encode(&v.measurement[..4]), "7a1e5c26");
    }

    #[test]
    fn identity_is_per_vm_not_per_chip() {
        let (ev, trust) = sample();
        let v = verify_report(&ev, &trust).expect("AMD sample verifies");
        // Another VM on the same chip: same CHIP_ID, its own REPORT_ID.
        let mut neighbour = v.clone();
        neighbour.report_id[0] ^= 1;
        assert_ne!(v.identity(), neighbour.identity());
        // The same VM on another chip is another machine too.
        let mut moved = v.clone();
        moved.chip_id[0] ^= 1;
        assert_ne!(v.identity(), moved.identity());
        assert_eq!(v.identity(), v.clone().identity());
        use sha2::Digest;
        assert_ne!(
            v.identity(),
            hex::encode(sha2::Sha256::digest(v.chip_id)),
            "not the chip ID alone"
        );
    }

    #[test]
    fn signed_identity_and_policy_fields_cannot_be_edited() {
        // CHIP_ID, REPORT_ID, guest policy and VMPL are all in the signed
        // part: editing any of them breaks the VCEK signature.
        let (ev, trust) = sample();
        for offset in [0x08, 0x0a, 0x30, 0x140, 0x1a0] {
            let mut bad = ev.clone();
            bad.report[offset] ^= 0x01;
            assert_eq!(
                verify_report(&bad, &trust),
                Err(SnpError::Signature),
                "offset {offset:#x}"
            );
        }
    }

    #[test]
    fn report_data_must_carry_the_nonce() {
        let (ev, trust) = sample();
        assert_eq!(verify_snp(&ev, &[9; 32], &trust), Err(SnpError::Nonce));
    }
}
