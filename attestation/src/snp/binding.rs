//! A vTPM attestation key bound to an SEV-SNP report through REPORT_DATA.
//!
//! In an SEV-SNP VM whose vTPM runs inside the confidential boundary (an SVSM
//! or paravisor), no manufacturer EK certificate exists; the vTPM is trusted
//! because the SNP report says which guest it belongs to. The guest asks the
//! secure processor for a report whose REPORT_DATA is
//! `nonce || SHA-256(label || TPMT_PUBLIC of the AK)`: the first half binds it
//! to this aTLS connection (no replay or relay), the second commits to exactly
//! one AK public area, including its `fixedTPM | restricted | sign`
//! attributes. A quote signed by that AK on the same connection is then as
//! trustworthy as the report. The label keeps such a report from being read
//! as a plain one (whose second half is zero) and the other way round.

use sha2::{Digest, Sha256};

use super::{SnpError, SnpTrust, VerifiedReport, verify_report};
use crate::evidence::SnpEvidence;

/// Domain separation of the AK commitment.
const AK_LABEL: &[u8] = b"kubectl-confidential sev-snp vtpm-ak v1";

/// REPORT_DATA committing to `ak_public` (marshalled `TPMT_PUBLIC`) on the
/// connection whose aTLS nonce is `nonce`.
pub fn ak_report_data(nonce: &[u8; 32], ak_public: &[u8]) -> [u8; 64] {
    let mut data = [0u8; 64];
    data[..32].copy_from_slice(nonce);
    let mut h = Sha256::new();
    h.update(AK_LABEL);
    h.update(ak_public);
    data[32..].copy_from_slice(&h.finalize());
    data
}

/// Checks that a verified report commits to `ak_public` on this connection.
pub fn check_ak_binding(
    report: &VerifiedReport,
    nonce: &[u8; 32],
    ak_public: &[u8],
) -> Result<(), SnpError> {
    if report.report_data[..32] != nonce[..] {
        return Err(SnpError::Nonce);
    }
    if report.report_data != ak_report_data(nonce, ak_public) {
        return Err(SnpError::AkBinding);
    }
    Ok(())
}

/// Verifies the report and chain, then its commitment to `ak_public` on the
/// connection of `nonce`. The caller still verifies the quote with that AK
/// and compares the launch values ([`super::launch::check_launch`]).
pub fn verify_ak_bound_report(
    evidence: &SnpEvidence,
    nonce: &[u8; 32],
    ak_public: &[u8],
    trust: &SnpTrust,
) -> Result<VerifiedReport, SnpError> {
    let report = verify_report(evidence, trust)?;
    check_ak_binding(&report, nonce, ak_public)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::tests::sample;
    use crate::snp::{report_data_for, verify_snp};

    /// The AK public area of the recorded swtpm quote.
    fn ak_public() -> Vec<u8> {
        let ev: crate::evidence::TpmEvidence =
            serde_json::from_str(include_str!("../../testdata/tpm/quote.json")).expect("fixture");
        ev.ak_public
    }

    const NONCE: [u8; 32] = [0x42; 32];

    /// The verified sample as if its REPORT_DATA had been `data`: the
    /// binding is checked after the signature, so it is tested on a verified
    /// report (changing REPORT_DATA in the raw report breaks the signature,
    /// tested below).
    fn reported(data: [u8; 64]) -> VerifiedReport {
        let (ev, trust) = sample();
        let mut report = verify_report(&ev, &trust).expect("AMD sample verifies");
        report.report_data = data;
        report
    }

    #[test]
    fn a_report_committing_to_the_ak_binds_it() {
        let ak = ak_public();
        let report = reported(ak_report_data(&NONCE, &ak));
        assert_eq!(check_ak_binding(&report, &NONCE, &ak), Ok(()));
    }

    #[test]
    fn another_ak_or_connection_is_refused() {
        let ak = ak_public();
        let report = reported(ak_report_data(&NONCE, &ak));
        // A software AK with the attributes cleared, or any other key.
        let mut other = ak.clone();
        other[5] ^= 0x01;
        assert_eq!(
            check_ak_binding(&report, &NONCE, &other),
            Err(SnpError::AkBinding)
        );
        // The same commitment relayed to another connection.
        assert_eq!(
            check_ak_binding(&report, &[0x43; 32], &ak),
            Err(SnpError::Nonce)
        );
        // A plain report (nonce, then zeros) commits to no AK, and an AK
        // binding is not a plain report.
        let plain = reported(report_data_for(&NONCE));
        assert_eq!(
            check_ak_binding(&plain, &NONCE, &ak),
            Err(SnpError::AkBinding)
        );
        assert_ne!(report.report_data, report_data_for(&NONCE));
    }

    #[test]
    fn the_sample_commits_to_no_ak_and_its_report_data_is_signed() {
        let (ev, trust) = sample();
        let nonce: [u8; 32] = verify_report(&ev, &trust).expect("verifies").report_data[..32]
            .try_into()
            .expect("32 bytes");
        assert_eq!(
            verify_ak_bound_report(&ev, &nonce, &ak_public(), &trust),
            Err(SnpError::AkBinding)
        );
        assert_eq!(verify_snp(&ev, &nonce, &trust), Err(SnpError::Nonce));
        // Writing a commitment into the raw report breaks the signature.
        let mut forged = ev.clone();
        forged.report[0x50..0x90].copy_from_slice(&ak_report_data(&nonce, &ak_public()));
        assert_eq!(
            verify_ak_bound_report(&forged, &nonce, &ak_public(), &trust),
            Err(SnpError::Signature)
        );
    }
}
