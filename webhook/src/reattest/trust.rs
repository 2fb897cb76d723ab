//! The policy in force, turned into what the attestation library verifies
//! with, and the check of one node's answer against it. Pure: the sweep
//! fetches the AttestationPolicy once per sweep and the answer once per node.
//!
//! A re-verification passes only when the node's answer carries evidence
//! that verifies against the policy's trust roots *now*, bound to the gate's
//! own aTLS connection (fresh nonce, so no replay or relay), with PCRs
//! matching the signed measurements of the image the node attested with at
//! join (warnOnly honoured), quoted by the very AK recorded in the
//! NodeAttestation (another machine, even a genuine one booted from a
//! trusted image, fails), and naming the node it is asked about.

use std::collections::HashMap;

use confidential_api::{AttestationPolicySpec, NodeAttestation};
use confidential_attestation::measurements::Measurements;
use confidential_attestation::protocol::AttestResponse;
use confidential_attestation::verify::{TrustPolicy, Verdict, verify_evidence};

use super::Failure;
use crate::verify::verify_entry;

/// The trust roots of the policy and the verified measurements of each of
/// its images; an image whose entry does not verify maps to its failure.
pub struct PolicyInForce {
    pub trust: TrustPolicy,
    images: HashMap<String, Result<Measurements, Failure>>,
}

impl PolicyInForce {
    /// Reads `spec`. Fails only when its trust roots do not parse (then no
    /// node can be verified and the sweep reports the policy as broken).
    pub fn new(spec: &AttestationPolicySpec) -> Result<Self, String> {
        let trust = crate::verify::trust_roots(spec).map_err(|e| format!("policy EK CA: {e}"))?;
        // The gate's one image-trust rule (`crate::verify`): every entry
        // listing an image is tried, the first that verifies wins, and SEV-SNP
        // launch values are part of what is signed.
        let mut images: HashMap<String, Result<Measurements, Failure>> = HashMap::new();
        for measured in &spec.images {
            if matches!(images.get(&measured.image), Some(Ok(_))) {
                continue;
            }
            let checked = verify_entry(&spec.publishers, measured).map_err(|e| {
                Failure::ImageNotTrusted(format!("measurements of {}: {e}", measured.image))
            });
            images.insert(measured.image.clone(), checked);
        }
        Ok(Self { trust, images })
    }

