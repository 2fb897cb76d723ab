//! Property tests of [`decide`] over random combinations of its inputs
//! around a real recorded TPM quote: whatever the mix, an accepted join meets
//! every precondition, a name recorded for another key is never handed out,
//! a machine never gets a disk other than the one recorded for it, and no
//! ownership information leaks before the evidence verifies.
//!
//! Each run draws a new seed (printed; `PROPTEST_SEED=<n>` replays one).
//! Cases found are kept in `decide_properties.regressions` beside this file
//! and replayed first on every run.

use proptest::prelude::*;

use super::tests::{
    DISK, IMAGE, NONCE, attestation, entry, fixture_identity, image_pcr4, policy, pool, request,
};
use super::*;

fn config() -> ProptestConfig {
    crate::property_seed::config("decide", 96)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    None,
    Mine { disk: Option<u8>, versioned: bool },
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageState {
    Trusted,
    WrongPcr,
    BadSignature,
    NotListed,
}

#[derive(Debug, Clone)]
struct World {
    rejoin: bool,
    name_valid: bool,
    /// Index of the disk the request names (0 = the fixture disk); 255 =
    /// not a UUID.
    asked_disk: u8,
    upper_case: bool,
    nonce_right: bool,
    policy: bool,
    pool: bool,
    image: ImageState,
    existing: Existing,
}

fn disk(i: u8) -> String {
    if i == 0 {
        DISK.to_owned()
    } else {
        format!("5e1f0000-0000-4000-8000-0000000000{i:02x}")
    }
}

fn world() -> impl Strategy<Value = World> {
    let existing = prop_oneof![
        Just(Existing::None),
        (proptest::option::of(0u8..3), any::<bool>())
            .prop_map(|(disk, versioned)| Existing::Mine { disk, versioned }),
        Just(Existing::Other),
    ];
    let image = prop_oneof![
        4 => Just(ImageState::Trusted),
        1 => Just(ImageState::WrongPcr),
        1 => Just(ImageState::BadSignature),
        1 => Just(ImageState::NotListed),
    ];
    let asked = prop_oneof![6 => 0u8..3, 1 => Just(255u8)];
    (
        any::<bool>(),
        prop::bool::weighted(0.9),
        asked,
        any::<bool>(),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.9),
        image,
        existing,
    )
        .prop_map(
            |(
                rejoin,
                name_valid,
                asked_disk,
                upper_case,
                nonce_right,
                policy,
                pool,
                image,
                existing,
            )| World {
                rejoin,
                name_valid,
                asked_disk,
                upper_case,
                nonce_right,
                policy,
                pool,
                image,
                existing,
            },
        )
}

struct Built {
    mode: Mode,
    request: JoinRequest,
    nonce: [u8; 32],
    policy: Option<Arc<AttestationPolicy>>,
    pool: Option<NodeVersion>,
    existing: Option<NodeAttestation>,
}

fn build(w: &World, me: &str) -> Built {
    let name = if w.name_valid { "node-1" } else { "Node_1" };
    let asked = if w.asked_disk == 255 {
        "not-a-uuid".to_owned()
    } else if w.upper_case {
        disk(w.asked_disk).to_ascii_uppercase()
    } else {
        disk(w.asked_disk)
    };
    let entries = match w.image {
        ImageState::Trusted => vec![entry(IMAGE, &image_pcr4(), 1)],
        ImageState::WrongPcr => vec![entry(IMAGE, &"00".repeat(32), 1)],
        ImageState::BadSignature => vec![entry(IMAGE, &image_pcr4(), 2)],
        ImageState::NotListed => vec![entry("ghcr.io/acme/other:v1", &image_pcr4(), 1)],
    };
    let existing = match w.existing {
        Existing::None => None,
        Existing::Mine { disk: d, versioned } => Some(attestation(
            "node-1",
            me,
            d.map(disk).as_deref(),
            versioned.then_some("5"),
        )),
        Existing::Other => Some(attestation(
            "node-1",
            &"cd".repeat(32),
            Some(DISK),
            Some("5"),
        )),
    };
    Built {
        mode: if w.rejoin { Mode::Rejoin } else { Mode::Join },
        request: request(name, &asked),
        nonce: if w.nonce_right { NONCE } else { [0x22; 32] },
        policy: w.policy.then(|| policy(entries)),
        pool: w.pool.then(|| pool(IMAGE)),
        existing,
    }
}

fn run(b: &Built, trust: &TrustCache) -> Result<Accepted, Refusal> {
    decide(&Inputs {
        mode: b.mode,
        request: &b.request,
        nonce: &b.nonce,
        policy_name: "default",
        policy: b.policy.as_ref(),
        pool_name: "workers",
        pool: b.pool.as_ref(),
        existing: b.existing.as_ref(),
        trust,
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decisions_keep_the_join_invariants(w in world()) {
        let me = fixture_identity();
        let built = build(&w, &me);
        let trust = TrustCache::default();
        let outcome = run(&built, &trust);
        // Deterministic, also with a warm image-trust cache.
        prop_assert_eq!(&run(&built, &trust), &outcome);
        match &outcome {
            Ok(accepted) => {
                prop_assert!(w.name_valid && w.asked_disk != 255);
                prop_assert!(w.nonce_right && w.policy && w.pool);
                prop_assert_eq!(w.image, ImageState::Trusted);
                prop_assert!(w.existing != Existing::Other, "a name held by another key was handed out");
                prop_assert!(!(w.rejoin && w.existing == Existing::None));
                prop_assert_eq!(&accepted.verdict.identity, &me);
                // The disk is the recorded one when there is one, else the asked one.
                let expected_disk = match w.existing {
                    Existing::Mine { disk: Some(d), .. } => disk(d),
                    _ => disk(w.asked_disk),
                };
                prop_assert_eq!(&accepted.plan.disk_uuid, &expected_disk);
                prop_assert_eq!(accepted.plan.disk_uuid.clone(), disk(w.asked_disk),
                    "what the node asks for cannot change its recorded disk");
                match (&accepted.plan.record, w.existing) {
                    (Record::Create, Existing::None) => {}
                    (Record::Replace { resource_version }, Existing::Mine { versioned: true, .. }) => {
                        prop_assert_eq!(resource_version.as_str(), "5");
                    }
                    (record, existing) => prop_assert!(false, "{record:?} for {existing:?}"),
                }
            }
            Err(refusal) => {
                // Before the evidence verifies, nothing about the name's owner leaks.
                let ownership = matches!(
                    refusal.reason,
                    Reason::NameTaken | Reason::NotAttested | Reason::DiskMismatch | Reason::AttestationChanged
                );
                if ownership {
                    prop_assert!(w.nonce_right && w.image == ImageState::Trusted && w.policy && w.pool);
                }
                if !w.nonce_right && w.name_valid && w.asked_disk != 255 && w.policy && w.pool
                    && w.image == ImageState::Trusted
                {
                    prop_assert_eq!(refusal.reason, Reason::Evidence("nonce-mismatch"));
                }
                prop_assert!(!refusal.message.is_empty());
            }
        }
    }
}
