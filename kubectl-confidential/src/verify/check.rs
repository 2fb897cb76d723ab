//! The verdict on one node, as a pure function of what the node answered on
//! our aTLS connection, the nonce of *our* end of that connection, and the
//! local trust inputs. No I/O: every refusal is testable on recorded data.
//!
//! What TPM evidence on `/v1/attest` proves (also in `verify --help` and the
//! README): the quote is fresh and was made for this very TLS connection
//! (the nonce is our exporter; a relay or replay fails); it is signed by the
//! AK the node presents; the PCR values are the ones signed; the EK
//! certificate chains to the EK CA given with `--ek-ca`. It does NOT prove by
//! itself that the AK lives in the TPM of that EK: that takes credential
//! activation, which the gate performs at join and records as the AK
//! fingerprint in the node's NodeAttestation. `verify` therefore requires
//! the AK to equal that record; the link AK → certified TPM rests on the
//! gate's join-time check, while the measurements, the cluster ID and the
//! channel binding are checked here against local input only.

use std::collections::BTreeMap;

use confidential_attestation::evidence::Evidence;
use confidential_attestation::protocol::AttestResponse;
use confidential_attestation::tpm::{VerifiedQuote, verify_quote};
use serde::Serialize;

use super::trust::{Trust, TrustedFile};

/// What one node gave us: its answer on our connection (or why there was
/// none) and the AK the gate recorded for it, if any.
#[derive(Debug)]
pub struct NodeAnswer {
    pub node: String,
    pub endpoint: String,
    /// The node's answer and the nonce of our end of that connection.
    pub answer: Result<(AttestResponse, [u8; 32]), String>,
    pub recorded_ak: Option<String>,
}

/// Final judgement on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Trusted,
    Untrusted,
}

/// One PCR: expected vs actual.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PcrCheck {
    pub pcr: u8,
    pub expected: String,
    /// Empty when the node did not quote this PCR.
    pub actual: String,
    /// `false`: a mismatch only warns (warnOnly in the measurement file).
    pub enforced: bool,
    pub matches: bool,
}

/// How the AK relates to the gate's join-time record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AkRecord {
    /// The AK is the one the gate activated at join.
    Matches,
    /// The gate recorded another AK for this node: a different machine.
    Differs,
    /// No NodeAttestation names this node.
    Missing,
}

/// The report on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    pub endpoint: String,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence_kind: Option<String>,
    /// The trusted image whose measurements were compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub pcrs: Vec<PcrCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id_pcr: Option<PcrCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ak_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ak_record: Option<AkRecord>,
    /// Why the node is untrusted (empty when trusted).
    pub problems: Vec<String>,
    /// warnOnly mismatches.
    pub warnings: Vec<String>,
}

impl NodeReport {
    fn failed(node: &str, endpoint: &str, problem: String) -> Self {
        Self {
            node: node.to_owned(),
            endpoint: endpoint.to_owned(),
            verdict: Verdict::Untrusted,
            evidence_kind: None,
            image: None,
            pcrs: Vec::new(),
            cluster_id_pcr: None,
            ak_fingerprint: None,
            ak_record: None,
            problems: vec![problem],
            warnings: Vec::new(),
        }
    }
}

/// Compares `measured` with one trusted file.
fn compare(file: &TrustedFile, measured: &BTreeMap<u32, [u8; 32]>) -> Vec<PcrCheck> {
    file.file
        .measurements
        .iter()
        .map(|(pcr, expected)| {
            let actual = measured.get(&u32::from(pcr));
            PcrCheck {
                pcr,
                expected: hex::encode(expected.expected),
                actual: actual.map(hex::encode).unwrap_or_default(),
                enforced: !expected.warn_only,
                matches: actual == Some(&expected.expected),
            }
        })
        .collect()
}

fn enforced_failures(checks: &[PcrCheck]) -> usize {
    checks.iter().filter(|c| c.enforced && !c.matches).count()
}

/// Judges one node: [`check_evidence`], then the AK against the gate's
/// join-time record.
pub fn check_node(answer: &NodeAnswer, trust: &Trust) -> NodeReport {
    let (mut report, quote) = check_evidence(&answer.node, &answer.endpoint, &answer.answer, trust);
    let Some(quote) = quote else {
        return report;
    };
    report.ak_record = Some(match &answer.recorded_ak {
        Some(recorded) if *recorded == quote.ak_fingerprint => AkRecord::Matches,
        Some(recorded) => {
            report.problems.push(format!(
                "the node's attestation key {} is not the one the gate activated at join ({recorded}): \
                 another machine answers for this node",
                quote.ak_fingerprint
            ));
            AkRecord::Differs
        }
        None => {
            report.problems.push(
                "no NodeAttestation records this node's attestation key, so nothing ties it to a \
                 certified TPM (the gate never admitted it)"
                    .into(),
            );
            AkRecord::Missing
        }
    });
    report.conclude();
    report
}

