//! The SEV-SNP issuer: asks the AMD secure processor (`/dev/sev-guest`,
//! `SNP_GET_EXT_REPORT`) for a report with the REPORT_DATA the protocol needs
//! (the aTLS nonce, or a vTPM AK commitment), and packs it with the VCEK from
//! the host's certificate table (or one the caller fetched from AMD's KDS)
//! into [`SnpEvidence`].
//!
//! The device call needs SEV-SNP hardware and sits behind the `snp-issuer`
//! feature (the bootstrapper enables it, so the normal build compiles it).
//! Turning the secure processor's answer into evidence is the pure
//! [`evidence_from_ext_report`], compiled always and tested against the
//! recorded AMD sample and a certificate table in the host's GUID format.

use sev::firmware::guest::AttestationReport;
use sev::firmware::host::{CertTableEntry, CertType};
use sev::parser::ByteParser;

use crate::evidence::SnpEvidence;

/// Size of an attestation report (ABI spec, Table 23).
pub const REPORT_LEN: usize = 0x4a0;

#[derive(Debug, thiserror::Error)]
pub enum SnpIssuerError {
    #[error("opening /dev/sev-guest (is this an SEV-SNP guest?): {0}")]
    Open(#[from] std::io::Error),
    #[error("SNP_GET_EXT_REPORT: {0}")]
    Report(String),
    #[error("the secure processor answered a report of {0} bytes, not {REPORT_LEN}")]
    ReportLength(usize),
    #[error("the secure processor's report does not parse: {0}")]
    Malformed(String),
    #[error("the report's REPORT_DATA is not the one requested")]
    ReportData,
    #[error(
        "the host's certificate table has no VCEK and none was given (fetch it from AMD's KDS)"
    )]
    NoVcek,
}

/// Builds evidence from the secure processor's answer: checks the report is
/// one report carrying `requested` as REPORT_DATA, and takes the VCEK from the
/// host's certificate table, else `vcek_fallback`.
pub fn evidence_from_ext_report(
    report: Vec<u8>,
    certificates: Option<Vec<CertTableEntry>>,
    requested: &[u8; 64],
    vcek_fallback: Option<Vec<u8>>,
) -> Result<SnpEvidence, SnpIssuerError> {
    if report.len() != REPORT_LEN {
        return Err(SnpIssuerError::ReportLength(report.len()));
    }
    let parsed = AttestationReport::from_bytes(&report)
        .map_err(|e| SnpIssuerError::Malformed(e.to_string()))?;
    if parsed.report_data != *requested {
        return Err(SnpIssuerError::ReportData);
    }
    let vcek = certificates
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.cert_type == CertType::VCEK)
        .map(|c| c.data().to_vec())
        .or(vcek_fallback)
        .ok_or(SnpIssuerError::NoVcek)?;
    Ok(SnpEvidence { report, vcek })
}

/// A report carrying `report_data`, requested from `vmpl`, blocking.
#[cfg(feature = "snp-issuer")]
pub fn issue_report(
    report_data: &[u8; 64],
    vmpl: u32,
    vcek_der: Option<Vec<u8>>,
) -> Result<SnpEvidence, SnpIssuerError> {
    let mut firmware = sev::firmware::guest::Firmware::open()?;
    let (report, certificates) = firmware
        .get_ext_report(Some(1), Some(*report_data), Some(vmpl))
        .map_err(|e| SnpIssuerError::Report(e.to_string()))?;
    evidence_from_ext_report(report, certificates, report_data, vcek_der)
}

/// A report bound to the aTLS `nonce` (VMPL 0), blocking.
#[cfg(feature = "snp-issuer")]
pub fn report_blocking(
    nonce: &[u8; 32],
    vcek_der: Option<Vec<u8>>,
) -> Result<SnpEvidence, SnpIssuerError> {
    issue_report(&super::report_data_for(nonce), 0, vcek_der)
}

/// A report committing to a vTPM AK on the connection of `nonce` (VMPL 0),
/// blocking; see [`super::binding`].
#[cfg(feature = "snp-issuer")]
pub fn ak_report_blocking(
    nonce: &[u8; 32],
    ak_public: &[u8],
    vcek_der: Option<Vec<u8>>,
) -> Result<SnpEvidence, SnpIssuerError> {
    issue_report(
        &super::binding::ak_report_data(nonce, ak_public),
        0,
        vcek_der,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{Evidence, EvidenceEnvelope};
    use crate::snp::tests::sample;
    use crate::snp::verify_report;

    /// The host's certificate table as the kernel hands it to the guest:
    /// GUID-keyed entries, here ARK, ASK and the sample's VCEK.
    fn host_table(with_vcek: bool) -> Vec<CertTableEntry> {
        let (ev, trust) = sample();
        let mut entries = vec![
            CertTableEntry::new(CertType::ARK, trust.ark_pem.clone()),
            CertTableEntry::new(CertType::ASK, trust.ask_pem.clone()),
        ];
        if with_vcek {
            entries.push(CertTableEntry::new(CertType::VCEK, ev.vcek.clone()));
        }
        let mut bytes = CertTableEntry::cert_table_to_vec_bytes(&entries).expect("table encodes");
        CertTableEntry::vec_bytes_to_cert_table(&mut bytes).expect("table parses")
    }

    fn requested() -> [u8; 64] {
        let (ev, trust) = sample();
        verify_report(&ev, &trust).expect("verifies").report_data
    }

    #[test]
    fn the_secure_processors_answer_becomes_verifiable_evidence() {
        let (ev, trust) = sample();
        let built = evidence_from_ext_report(
            ev.report.clone(),
            Some(host_table(true)),
            &requested(),
            None,
        )
        .expect("evidence");
        assert_eq!(built, ev);
        // Through the JSON envelope the bootstrapper sends, unchanged.
        let json = serde_json::to_string(&EvidenceEnvelope::new(Evidence::SevSnp(built)))
            .expect("serialises");
        assert!(json.contains("\"kind\":\"sev-snp\""), "{json}");
        let back: EvidenceEnvelope = serde_json::from_str(&json).expect("parses");
        let Evidence::SevSnp(back) = back.evidence else {
            panic!("kind changed");
        };
        verify_report(&back, &trust).expect("the gate verifies what the issuer sent");
    }

    #[test]
    fn the_vcek_comes_from_the_table_else_the_fallback() {
        let (ev, _) = sample();
        let built = evidence_from_ext_report(
            ev.report.clone(),
            Some(host_table(false)),
            &requested(),
            Some(ev.vcek.clone()),
        )
        .expect("fallback VCEK");
        assert_eq!(built.vcek, ev.vcek);
        assert!(matches!(
            evidence_from_ext_report(
                ev.report.clone(),
                Some(host_table(false)),
                &requested(),
                None
            ),
            Err(SnpIssuerError::NoVcek)
        ));
        assert!(matches!(
            evidence_from_ext_report(ev.report.clone(), None, &requested(), None),
            Err(SnpIssuerError::NoVcek)
        ));
    }

    #[test]
    fn a_wrong_answer_is_refused() {
        let (ev, _) = sample();
        let mut other = requested();
        other[0] ^= 1;
        assert!(matches!(
            evidence_from_ext_report(ev.report.clone(), Some(host_table(true)), &other, None),
            Err(SnpIssuerError::ReportData)
        ));
        let mut short = ev.report.clone();
        short.truncate(REPORT_LEN - 1);
        assert!(matches!(
            evidence_from_ext_report(short, Some(host_table(true)), &requested(), None),
            Err(SnpIssuerError::ReportLength(_))
        ));
    }
}