    /// The verified measurements of `image`, or why it is not trusted now.
    pub fn measurements(&self, image: &str) -> Result<&Measurements, Failure> {
        match self.images.get(image) {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Failure::ImageNotTrusted(format!(
                "image {image} has no measurements in the AttestationPolicy any more"
            ))),
        }
    }

    /// Checks a node's `/v1/attest` answer, received on a connection whose
    /// node-attest nonce is `nonce`, for the attestation `att`.
    pub fn check(
        &self,
        att: &NodeAttestation,
        answer: &AttestResponse,
        nonce: &[u8; 32],
    ) -> Result<Verdict, Failure> {
        let expected = self.measurements(&att.spec.image)?;
        let verdict =
            verify_evidence(&answer.evidence, nonce, &self.trust, expected).map_err(|e| {
                Failure::Evidence {
                    reason: e.reason(),
                    message: e.to_string(),
                }
            })?;
        if verdict.identity != att.spec.ak_fingerprint {
            return Err(Failure::AkMismatch {
                recorded: att.spec.ak_fingerprint.clone(),
                presented: verdict.identity,
            });
        }
        if answer.node_name != att.spec.node_name {
            return Err(Failure::WrongNode(format!(
                "the machine with the recorded AK answers as {:?}, not {:?}",
                answer.node_name, att.spec.node_name
            )));
        }
        Ok(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_api::{EvidenceKind, NodeAttestationSpec, Verdict as ApiVerdict};
    use confidential_attestation::evidence::{Evidence, EvidenceEnvelope, TpmEvidence};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// The nonce the recorded fixture quote is bound to.
    const NONCE: [u8; 32] = [0x11; 32];
    const IMAGE: &str = "registry.example/node:v1";

    fn fixture_pcr4() -> [u8; 32] {
        hex::decode(include_str!("../../../attestation/testdata/tpm/image-pcr4.hex").trim())
            .expect("hex")
            .try_into()
            .expect("32 bytes")
    }

    fn answer(node: &str) -> AttestResponse {
        let ev: TpmEvidence =
            serde_json::from_str(include_str!("../../../attestation/testdata/tpm/quote.json"))
                .expect("fixture");
        AttestResponse {
            node_name: node.to_owned(),
            evidence: EvidenceEnvelope::new(Evidence::Tpm(ev)),
        }
    }

    use confidential_testenv::fixtures::{self, Publisher, seeded_key as key};

    /// A policy trusting the fixture's EK CA and `IMAGE` with `pcr4`,
    /// signed by `signer` while the publisher entry holds key 1.
    fn policy(pcr4: [u8; 32], signer: &p256::ecdsa::SigningKey) -> AttestationPolicySpec {
        let file = fixtures::measurement_file(IMAGE, &[(4, pcr4, false)]);
        let publisher = Publisher::seeded("pub", 1);
        let mut spec = fixtures::policy_spec(
            Some(include_str!("../../../attestation/testdata/tpm/ek-ca.pem")),
            &[&publisher],
            vec![fixtures::entry(&file, publisher.name(), &file.sign(signer))],
        );
        spec.reattestation_interval = None;
        spec
    }

    fn attestation(ak: &str) -> NodeAttestation {
        let now = jiff::Timestamp::now();
        NodeAttestation::new(
            "n1",
            NodeAttestationSpec {
                node_name: "n1".into(),
                evidence_kind: EvidenceKind::Tpm,
                image: IMAGE.into(),
                pool: None,
                measurements: Default::default(),
                ak_fingerprint: ak.into(),
                disk_uuid: None,
                attestation_endpoint: None,
                attested_at: Time(now),
                expires_at: Time(now),
                verdict: ApiVerdict::Trusted,
                warnings: vec![],
            },
        )
    }

    /// The fixture AK's fingerprint, as the join recorded it.
    fn recorded_ak(in_force: &PolicyInForce) -> String {
        verify_evidence(
            &answer("n1").evidence,
            &NONCE,
            &in_force.trust,
            in_force.measurements(IMAGE).expect("trusted"),
        )
        .expect("fixture verifies")
        .identity
    }

    #[test]
    fn the_recorded_machine_with_trusted_pcrs_passes() {
        let in_force = PolicyInForce::new(&policy(fixture_pcr4(), &key(1))).expect("policy");
        let ak = recorded_ak(&in_force);
        let verdict = in_force
            .check(&attestation(&ak), &answer("n1"), &NONCE)
            .expect("passes");
        assert_eq!(verdict.identity, ak);
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let in_force = PolicyInForce::new(&policy(fixture_pcr4(), &key(1))).expect("policy");
        let ak = recorded_ak(&in_force);
        let att = attestation(&ak);
        // Another AK recorded: a different machine answers.
        let err = in_force
            .check(&attestation(&"00".repeat(32)), &answer("n1"), &NONCE)
            .expect_err("another AK");
        assert_eq!(err.reason(), "AkMismatch");
        // Evidence bound to another connection (replayed or relayed).
        let err = in_force
            .check(&att, &answer("n1"), &[0x22; 32])
            .expect_err("stale nonce");
        assert!(matches!(err, Failure::Evidence { .. }), "{err:?}");
        // The right machine naming another node.
        let err = in_force
            .check(&att, &answer("n2"), &NONCE)
            .expect_err("wrong name");
        assert_eq!(err.reason(), "WrongNode");
        // The policy no longer trusts the PCR value.
        let changed = PolicyInForce::new(&policy([0xee; 32], &key(1))).expect("policy");
        let err = changed.check(&att, &answer("n1"), &NONCE).expect_err("PCR");
        assert_eq!(err.reason(), "PcrMismatch");
        // Measurements signed by a key that is not the publisher's.
        let forged = PolicyInForce::new(&policy(fixture_pcr4(), &key(2))).expect("policy");
        let err = forged
            .check(&att, &answer("n1"), &NONCE)
            .expect_err("signature");
        assert_eq!(err.reason(), "ImageNotTrusted");
        // The image was removed from the policy.
        let mut other = attestation(&ak);
        other.spec.image = "registry.example/node:v0".into();
        let err = in_force
            .check(&other, &answer("n1"), &NONCE)
            .expect_err("image");
        assert_eq!(err.reason(), "ImageNotTrusted");
        assert!(err.to_string().contains("no measurements"), "{err}");
    }

    /// Re-attestation trusts entries by the gate's one rule
    /// (`verify::verify_entry`): SEV-SNP launch values are part of the
    /// signed bytes, and of several entries for one image the first that
    /// verifies wins, whatever follows it.
    #[test]
    fn entries_are_trusted_by_the_gates_one_rule() {
        use confidential_attestation::snp::launch::SnpLaunchPolicy;
        let publisher = Publisher::seeded("pub", 1);
        let mut file = fixtures::measurement_file(IMAGE, &[(4, fixture_pcr4(), false)]);
        file.measurements = file.measurements.with_snp(Some(SnpLaunchPolicy {
            measurement: [0x5a; 48],
            vmpl: 0,
            allow_smt: false,
            allow_migration_agent: false,
        }));
        let mut spec = policy(fixture_pcr4(), &key(1));
        spec.images = vec![publisher.entry(&file)];
        let in_force = PolicyInForce::new(&spec).expect("policy");
        let trusted = in_force.measurements(IMAGE).expect("an SNP entry verifies");
        assert_eq!(trusted.snp().map(|s| s.measurement), Some([0x5a; 48]));

        // A valid entry, then a forged one for the same image: still trusted.
        let mut forged = publisher.entry(&fixtures::measurement_file(
            IMAGE,
            &[(4, [0xee; 32], false)],
        ));
        forged.signature = publisher.sign(&fixtures::measurement_file(IMAGE, &[]));
        spec.images.push(forged.clone());
        let in_force = PolicyInForce::new(&spec).expect("policy");
        assert!(in_force.measurements(IMAGE).is_ok());
        // Only the forged one: not trusted, and the reason says why.
        spec.images = vec![forged];
        let in_force = PolicyInForce::new(&spec).expect("policy");
        let err = in_force.measurements(IMAGE).expect_err("forged");
        assert_eq!(err.reason(), "ImageNotTrusted");
        assert!(err.to_string().contains("signature"), "{err}");
    }
}