impl NodeReport {
    /// Trusted exactly when no problem was found.
    pub fn conclude(&mut self) {
        self.verdict = if self.problems.is_empty() {
            Verdict::Trusted
        } else {
            Verdict::Untrusted
        };
    }
}

/// What `verify` and `recover` check alike on a node's answer to *our*
/// connection (`nonce` is our end's): the name it answers as, the quote
/// (signature, nonce, EK chain to `--ek-ca`), the PCRs against the trusted
/// measurement files, the cluster-ID PCR. Returns the report (verdict still
/// Untrusted: the caller concludes after its own AK check) and the verified
/// quote when the evidence itself verified.
pub fn check_evidence(
    node: &str,
    endpoint: &str,
    answer: &Result<(AttestResponse, [u8; 32]), String>,
    trust: &Trust,
) -> (NodeReport, Option<VerifiedQuote>) {
    let (response, nonce) = match answer {
        Ok(ok) => ok,
        Err(e) => {
            return (
                NodeReport::failed(node, endpoint, format!("no attestation: {e}")),
                None,
            );
        }
    };
    let kind = response.evidence.evidence.kind().name().to_owned();
    let tpm = match &response.evidence.evidence {
        Evidence::Tpm(tpm) => tpm,
        Evidence::SevSnp(_) => {
            let mut report = NodeReport::failed(
                node,
                endpoint,
                "the node sent SEV-SNP evidence; verify checks TPM evidence only in this version"
                    .into(),
            );
            report.evidence_kind = Some(kind);
            return (report, None);
        }
    };
    let mut report = NodeReport::failed(node, endpoint, String::new());
    report.problems.clear();
    report.evidence_kind = Some(kind);
    report.ak_fingerprint = None;
    if response.node_name != node {
        report.problems.push(format!(
            "the machine at {endpoint} answered as node {:?}, not {node:?}",
            response.node_name
        ));
    }
    let quote = match verify_quote(tpm, nonce, &trust.ek_cas) {
        Ok(quote) => quote,
        Err(e) => {
            report
                .problems
                .push(format!("evidence refused ({}): {e}", e.reason()));
            return (report, None);
        }
    };
    report.ak_fingerprint = Some(quote.ak_fingerprint.clone());
    // The trusted image that fits best: all enforced PCRs match, else the
    // one with the fewest enforced mismatches (reported).
    let best = trust
        .files
        .iter()
        .map(|file| (file, compare(file, &quote.pcrs)))
        .min_by_key(|(_, checks)| enforced_failures(checks));
    match best {
        Some((file, checks)) => {
            report.image = Some(file.file.image.clone());
            for check in checks.iter().filter(|c| !c.matches) {
                let what = if check.actual.is_empty() {
                    format!("PCR {} was not quoted", check.pcr)
                } else {
                    format!(
                        "PCR {} is {}, expected {}",
                        check.pcr, check.actual, check.expected
                    )
                };
                if check.enforced {
                    report.problems.push(format!(
                        "{what}: the node did not boot a trusted image ({} of {})",
                        file.file.image,
                        file.path.display()
                    ));
                } else {
                    report.warnings.push(format!("{what} (warnOnly)"));
                }
            }
            report.pcrs = checks;
        }
        None => report
            .problems
            .push("no trusted measurement file to compare with".into()),
    }
    let expected_cluster = trust.expected_cluster_pcr();
    let actual_cluster = quote.pcrs.get(&u32::from(trust.cluster_id_pcr));
    let cluster_check = PcrCheck {
        pcr: trust.cluster_id_pcr,
        expected: hex::encode(expected_cluster),
        actual: actual_cluster.map(hex::encode).unwrap_or_default(),
        enforced: true,
        matches: actual_cluster == Some(&expected_cluster),
    };
    if !cluster_check.matches {
        report.problems.push(match actual_cluster {
            None => format!(
                "the cluster-ID PCR {} was not quoted; the node cannot show which cluster it joined",
                trust.cluster_id_pcr
            ),
            Some(_) => format!(
                "the cluster-ID PCR {} does not hold this cluster's ID: the node joined another cluster \
                 (or none)",
                trust.cluster_id_pcr
            ),
        });
    }
    report.cluster_id_pcr = Some(cluster_check);
    (report, Some(quote))
}

#[cfg(test)]
mod tests {
    //! On a recorded swtpm quote (nonce `[0x11; 32]`, PCRs 0, 4, 7). The
    //! passing path needs a cluster-ID PCR and is proven on real nodes in
    //! `tests/verify.rs`; here every refusal is checked on its own.
    use super::*;
    use confidential_attestation::evidence::{EvidenceEnvelope, TpmEvidence};
    use confidential_attestation::measurements::{
        Expected, MeasurementFile, Measurements, parse_pcr_value,
    };
    use confidential_attestation::tpm::parse_certificates;

    const NONCE: [u8; 32] = [0x11; 32];

