//! Where this machine's evidence comes from: a TPM 2.0 quote (vTPM or swtpm)
//! or an AMD SEV-SNP report, each bound to the aTLS channel by the nonce the
//! caller passes. The join client and the `/v1/attest` server ask this module
//! and do not care which kind it is.
//!
//! The SNP issuer needs `/dev/sev-guest` inside an SEV-SNP guest; this machine
//! has no SNP hardware, so its wire format is tested against the AMD-signed
//! sample report in `attestation/testdata/snp/` instead of a live report.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope};
use confidential_attestation::snp::issuer::report_blocking;
use confidential_attestation::tpm::Challenge;
use confidential_attestation::tpm::issuer::{TpmIssuer, extend_pcr_blocking};

use crate::args::EvidenceConfig;
use crate::secret_files::restrict_existing;

/// An opened evidence source.
pub enum EvidenceSource {
    Tpm {
        issuer: Arc<TpmIssuer>,
        tcti: String,
        pcrs: Vec<u32>,
        cluster_id_pcr: u32,
    },
    Snp {
        /// DER VCEK to send when the host's certificate table has none.
        vcek: Option<Vec<u8>>,
    },
}

impl EvidenceSource {
    /// Opens the TPM (loading or creating the AK kept at the AK state path,
    /// mode 0600) or reads the SNP VCEK file.
    pub async fn open(config: &EvidenceConfig) -> Result<Self> {
        match config {
            EvidenceConfig::Tpm {
                tcti,
                pcrs,
                ak_state,
                cluster_id_pcr,
            } => {
                restrict_existing(ak_state)?;
                let issuer = TpmIssuer::open_persistent(tcti, ak_state)
                    .await
                    .with_context(|| format!("opening the TPM at {tcti}"))?;
                // A freshly created AK state file gets the secret mode too.
                restrict_existing(ak_state)?;
                Ok(Self::Tpm {
                    issuer,
                    tcti: tcti.clone(),
                    pcrs: quoted_pcrs(pcrs, *cluster_id_pcr),
                    cluster_id_pcr: *cluster_id_pcr,
                })
            }
            EvidenceConfig::Snp { vcek } => Ok(Self::Snp {
                vcek: vcek.as_deref().map(read_vcek).transpose()?,
            }),
        }
    }

    /// Evidence bound to `nonce`, in the versioned envelope.
    pub async fn evidence(&self, nonce: [u8; 32]) -> Result<EvidenceEnvelope> {
        let evidence = match self {
            Self::Tpm { issuer, pcrs, .. } => Evidence::Tpm(
                issuer
                    .quote(nonce, pcrs.clone())
                    .await
                    .context("quoting the TPM")?,
            ),
            Self::Snp { vcek } => {
                let vcek = vcek.clone();
                Evidence::SevSnp(
                    tokio::task::spawn_blocking(move || report_blocking(&nonce, vcek))
                        .await
                        .context("SNP report task")?
                        .context("asking /dev/sev-guest for an SNP report")?,
                )
            }
        };
        Ok(EvidenceEnvelope::new(evidence))
    }

    /// Answers the gate's credential challenge (TPM only: SNP reports are
    /// signed by the chip key and need no activation).
    pub async fn activate(&self, challenge: Challenge) -> Result<Vec<u8>> {
        match self {
            Self::Tpm { issuer, .. } => issuer
                .activate_credential(challenge)
                .await
                .context("activating the gate's credential challenge"),
            Self::Snp { .. } => {
                bail!(
                    "the gate asked for TPM credential activation, but this node sent SNP evidence"
                )
            }
        }
    }

    /// Extends the cluster ID into the configured PCR, so verifiers can tell
    /// which cluster this node joined (TPM only).
    pub async fn record_cluster_id(&self, cluster_id: [u8; 32]) -> Result<()> {
        match self {
            Self::Tpm {
                tcti,
                cluster_id_pcr,
                ..
            } => {
                let (tcti, pcr) = (tcti.clone(), *cluster_id_pcr);
                tokio::task::spawn_blocking(move || extend_pcr_blocking(&tcti, pcr, &cluster_id))
                    .await
                    .context("PCR extend task")?
                    .with_context(|| {
                        format!("extending PCR {cluster_id_pcr} with the cluster ID")
                    })?;
                tracing::info!(
                    pcr = *cluster_id_pcr,
                    "extended the cluster ID into the TPM"
                );
            }
            Self::Snp { .. } => {
                tracing::info!("SNP evidence: no TPM PCR to extend with the cluster ID");
            }
        }
        Ok(())
    }
}

/// The PCRs every quote covers: `--pcrs` and the cluster-ID PCR, so a
/// verifier (`kubectl confidential verify`, the gate) always sees which
/// cluster the node joined, whatever the policy pins. Sorted, once each.
fn quoted_pcrs(pcrs: &[u32], cluster_id_pcr: u32) -> Vec<u32> {
    let mut all: Vec<u32> = pcrs.iter().copied().chain([cluster_id_pcr]).collect();
    all.sort_unstable();
    all.dedup();
    all
}

