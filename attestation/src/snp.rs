//! SEV-SNP evidence verification (pure Rust, `sev` crate with `crypto_nossl`):
//! ARK → ASK → VCEK chain against pinned AMD roots, the report signature by
//! the VCEK, the reported TCB against the TCB the VCEK was issued for (its
//! X.509 extensions) and against the policy minimum, and the REPORT_DATA
//! binding to the aTLS nonce.
//!
//! The issuer (reading `/dev/sev-guest`) is behind the `snp-issuer` feature
//! and needs SEV-SNP hardware; it is not exercised here. Verification is tested
//! with AMD-signed sample data (`testdata/snp/`).

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
    })
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

/// The SEV-SNP issuer (feature `snp-issuer`): asks the AMD secure processor
/// for a report whose REPORT_DATA carries the aTLS nonce, with the VCEK from
/// the host's certificate table (or one the caller fetched from AMD's KDS).
/// It needs `/dev/sev-guest` in an SEV-SNP guest and is not exercised by the
/// test suite, which has no such hardware.
#[cfg(feature = "snp-issuer")]
pub mod issuer {
    use sev::firmware::guest::Firmware;
    use sev::firmware::host::CertType;

    use super::report_data_for;
    use crate::evidence::SnpEvidence;

    #[derive(Debug, thiserror::Error)]
    pub enum SnpIssuerError {
        #[error("opening /dev/sev-guest: {0}")]
        Open(#[from] std::io::Error),
        #[error("SNP_GET_EXT_REPORT: {0}")]
        Report(String),
        #[error("the host provides no VCEK and none was given")]
        NoVcek,
    }

    /// A report bound to `nonce` (VMPL 0), blocking.
    pub fn report_blocking(
        nonce: &[u8; 32],
        vcek_der: Option<Vec<u8>>,
    ) -> Result<SnpEvidence, SnpIssuerError> {
        let mut fw = Firmware::open()?;
        let (report, certs) = fw
            .get_ext_report(Some(1), Some(report_data_for(nonce)), Some(0))
            .map_err(|e| SnpIssuerError::Report(e.to_string()))?;
        let vcek = certs
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.cert_type == CertType::VCEK)
            .map(|c| c.data)
            .or(vcek_der)
            .ok_or(SnpIssuerError::NoVcek)?;
        Ok(SnpEvidence { report, vcek })
    }
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
    fn report_data_must_carry_the_nonce() {
        let (ev, trust) = sample();
        assert_eq!(verify_snp(&ev, &[9; 32], &trust), Err(SnpError::Nonce));
    }
}
