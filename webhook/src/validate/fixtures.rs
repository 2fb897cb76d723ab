//! Test fixtures shared by the webhook's decision tests: the publisher
//! `acme`, its signed entries and AttestationPolicies (made by the test
//! environment's fixtures, the one way every suite signs a measured image),
//! and NodeAttestations.

use std::collections::BTreeMap;
use std::sync::Arc;

use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, EvidenceKind, MeasuredImage, NodeAttestation,
    NodeAttestationSpec, PublisherKey, Verdict,
};
use confidential_attestation::measurements::parse_pcr_value;
use confidential_testenv::fixtures;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use p256::ecdsa::SigningKey;

pub const IMAGE: &str = "ghcr.io/acme/node-image:v1.2.0";
pub const PCR4: &str = "4444444444444444444444444444444444444444444444444444444444444444";
pub const PCR9: &str = "9999999999999999999999999999999999999999999999999999999999999999";

pub use confidential_testenv::fixtures::{public_pem, seeded_key as signing_key};

/// An entry for `image` with PCR 4 enforced and PCR 9 warnOnly, signed by `key`.
pub fn signed_entry(image: &str, key: &SigningKey) -> MeasuredImage {
    signed_entry_with(image, &[("4", PCR4, false), ("9", PCR9, true)], key)
}

/// An entry of publisher `acme` for `image` with `(pcr, expected hex,
/// warnOnly)` measurements, signed by `key`, made by the test environment's
/// one fixture ([`confidential_testenv::fixtures`]).
pub fn signed_entry_with(
    image: &str,
    measurements: &[(&str, &str, bool)],
    key: &SigningKey,
) -> MeasuredImage {
    let pcrs: Vec<(u8, [u8; 32], bool)> = measurements
        .iter()
        .map(|(pcr, expected, warn_only)| {
            let pcr = pcr.parse().expect("fixture PCR index");
            let expected = parse_pcr_value(pcr, expected).expect("fixture PCR value");
            (pcr, expected, *warn_only)
        })
        .collect();
    let file = fixtures::measurement_file(image, &pcrs);
    fixtures::entry(&file, "acme", &file.sign(key))
}

/// A policy trusting publisher `acme` (key seed 1) with the given entries.
pub fn policy(images: Vec<MeasuredImage>) -> Arc<AttestationPolicy> {
    let mut p = AttestationPolicy::new(
        "default",
        AttestationPolicySpec {
            evidence_kinds: vec![EvidenceKind::Tpm],
            publishers: vec![PublisherKey {
                name: "acme".to_owned(),
                public_key: public_pem(&signing_key(1)),
            }],
            images,
            ..Default::default()
        },
    );
    p.metadata.resource_version = Some("1".to_owned());
    Arc::new(p)
}

pub fn now() -> jiff::Timestamp {
    "2026-11-27T12:00:00Z".parse().expect("valid time")
}

/// A trusted attestation of `node` for [`IMAGE`] in pool `workers`, expiring
/// `expires_in_secs` after [`now`].
pub fn attestation(node: &str, expires_in_secs: i64) -> Arc<NodeAttestation> {
    let mut measurements = BTreeMap::new();
    measurements.insert("4".to_owned(), PCR4.to_owned());
    measurements.insert("9".to_owned(), PCR9.to_owned());
    Arc::new(NodeAttestation::new(
        node,
        NodeAttestationSpec {
            node_name: node.to_owned(),
            evidence_kind: EvidenceKind::Tpm,
            image: IMAGE.to_owned(),
            pool: Some("workers".to_owned()),
            measurements,
            ak_fingerprint: "ab".repeat(32),
            disk_uuid: None,
            attestation_endpoint: None,
            attested_at: Time(now() - jiff::SignedDuration::from_secs(60)),
            expires_at: Time(now() + jiff::SignedDuration::from_secs(expires_in_secs)),
            verdict: Verdict::Trusted,
            warnings: vec![],
        },
    ))
}
