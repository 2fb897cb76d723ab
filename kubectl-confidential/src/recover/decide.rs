//! The decisions of `recover`, as pure functions of what the node answered
//! on our connection and the admin's local inputs: whether the node may be
//! challenged ([`judge_offer`], the same evidence checks as `verify`), and
//! the keys it gets once its AK is proven ([`keys_for`], the gate's own
//! derivation). No I/O, so every refusal is testable on recorded data.

use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{RecoveryKeys, RecoveryOffer};
use confidential_attestation::tpm::VerifiedQuote;
use confidential_attestation::verify::BoundVerdict;

use crate::verify::check::{NodeReport, check_evidence};
use crate::verify::trust::Trust;

use confidential_attestation::kdf::is_valid_disk_uuid;

/// Judges the node's offer, bound to `nonce` (our end of the connection),
/// against local trust. `expected_node`: the name the admin expects, if any.
/// `Ok` with the verified quote only when nothing is wrong; the report is
/// returned either way for display.
pub fn judge_offer(
    endpoint: &str,
    offer: &RecoveryOffer,
    nonce: [u8; 32],
    trust: &Trust,
    expected_node: Option<&str>,
) -> Result<(NodeReport, VerifiedQuote), Box<NodeReport>> {
    let node = expected_node.unwrap_or(&offer.attestation.node_name);
    let (mut report, quote) = check_evidence(
        node,
        endpoint,
        &Ok((offer.attestation.clone(), nonce)),
        trust,
    );
    if !is_valid_disk_uuid(&offer.disk_uuid) {
        report.problems.push(format!(
            "the node names disk {:?}, which is not a UUID",
            offer.disk_uuid
        ));
    }
    report.conclude();
    match quote {
        Some(quote) if report.problems.is_empty() => Ok((report, quote)),
        _ => Err(Box::new(report)),
    }
}

/// The keys a recovered node gets: its disk's key for the identity whose
/// AK was activated (the derivation the gate uses at join), the measurement
/// secret and the cluster ID. Takes a [`BoundVerdict`]: there is no way to
/// compute them for a node whose AK was not proven.
pub fn keys_for(master: &MasterSecret, bound: &BoundVerdict, disk_uuid: &str) -> RecoveryKeys {
    RecoveryKeys {
        disk_key: master
            .node_disk_key(&bound.verdict().identity, disk_uuid)
            .to_vec(),
        cluster_id: hex::encode(master.cluster_id()),
    }
}

#[cfg(test)]
mod tests {
    //! On the recorded swtpm quote of `attestation/testdata` (nonce
    //! `[0x11; 32]`, PCRs 0, 4, 7; the cluster-ID PCR is set to 7 so the
    //! fixture can pass). The passing path end to end, with activation and
    //! the unlock, is `tests/recover.rs` on real components.
    use std::collections::BTreeMap;

    use confidential_attestation::evidence::{Evidence, EvidenceEnvelope, TpmEvidence};
    use confidential_attestation::measurements::{Expected, MeasurementFile, Measurements};
    use confidential_attestation::protocol::AttestResponse;
    use confidential_attestation::tpm::parse_certificates;

    use super::*;
    use crate::verify::check::Verdict;
    use crate::verify::trust::TrustedFile;

    const NONCE: [u8; 32] = [0x11; 32];

    fn evidence() -> TpmEvidence {
        serde_json::from_str(include_str!("../../../attestation/testdata/tpm/quote.json"))
            .expect("fixture")
    }

    fn pcr(index: u32) -> [u8; 32] {
        let value = evidence().pcrs.get(&index).cloned().expect("quoted");
        <[u8; 32]>::try_from(value.as_slice()).expect("32 bytes")
    }

    /// Trust matching the fixture: PCR 4 as measured, PCR 7 as the
    /// "cluster-ID PCR" holding one extend of `cluster_id` from zero.
    fn trust(pcr4: [u8; 32]) -> Trust {
        let file = MeasurementFile {
            image: "node:v1".into(),
            measurements: Measurements::new(BTreeMap::from([(
                4,
                Expected {
                    expected: pcr4,
                    warn_only: false,
                },
            )]))
            .expect("valid"),
        };
        Trust {
            files: vec![TrustedFile {
                path: "m.json".into(),
                file,
            }],
            cluster_id: [0; 32],
            cluster_id_pcr: 7,
            ek_cas: parse_certificates(include_str!("../../../attestation/testdata/tpm/ek-ca.pem"))
                .expect("CA"),
        }
    }

    fn offer(disk_uuid: &str) -> RecoveryOffer {
        RecoveryOffer {
            attestation: AttestResponse {
                node_name: "node-a".into(),
                evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence())),
            },
            disk_uuid: disk_uuid.into(),
        }
    }

    const UUID: &str = "5e1f0000-0000-4000-8000-000000000001";

    #[test]
    fn each_refusal_leaves_no_quote_to_challenge() {
        // The fixture's PCR 7 is not an extend of our cluster ID: refused.
        let err = judge_offer("e", &offer(UUID), NONCE, &trust(pcr(4)), None)
            .expect_err("cluster ID PCR");
        assert_eq!(err.verdict, Verdict::Untrusted);
        assert!(
            err.problems
                .iter()
                .any(|p| p.contains("does not hold this cluster's ID")),
            "{err:?}"
        );
        // A wrong measurement, a relayed nonce, another name, a bad UUID:
        // each is reported.
        let err = judge_offer("e", &offer(UUID), NONCE, &trust([0; 32]), None).expect_err("pcr");
        assert!(
            err.problems.iter().any(|p| p.contains("PCR 4 is")),
            "{err:?}"
        );
        let err =
            judge_offer("e", &offer(UUID), [0x22; 32], &trust(pcr(4)), None).expect_err("relayed");
        assert!(
            err.problems.iter().any(|p| p.contains("nonce-mismatch")),
            "{err:?}"
        );
        let err = judge_offer("e", &offer(UUID), NONCE, &trust(pcr(4)), Some("node-b"))
            .expect_err("renamed");
        assert!(
            err.problems.iter().any(|p| p.contains("answered as node")),
            "{err:?}"
        );
        let err =
            judge_offer("e", &offer("../etc"), NONCE, &trust(pcr(4)), None).expect_err("uuid");
        assert!(
            err.problems.iter().any(|p| p.contains("not a UUID")),
            "{err:?}"
        );
    }

    #[test]
    fn uuid_format() {
        assert!(is_valid_disk_uuid(UUID));
        for bad in [
            "",
            "5e1f0000",
            "5e1f0000-0000-4000-8000-00000000000g",
            "a/b-c-d-e",
        ] {
            assert!(!is_valid_disk_uuid(bad), "{bad}");
        }
    }
}
