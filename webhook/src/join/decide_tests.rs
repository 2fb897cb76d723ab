//! Example tests of [`decide`] on a real recorded TPM quote (swtpm, EK
//! certified by a local CA, nonce `0x11…`): one accepted join, and every
//! refusal on its own.

use std::collections::BTreeMap;

use confidential_api::{
    AttestationPolicySpec, MeasuredImage, NodeAttestationSpec, NodeVersionSpec, PublisherKey,
    TpmTrust, Verdict as ApiVerdict,
};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope, TpmEvidence};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::validate::fixtures::{public_pem, signed_entry_with, signing_key};
use crate::verify::measurement_file;

pub const NONCE: [u8; 32] = [0x11; 32];
pub const IMAGE: &str = "ghcr.io/acme/node-image:v1";
pub const DISK: &str = "5e1f0000-0000-4000-8000-000000000001";

pub fn evidence() -> TpmEvidence {
    serde_json::from_str(include_str!("../../../attestation/testdata/tpm/quote.json"))
        .expect("fixture parses")
}

pub fn image_pcr4() -> String {
    include_str!("../../../attestation/testdata/tpm/image-pcr4.hex")
        .trim()
        .to_owned()
}

/// An entry for `image` expecting `pcr4`, signed by key seed `signer`, naming
/// publisher `acme`.
pub fn entry(image: &str, pcr4: &str, signer: u8) -> MeasuredImage {
    signed_entry_with(image, &[("4", pcr4, false)], &signing_key(signer))
}

/// Policy `default` (rv 1) trusting the fixture's EK CA and publisher acme
/// (key seed 1), with `entries`.
pub fn policy(entries: Vec<MeasuredImage>) -> Arc<AttestationPolicy> {
    let mut p = AttestationPolicy::new(
        "default",
        AttestationPolicySpec {
            evidence_kinds: vec![confidential_api::EvidenceKind::Tpm],
            tpm: Some(TpmTrust {
                ek_ca_certificates: vec![
                    include_str!("../../../attestation/testdata/tpm/ek-ca.pem").to_owned(),
                ],
            }),
            publishers: vec![PublisherKey {
                name: "acme".to_owned(),
                public_key: public_pem(&signing_key(1)),
            }],
            images: entries,
            reattestation_interval: Some("2h".to_owned()),
            ..Default::default()
        },
    );
    p.metadata.resource_version = Some("1".to_owned());
    Arc::new(p)
}

pub fn pool(image: &str) -> NodeVersion {
    NodeVersion::new(
        "workers",
        NodeVersionSpec {
            image: image.to_owned(),
            kubernetes_version: "v1.35.0".to_owned(),
            replicas: 1,
            control_plane: false,
            strategy: Default::default(),
        },
    )
}

pub fn request(name: &str, disk: &str) -> JoinRequest {
    JoinRequest {
        node_name: name.to_owned(),
        disk_uuid: disk.to_owned(),
        pool: None,
        attestation_endpoint: None,
        evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence())),
    }
}

/// The fixture quote's AK fingerprint.
pub fn fixture_identity() -> String {
    let p = policy(vec![]);
    let trust = trust_policy(&p).expect("policy");
    let expected = measurement_file(&entry(IMAGE, &image_pcr4(), 1))
        .expect("entry")
        .measurements;
    verify_evidence(&request("n", DISK).evidence, &NONCE, &trust, &expected)
        .expect("fixture verifies")
        .identity
}

/// An attestation of `name` by `ak`, recording `disk`, at `rv`.
pub fn attestation(name: &str, ak: &str, disk: Option<&str>, rv: Option<&str>) -> NodeAttestation {
    let mut att = NodeAttestation::new(
        name,
        NodeAttestationSpec {
            node_name: name.to_owned(),
            evidence_kind: confidential_api::EvidenceKind::Tpm,
            image: IMAGE.to_owned(),
            pool: Some("workers".to_owned()),
            measurements: BTreeMap::new(),
            ak_fingerprint: ak.to_owned(),
            disk_uuid: disk.map(str::to_owned),
            attestation_endpoint: None,
            attested_at: Time(jiff::Timestamp::UNIX_EPOCH),
            expires_at: Time(jiff::Timestamp::UNIX_EPOCH),
            verdict: ApiVerdict::Trusted,
            warnings: vec![],
        },
    );
    att.metadata.resource_version = rv.map(str::to_owned);
    att
}

struct Case {
    mode: Mode,
    request: JoinRequest,
    nonce: [u8; 32],
    policy: Option<Arc<AttestationPolicy>>,
    pool: Option<NodeVersion>,
    existing: Option<NodeAttestation>,
}

impl Case {
    fn new() -> Self {
        Self {
            mode: Mode::Join,
            request: request("node-1", DISK),
            nonce: NONCE,
            policy: Some(policy(vec![entry(IMAGE, &image_pcr4(), 1)])),
            pool: Some(pool(IMAGE)),
            existing: None,
        }
    }

