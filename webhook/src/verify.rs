//! Which node images the cluster trusts: an image is trusted when an
//! `AttestationPolicy` lists it with measurements signed by one of that
//! policy's publisher keys. Signature checking is done by
//! `confidential_attestation::measurements`; this module only finds the entry,
//! builds the measurement file and caches the verdict per policy
//! resourceVersion so a Node review does not verify ECDSA every time.

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

type CacheKey = (String, String, String);

/// Cache of entry verdicts keyed by (policy name, resourceVersion, image).
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
            for entry in policy.spec.images.iter().filter(|e| e.image == image) {
                match self.verdict(policy, entry) {
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
        entry: &MeasuredImage,
    ) -> Result<Measurements, String> {
        let key = match (&policy.metadata.name, &policy.metadata.resource_version) {
            (Some(name), Some(rv)) => Some((name.clone(), rv.clone(), entry.image.clone())),
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
