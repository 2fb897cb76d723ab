//! Which node images the cluster trusts: an image is trusted when an
//! `AttestationPolicy` lists it with measurements signed by one of that
//! policy's publisher keys. Signature checking is done by
//! `confidential_attestation::measurements`; this module only finds the entry,
//! builds the measurement file and caches the verdict per policy
//! resourceVersion so a Node review does not verify ECDSA every time.
//!
//! This is the one image-trust check of the gate: Node and NodeVersion
//! admission and the attested join all call [`TrustCache::image_trust`], so an
//! image trusted for one is trusted for the others by the same rules (every
//! entry listing the image is tried; the first that verifies wins).
//!
//! The cache key names the *entry* (policy, resourceVersion, position in
//! `spec.images`), not the image: one image may have entries from several
//! publishers, and one entry's verdict must never answer for another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use confidential_api::{AttestationPolicy, MeasuredImage, PublisherKey};
use confidential_attestation::measurements::{
    MeasurementFile, Measurements, parse_snp_measurement,
};
use confidential_attestation::snp::launch::SnpLaunchPolicy;

/// The outcome of looking an image up in the policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTrust {
    /// Listed with a valid signature; the expected measurements.
    Trusted {
        policy: String,
        measurements: Measurements,
    },
    /// No policy lists the image.
    NotListed,
    /// Listed, but no entry verifies; one reason per entry.
    Untrusted(Vec<String>),
}

/// Builds the signed measurement file of a policy entry (PCRs and, for
/// SEV-SNP images, the launch values).
pub fn measurement_file(entry: &MeasuredImage) -> Result<MeasurementFile, String> {
    let snp = entry
        .snp
        .as_ref()
        .map(|snp| {
            Ok::<_, String>(SnpLaunchPolicy {
                measurement: parse_snp_measurement(&snp.measurement).map_err(|e| e.to_string())?,
                vmpl: snp.vmpl,
                allow_smt: snp.allow_smt,
                allow_migration_agent: snp.allow_migration_agent,
            })
        })
        .transpose()?;
    let measurements = Measurements::from_hex_map(
        entry
            .measurements
            .iter()
            .map(|(pcr, m)| (pcr.as_str(), m.expected.as_str(), m.warn_only)),
    )
    .map_err(|e| e.to_string())?
    .with_snp(snp);
    Ok(MeasurementFile {
        image: entry.image.clone(),
        measurements,
    })
}

/// Verifies one entry against the publisher it names among `publishers`.
pub fn verify_entry(
    publishers: &[PublisherKey],
    entry: &MeasuredImage,
) -> Result<Measurements, String> {
    let publisher = publishers
        .iter()
        .find(|p| p.name == entry.publisher)
        .ok_or_else(|| format!("publisher {:?} is not in the policy", entry.publisher))?;
    let file = measurement_file(entry)?;
    file.verify(&entry.signature, &publisher.public_key)
        .map_err(|e| format!("signature by publisher {:?}: {e}", entry.publisher))?;
    Ok(file.measurements)
}

/// One entry of one version of one policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    policy: String,
    resource_version: String,
    entry: usize,
}

/// Cache of entry verdicts keyed by (policy name, resourceVersion, entry).
#[derive(Debug, Default, Clone)]
pub struct TrustCache {
    inner: Arc<Mutex<HashMap<CacheKey, Result<Measurements, String>>>>,
}

const CACHE_LIMIT: usize = 1024;

impl TrustCache {
    /// Looks `image` up in `policies`; the first verified entry wins.
    pub fn image_trust(&self, image: &str, policies: &[Arc<AttestationPolicy>]) -> ImageTrust {
        let mut reasons = Vec::new();
        for policy in policies {
            let name = policy.metadata.name.clone().unwrap_or_default();
            let listing = policy
                .spec
                .images
                .iter()
                .enumerate()
                .filter(|(_, e)| e.image == image);
            for (index, entry) in listing {
                match self.verdict(policy, index, entry) {
                    Ok(measurements) => {
                        return ImageTrust::Trusted {
                            policy: name,
                            measurements,
                        };
                    }
                    Err(reason) => reasons.push(format!("AttestationPolicy {name}: {reason}")),
                }
            }
        }
        if reasons.is_empty() {
            ImageTrust::NotListed
        } else {
            ImageTrust::Untrusted(reasons)
        }
    }

    fn verdict(
        &self,
        policy: &AttestationPolicy,
        index: usize,
        entry: &MeasuredImage,
    ) -> Result<Measurements, String> {
        let key = match (&policy.metadata.name, &policy.metadata.resource_version) {
            (Some(name), Some(rv)) => Some(CacheKey {
                policy: name.clone(),
                resource_version: rv.clone(),
                entry: index,
            }),
            _ => None,
        };
        if let Some(key) = &key
            && let Ok(cache) = self.inner.lock()
            && let Some(hit) = cache.get(key)
        {
            return hit.clone();
        }
        let verdict = verify_entry(&policy.spec.publishers, entry);
        if let Some(key) = key
            && let Ok(mut cache) = self.inner.lock()
        {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, verdict.clone());
        }
        verdict
    }
}