    fn decide(&self) -> Result<Accepted, Refusal> {
        decide(&Inputs {
            mode: self.mode,
            request: &self.request,
            nonce: &self.nonce,
            policy_name: "default",
            policy: self.policy.as_ref(),
            pool_name: "workers",
            pool: self.pool.as_ref(),
            existing: self.existing.as_ref(),
            trust: &TrustCache::default(),
        })
    }

    fn refused(&self) -> Reason {
        match self.decide() {
            Ok(a) => panic!("accepted: {:?}", a.plan),
            Err(r) => r.reason,
        }
    }
}

#[test]
fn a_trusted_machine_joins_under_a_free_name() {
    let accepted = Case::new().decide().expect("accepted");
    assert_eq!(
        accepted.plan,
        JoinPlan {
            mode: Mode::Join,
            node_name: "node-1".into(),
            image: IMAGE.into(),
            pool: "workers".into(),
            valid_for: Duration::from_secs(7200),
            disk_uuid: DISK.into(),
            attestation_endpoint: None,
            record: Record::Create,
        }
    );
    assert_eq!(accepted.verdict.identity, fixture_identity());
    assert_eq!(accepted.verdict.kind, EvidenceKind::Tpm);
}

#[test]
fn an_announced_attestation_endpoint_is_recorded_in_canonical_form() {
    let mut case = Case::new();
    case.request.attestation_endpoint = Some("[2001:db8:0::1]:40001".into());
    assert_eq!(
        case.decide()
            .expect("accepted")
            .plan
            .attestation_endpoint
            .as_deref(),
        Some("[2001:db8::1]:40001")
    );
    case.mode = Mode::Rejoin;
    case.existing = Some(attestation(
        "node-1",
        &fixture_identity(),
        Some(DISK),
        Some("7"),
    ));
    case.request.attestation_endpoint = Some("127.0.0.1:40002".into());
    assert_eq!(
        case.decide()
            .expect("rejoin")
            .plan
            .attestation_endpoint
            .as_deref(),
        Some("127.0.0.1:40002"),
        "a rebooted machine may be reached elsewhere now"
    );
}

#[test]
fn a_malformed_attestation_endpoint_is_a_bad_request_before_any_verification() {
    for endpoint in [
        "",
        "127.0.0.1",
        "127.0.0.1:0",
        "host:9444/path",
        "user@10.0.0.1:9444",
        "0x7f000001:9444",
        "[::1%lo]:9444",
        "10.0.0.1:9444,10.0.0.2:9444",
    ] {
        let mut case = Case::new();
        case.request.attestation_endpoint = Some(endpoint.to_owned());
        // No policy: a refusal for the endpoint shows it was checked first.
        case.policy = None;
        assert_eq!(
            case.refused(),
            Reason::BadAttestationEndpoint,
            "{endpoint:?}"
        );
    }
    assert_eq!(
        Reason::BadAttestationEndpoint.status(),
        StatusCode::BAD_REQUEST
    );
}

#[test]
fn malformed_names_and_disks_are_bad_requests() {
    for name in ["", "Node", "-a", "a..b", "a_b", &"a".repeat(64)] {
        let mut case = Case::new();
        case.request.node_name = name.to_owned();
        assert_eq!(case.refused(), Reason::BadNodeName, "{name:?}");
        assert_eq!(Reason::BadNodeName.status(), StatusCode::BAD_REQUEST);
    }
    for disk in [
        "",
        "x",
        "5e1f0000-0000-4000-8000-00000000000g",
        "5e1f00000000400080000000000000000001",
    ] {
        let mut case = Case::new();
        case.request.disk_uuid = disk.to_owned();
        assert_eq!(case.refused(), Reason::BadDiskUuid, "{disk:?}");
    }
}

#[test]
fn missing_policy_or_pool_refuses() {
    let mut case = Case::new();
    case.policy = None;
    assert_eq!(case.refused(), Reason::NoPolicy);
    let mut case = Case::new();
    case.pool = None;
    assert_eq!(case.refused(), Reason::UnknownPool);
}

#[test]
fn untrusted_images_refuse() {
    let mut case = Case::new();
    case.pool = Some(pool("ghcr.io/acme/unmeasured:v1"));
    assert_eq!(case.refused(), Reason::ImageNotMeasured);
    let mut case = Case::new();
    // Signed by key seed 2, not acme's.
    case.policy = Some(policy(vec![entry(IMAGE, &image_pcr4(), 2)]));
    assert_eq!(case.refused(), Reason::MeasurementsSignature);
}

#[test]
fn a_trusted_entry_among_untrusted_ones_is_used_as_admission_does() {
    let mut case = Case::new();
    case.policy = Some(policy(vec![
        entry(IMAGE, &"00".repeat(32), 2),
        entry(IMAGE, &image_pcr4(), 1),
    ]));
    case.decide().expect("the signed entry is found");
}