    fn evidence() -> TpmEvidence {
        serde_json::from_str(include_str!("../../../attestation/testdata/tpm/quote.json"))
            .expect("fixture")
    }

    fn pcr4() -> [u8; 32] {
        parse_pcr_value(
            4,
            include_str!("../../../attestation/testdata/tpm/image-pcr4.hex").trim(),
        )
        .expect("hex")
    }

    fn trust(pcr4_value: [u8; 32], warn_only: bool) -> Trust {
        let file = MeasurementFile {
            image: "node:v1".into(),
            measurements: Measurements::new(BTreeMap::from([(
                4,
                Expected {
                    expected: pcr4_value,
                    warn_only,
                },
            )]))
            .expect("valid"),
        };
        Trust {
            files: vec![TrustedFile {
                path: "m.json".into(),
                file,
            }],
            cluster_id: [7; 32],
            cluster_id_pcr: 7,
            ek_cas: parse_certificates(include_str!("../../../attestation/testdata/tpm/ek-ca.pem"))
                .expect("CA"),
        }
    }

    fn answer(nonce: [u8; 32], name: &str, recorded_ak: Option<String>) -> NodeAnswer {
        NodeAnswer {
            node: "node-a".into(),
            endpoint: "127.0.0.1:1".into(),
            answer: Ok((
                AttestResponse {
                    node_name: name.into(),
                    evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence())),
                },
                nonce,
            )),
            recorded_ak,
        }
    }

    /// The fixture AK's fingerprint, as the verifier computes it.
    fn fingerprint() -> String {
        verify_quote(&evidence(), &NONCE, &trust(pcr4(), false).ek_cas)
            .expect("fixture verifies")
            .ak_fingerprint
    }

    fn has(report: &NodeReport, text: &str) -> bool {
        report.problems.iter().any(|p| p.contains(text))
    }

    #[test]
    fn measurements_match_but_the_cluster_pcr_does_not() {
        let report = check_node(
            &answer(NONCE, "node-a", Some(fingerprint())),
            &trust(pcr4(), false),
        );
        assert_eq!(report.verdict, Verdict::Untrusted);
        assert_eq!(report.evidence_kind.as_deref(), Some("tpm"));
        assert_eq!(report.image.as_deref(), Some("node:v1"));
        assert!(
            report.pcrs.iter().all(|c| c.matches && c.enforced),
            "{report:?}"
        );
        assert_eq!(report.ak_record, Some(AkRecord::Matches));
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            has(&report, "does not hold this cluster's ID"),
            "{report:?}"
        );
    }

    #[test]
    fn each_refusal_is_reported() {
        let ak = Some(fingerprint());
        let wrong_pcr = check_node(&answer(NONCE, "node-a", ak.clone()), &trust([0; 32], false));
        assert!(has(&wrong_pcr, "PCR 4 is"), "{wrong_pcr:?}");
        assert!(wrong_pcr.pcrs.iter().any(|c| !c.matches));

        let warn = check_node(&answer(NONCE, "node-a", ak.clone()), &trust([0; 32], true));
        assert!(!has(&warn, "PCR 4"), "{warn:?}");
        assert_eq!(warn.warnings.len(), 1);

        let relayed = check_node(
            &answer([0x22; 32], "node-a", ak.clone()),
            &trust(pcr4(), false),
        );
        assert!(has(&relayed, "nonce-mismatch"), "{relayed:?}");

        let renamed = check_node(&answer(NONCE, "node-b", ak.clone()), &trust(pcr4(), false));
        assert!(has(&renamed, "answered as node \"node-b\""), "{renamed:?}");

        let other_ak = check_node(
            &answer(NONCE, "node-a", Some("00".repeat(32))),
            &trust(pcr4(), false),
        );
        assert_eq!(other_ak.ak_record, Some(AkRecord::Differs));
        assert!(has(&other_ak, "another machine"), "{other_ak:?}");

        let unrecorded = check_node(&answer(NONCE, "node-a", None), &trust(pcr4(), false));
        assert_eq!(unrecorded.ak_record, Some(AkRecord::Missing));

        let mut untrusted_ek = trust(pcr4(), false);
        untrusted_ek.ek_cas.clear();
        let report = check_node(&answer(NONCE, "node-a", ak.clone()), &untrusted_ek);
        assert!(has(&report, "ek-untrusted"), "{report:?}");

        let mut cluster_pcr_missing = trust(pcr4(), false);
        cluster_pcr_missing.cluster_id_pcr = 15;
        let report = check_node(&answer(NONCE, "node-a", ak), &cluster_pcr_missing);
        assert!(has(&report, "PCR 15 was not quoted"), "{report:?}");

        let unreachable = NodeAnswer {
            answer: Err("connection refused".into()),
            ..answer(NONCE, "node-a", None)
        };
        let report = check_node(&unreachable, &trust(pcr4(), false));
        assert_eq!(report.verdict, Verdict::Untrusted);
        assert!(has(&report, "connection refused"));
    }
}