fn read_vcek(path: &Path) -> Result<Vec<u8>> {
    let der =
        std::fs::read(path).with_context(|| format!("reading --snp-vcek {}", path.display()))?;
    x509_parser::parse_x509_certificate(&der).with_context(|| {
        format!(
            "--snp-vcek {} is not a DER certificate (AMD's KDS serves the VCEK as DER)",
            path.display()
        )
    })?;
    Ok(der)
}

#[cfg(test)]
mod tests {
    use confidential_attestation::evidence::SnpEvidence;
    use confidential_attestation::measurements::Measurements;
    use confidential_attestation::protocol::JoinRequest;
    use confidential_attestation::snp::{SnpError, SnpTrust, Tcb, verify_report};
    use confidential_attestation::verify::{Refusal, TrustPolicy, verify_evidence};

    use super::quoted_pcrs;
    use crate::join::join_request;

    #[test]
    fn every_quote_covers_the_cluster_id_pcr() {
        assert_eq!(quoted_pcrs(&[0, 4, 13], 15), [0, 4, 13, 15]);
        assert_eq!(quoted_pcrs(&[15, 4], 15), [4, 15], "once, sorted");
        assert_eq!(quoted_pcrs(&[], 23), [23]);
    }

    const SNP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../attestation/testdata/snp");

    fn sample() -> SnpEvidence {
        let read = |f: &str| std::fs::read(format!("{SNP}/{f}")).expect("sample file");
        SnpEvidence {
            report: hex::decode(
                String::from_utf8(read("report_milan.hex"))
                    .expect("utf8")
                    .trim(),
            )
            .expect("hex"),
            vcek: read("vcek_milan.der"),
        }
    }

    fn trust() -> TrustPolicy {
        let read = |f: &str| std::fs::read(format!("{SNP}/{f}")).expect("sample file");
        TrustPolicy {
            evidence_kinds: vec![confidential_attestation::evidence::EvidenceKind::SevSnp],
            ek_cas: Vec::new(),
            snp: Some(SnpTrust {
                ark_pem: read("ark_milan.pem"),
                ask_pem: read("ask_milan.pem"),
                minimum_tcb: Tcb::default(),
            }),
        }
    }

    /// What the bootstrapper sends with SNP evidence, read back as the gate
    /// reads it: the AMD-signed sample report passes chain, signature and
    /// TCB checks; only the channel binding fails, as it must for a report
    /// that was not made for this connection.
    #[test]
    fn snp_join_request_parses_and_verifies_with_the_gate_types() {
        let config = crate::join::tests::config();
        let envelope = confidential_attestation::EvidenceEnvelope::new(
            confidential_attestation::Evidence::SevSnp(sample()),
        );
        let wire = serde_json::to_vec(&join_request(&config, envelope)).expect("serialises");
        let parsed: JoinRequest = serde_json::from_slice(&wire).expect("the gate parses it");
        assert_eq!(parsed.node_name, config.node_name);
        let confidential_attestation::Evidence::SevSnp(snp) = &parsed.evidence.evidence else {
            panic!(
                "SNP evidence expected, got {:?}",
                parsed.evidence.evidence.kind()
            );
        };
        assert_eq!(snp, &sample(), "report and VCEK bytes arrive unchanged");
        let report = verify_report(snp, &trust().snp.expect("trust")).expect("AMD sample verifies");

        let nonce: [u8; 32] = report.report_data[..32].try_into().expect("32 bytes");
        let err = verify_evidence(&parsed.evidence, &nonce, &trust(), &Measurements::default())
            .expect_err("the sample's REPORT_DATA is not zero-padded to our format");
        assert_eq!(err, Refusal::Snp(SnpError::Nonce));

        // Flipped report bytes on the wire break the signature.
        let mut tampered = sample();
        tampered.report[0x90] ^= 1;
        let envelope = confidential_attestation::EvidenceEnvelope::new(
            confidential_attestation::Evidence::SevSnp(tampered),
        );
        let wire = serde_json::to_vec(&join_request(&config, envelope)).expect("serialises");
        let parsed: JoinRequest = serde_json::from_slice(&wire).expect("parses");
        let err = verify_evidence(&parsed.evidence, &nonce, &trust(), &Measurements::default())
            .expect_err("tampered");
        assert_eq!(err, Refusal::Snp(SnpError::Signature));
    }

    #[test]
    fn vcek_file_must_be_a_der_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vcek.der");
        std::fs::write(&path, b"not a certificate").expect("write");
        let err = super::read_vcek(&path).expect_err("refused");
        assert!(
            format!("{err:#}").contains("is not a DER certificate"),
            "{err:#}"
        );
        let err = super::read_vcek(&dir.path().join("missing")).expect_err("missing");
        assert!(format!("{err:#}").contains("reading --snp-vcek"), "{err:#}");
        super::read_vcek(std::path::Path::new(&format!("{SNP}/vcek_milan.der")))
            .expect("AMD's VCEK parses");
    }
}