#[test]
fn evidence_that_does_not_verify_refuses_with_the_verifier_reason() {
    let mut case = Case::new();
    case.nonce = [0x22; 32];
    assert_eq!(case.refused(), Reason::Evidence("nonce-mismatch"));
    let mut case = Case::new();
    case.policy = Some(policy(vec![entry(IMAGE, &"00".repeat(32), 1)]));
    assert_eq!(case.refused(), Reason::Evidence("pcr-mismatch"));
    let mut case = Case::new();
    let mut p = (*policy(vec![entry(IMAGE, &image_pcr4(), 1)])).clone();
    p.spec.evidence_kinds = vec![confidential_api::EvidenceKind::SevSnp];
    case.policy = Some(Arc::new(p));
    assert_eq!(case.refused(), Reason::Evidence("kind-not-accepted"));
    let mut case = Case::new();
    let mut p = (*policy(vec![entry(IMAGE, &image_pcr4(), 1)])).clone();
    p.spec.tpm = Some(TpmTrust {
        ek_ca_certificates: vec![
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        ],
    });
    case.policy = Some(Arc::new(p));
    // A policy whose only EK root is garbage trusts no EK.
    assert!(matches!(
        case.refused(),
        Reason::PolicyInvalid | Reason::Evidence("ek-untrusted")
    ));
}

#[test]
fn a_name_recorded_for_another_key_is_taken_for_join_and_rejoin() {
    for mode in [Mode::Join, Mode::Rejoin] {
        let mut case = Case::new();
        case.mode = mode;
        case.existing = Some(attestation(
            "node-1",
            &"cd".repeat(32),
            Some(DISK),
            Some("5"),
        ));
        assert_eq!(case.refused(), Reason::NameTaken, "{mode:?}");
    }
}

#[test]
fn ownership_is_not_revealed_before_the_evidence_verifies() {
    let mut case = Case::new();
    case.nonce = [0x22; 32];
    case.existing = Some(attestation(
        "node-1",
        &"cd".repeat(32),
        Some(DISK),
        Some("5"),
    ));
    assert_eq!(case.refused(), Reason::Evidence("nonce-mismatch"));
    let mut case = Case::new();
    case.mode = Mode::Rejoin;
    case.nonce = [0x22; 32];
    assert_eq!(case.refused(), Reason::Evidence("nonce-mismatch"));
}

#[test]
fn rejoin_needs_a_recorded_attestation() {
    let mut case = Case::new();
    case.mode = Mode::Rejoin;
    assert_eq!(case.refused(), Reason::NotAttested);
}

#[test]
fn the_owner_rejoins_replacing_exactly_the_version_it_read() {
    let mut case = Case::new();
    case.mode = Mode::Rejoin;
    case.existing = Some(attestation(
        "node-1",
        &fixture_identity(),
        Some(DISK),
        Some("5"),
    ));
    let accepted = case.decide().expect("owner rejoins");
    assert_eq!(
        accepted.plan.record,
        Record::Replace {
            resource_version: "5".into()
        }
    );
    case.existing = Some(attestation("node-1", &fixture_identity(), Some(DISK), None));
    assert_eq!(case.refused(), Reason::AttestationChanged);
}

#[test]
fn a_rejoin_cannot_change_the_recorded_disk() {
    for mode in [Mode::Join, Mode::Rejoin] {
        let mut case = Case::new();
        case.mode = mode;
        case.existing = Some(attestation(
            "node-1",
            &fixture_identity(),
            Some(DISK),
            Some("5"),
        ));
        case.request.disk_uuid = "5e1f0000-0000-4000-8000-000000000002".into();
        assert_eq!(case.refused(), Reason::DiskMismatch, "{mode:?}");
        // The same disk in upper case is the same disk.
        case.request.disk_uuid = DISK.to_ascii_uppercase();
        assert_eq!(case.decide().expect("same disk").plan.disk_uuid, DISK);
    }
}

#[test]
fn reasons_have_distinct_labels_and_sensible_statuses() {
    let all = [
        Reason::MalformedRequest,
        Reason::BodyTooLarge,
        Reason::BadNodeName,
        Reason::BadDiskUuid,
        Reason::NotReady,
        Reason::NoPolicy,
        Reason::PolicyInvalid,
        Reason::UnknownPool,
        Reason::ImageNotMeasured,
        Reason::MeasurementsSignature,
        Reason::NameTaken,
        Reason::NotAttested,
        Reason::DiskMismatch,
        Reason::AttestationChanged,
        Reason::NoPendingJoin,
        Reason::RateLimited,
        Reason::Internal,
    ];
    let labels: std::collections::BTreeSet<_> = all.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), all.len());
    assert_eq!(Reason::RateLimited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(Reason::NameTaken.status(), StatusCode::FORBIDDEN);
    assert_eq!(Reason::Internal.status(), StatusCode::SERVICE_UNAVAILABLE);
}