/// The trust roots of an AttestationPolicy, as the attestation library
/// verifies with them: accepted evidence kinds, the EK CA certificates and
/// the AMD roots with the minimum TCB. One conversion for the join decision
/// and for re-attestation. Fails with the parse error of an EK CA
/// certificate; each caller says in its own terms that the policy is broken.
pub fn trust_roots(
    spec: &confidential_api::AttestationPolicySpec,
) -> Result<confidential_attestation::verify::TrustPolicy, confidential_attestation::tpm::TpmError>
{
    use confidential_attestation::evidence::EvidenceKind;
    use confidential_attestation::snp::{SnpTrust, Tcb};
    let mut ek_cas = Vec::new();
    for pem in spec.tpm.iter().flat_map(|t| t.ek_ca_certificates.iter()) {
        ek_cas.extend(confidential_attestation::tpm::parse_certificates(pem)?);
    }
    Ok(confidential_attestation::verify::TrustPolicy {
        evidence_kinds: spec
            .evidence_kinds
            .iter()
            .map(|kind| match kind {
                confidential_api::EvidenceKind::Tpm => EvidenceKind::Tpm,
                confidential_api::EvidenceKind::SevSnp => EvidenceKind::SevSnp,
            })
            .collect(),
        ek_cas,
        snp: spec.snp.as_ref().map(|s| SnpTrust {
            ark_pem: s.ark_certificate.clone().into_bytes(),
            ask_pem: s.ask_certificate.clone().into_bytes(),
            minimum_tcb: Tcb {
                bootloader: s.minimum_tcb.bootloader,
                tee: s.minimum_tcb.tee,
                snp: s.minimum_tcb.snp,
                microcode: s.minimum_tcb.microcode,
            },
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::fixtures::{IMAGE, public_pem, signed_entry, signing_key};
    use confidential_api::AttestationPolicySpec;

    /// Publishers `acme` (key seed 1) and `other` (key seed 2).
    fn policy(entries: Vec<MeasuredImage>, rv: &str) -> Arc<AttestationPolicy> {
        let mut p = AttestationPolicy::new(
            "default",
            AttestationPolicySpec {
                publishers: vec![
                    PublisherKey {
                        name: "acme".into(),
                        public_key: public_pem(&signing_key(1)),
                    },
                    PublisherKey {
                        name: "other".into(),
                        public_key: public_pem(&signing_key(2)),
                    },
                ],
                images: entries,
                ..Default::default()
            },
        );
        p.metadata.resource_version = Some(rv.to_owned());
        Arc::new(p)
    }

    /// `IMAGE` signed by acme, and the same entry claiming publisher `other`
    /// (whose key did not sign it) with another PCR 4 value.
    fn valid_and_forged() -> (MeasuredImage, MeasuredImage) {
        let valid = signed_entry(IMAGE, &signing_key(1));
        let mut forged = valid.clone();
        forged.publisher = "other".into();
        if let Some(m) = forged.measurements.get_mut("4") {
            m.expected = "00".repeat(32);
        }
        (valid, forged)
    }

    /// One image, two entries from two publishers: one entry's verdict must
    /// not answer for the other's, in either order, on the first lookup and
    /// on cached ones.
    #[test]
    fn entries_of_one_image_from_two_publishers_do_not_share_a_cache_slot() {
        let (valid, forged) = valid_and_forged();
        let publishers = policy(vec![], "0").spec.publishers.clone();
        let expected = verify_entry(&publishers, &valid).expect("valid entry");
        for entries in [
            vec![forged.clone(), valid.clone()],
            vec![valid.clone(), forged.clone()],
        ] {
            let cache = TrustCache::default();
            let p = policy(entries, "7");
            for lookup in 0..3 {
                match cache.image_trust(IMAGE, std::slice::from_ref(&p)) {
                    ImageTrust::Trusted { measurements, .. } => {
                        assert_eq!(measurements, expected, "lookup {lookup}");
                    }
                    other => panic!("lookup {lookup}: the valid entry must be found: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_new_policy_version_is_verified_again() {
        let (valid, forged) = valid_and_forged();
        let cache = TrustCache::default();
        assert!(matches!(
            cache.image_trust(IMAGE, &[policy(vec![valid], "7")]),
            ImageTrust::Trusted { .. }
        ));
        assert!(
            matches!(
                cache.image_trust(IMAGE, &[policy(vec![forged], "8")]),
                ImageTrust::Untrusted(_)
            ),
            "the verdict of version 7 answered for version 8"
        );
    }

    #[test]
    fn unlisted_image_is_not_listed() {
        let (valid, _) = valid_and_forged();
        assert_eq!(
            TrustCache::default().image_trust("other-image", &[policy(vec![valid], "1")]),
            ImageTrust::NotListed
        );
    }
}
