//! The trust material of every suite, made one way: a publisher key, a
//! measurement file signed with the product's own
//! [`MeasurementFile::sign`], the `AttestationPolicy` entry that lists it, and
//! the policy spec trusting the publisher. The gate verifies these entries
//! with its own code (`confidential_webhook::verify`), so a fixture that
//! built an entry differently from how the product reads it fails every
//! suite that uses it instead of passing silently.
//!
//! Before this module, six copies of "sign a measured image / build an
//! AttestationPolicy" lived in the webhook's unit tests and suites, the
//! end-to-end suites, the plugin's suites and the playground.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use confidential_api::{
    AttestationPolicySpec, EvidenceKind, MeasuredImage, PublisherKey, TpmTrust,
};
use confidential_attestation::measurements::{Expected, MeasurementFile, Measurements};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePublicKey, LineEnding};

use crate::node::{IMAGE_PCR, NodeImage};

/// A publisher of node images: a name (as the policy lists it) and its
/// signing key.
#[derive(Clone)]
pub struct Publisher {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher with a fresh random key.
    pub fn random(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            key: SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng),
        }
    }

    /// A publisher whose key is the scalar `[seed; 32]`: the same key on
    /// every run, for decision tests that compare keys by seed.
    pub fn seeded(name: &str, seed: u8) -> Self {
        Self {
            name: name.to_owned(),
            key: seeded_key(seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The public key, PEM (SubjectPublicKeyInfo), as publishers ship it.
    pub fn public_pem(&self) -> String {
        public_pem(&self.key)
    }

    /// The policy's `publishers` entry trusting this publisher.
    pub fn trusted(&self) -> PublisherKey {
        PublisherKey {
            name: self.name.clone(),
            public_key: self.public_pem(),
        }
    }

    /// The signature (base64 DER ECDSA over the canonical bytes) of `file`.
    pub fn sign(&self, file: &MeasurementFile) -> String {
        file.sign(&self.key)
    }

    /// The policy entry listing `file`, signed by this publisher.
    pub fn entry(&self, file: &MeasurementFile) -> MeasuredImage {
        entry(file, &self.name, &self.sign(file))
    }

    /// Writes `path` (the canonical bytes, exactly what is signed), its
    /// signature `path.sig`, as `kubectl confidential measurements sign`
    /// does.
    pub fn write_signed(&self, path: &Path, file: &MeasurementFile) -> Result<()> {
        std::fs::write(path, file.canonical_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        let sig = format!("{}.sig", path.display());
        std::fs::write(&sig, self.sign(file) + "\n").with_context(|| format!("writing {sig}"))
    }

    /// Writes the public key (PEM) to `path`.
    pub fn write_public_key(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.public_pem())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The P-256 key whose scalar is `[seed; 32]` (`seed` 0 is not a valid
/// scalar).
pub fn seeded_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32].into()).expect("[seed; 32] is a valid P-256 scalar")
}

/// The PEM (SubjectPublicKeyInfo) of `key`'s public key.
pub fn public_pem(key: &SigningKey) -> String {
    key.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a P-256 public key encodes as PEM")
}

/// A measurement file for `image` with `(pcr, expected, warnOnly)` values.
pub fn measurement_file(image: &str, pcrs: &[(u8, [u8; 32], bool)]) -> MeasurementFile {
    let values = pcrs
        .iter()
        .map(|&(pcr, expected, warn_only)| {
            (
                pcr,
                Expected {
                    expected,
                    warn_only,
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    MeasurementFile {
        image: image.to_owned(),
        measurements: Measurements::new(values).expect("fixture PCR indices are below 24"),
    }
}

/// The measurement file of a simulated node image: [`IMAGE_PCR`] enforced
/// at the value its firmware measures.
pub fn node_image_file(image: &NodeImage) -> MeasurementFile {
    let pcr = u8::try_from(IMAGE_PCR).expect("IMAGE_PCR is a PCR index");
    measurement_file(&image.name, &[(pcr, image.expected_pcr(), false)])
}

/// The policy entry listing `file` under `publisher` with `signature`:
/// the signed canonical bytes themselves (they have the entry's shape:
/// image, measurements, SEV-SNP launch values) plus who signed them.
pub fn entry(file: &MeasurementFile, publisher: &str, signature: &str) -> MeasuredImage {
    let mut value: serde_json::Value =
        serde_json::from_slice(&file.canonical_bytes()).expect("canonical bytes are JSON");
    value["publisher"] = publisher.into();
    value["signature"] = signature.into();
    serde_json::from_value(value).expect("a measurement file has the shape of a policy entry")
}

/// A TPM policy trusting `publishers` with `images`; `ek_ca_pem`, when
/// given, is the EK CA it trusts (the swtpm local CA in the suites).
pub fn policy_spec(
    ek_ca_pem: Option<&str>,
    publishers: &[&Publisher],
    images: Vec<MeasuredImage>,
) -> AttestationPolicySpec {
    AttestationPolicySpec {
        evidence_kinds: vec![EvidenceKind::Tpm],
        tpm: ek_ca_pem.map(|pem| TpmTrust {
            ek_ca_certificates: vec![pem.to_owned()],
        }),
        publishers: publishers.iter().map(|p| p.trusted()).collect(),
        images,
        reattestation_interval: Some("24h".to_owned()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_verifies_with_its_publishers_key_and_no_other() {
        let image = NodeImage::new("registry.example/node:v1");
        let file = node_image_file(&image);
        let acme = Publisher::seeded("acme", 1);
        let entry = acme.entry(&file);
        assert_eq!(entry.publisher, "acme");
        assert_eq!(
            entry.measurements["4"].expected,
            hex::encode(image.expected_pcr())
        );
        file.verify(&entry.signature, &acme.public_pem())
            .expect("verifies with the publisher's key");
        let rogue = Publisher::random("rogue");
        assert!(file.verify(&entry.signature, &rogue.public_pem()).is_err());
    }
}
