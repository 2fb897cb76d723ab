//! Measured node images: expected PCR values, their signed file format, and
//! the comparison of measured values with expected ones.
//!
//! A node image is published with a *measurement file*: the image reference and
//! the expected value of each PCR its measured boot extends. The publisher signs
//! the file's canonical bytes with ECDSA P-256 over SHA-256, which is exactly
//! what `cosign sign-blob --key cosign.key file` produces (a base64 DER
//! signature), so publishers can use cosign and we verify with the PEM public
//! key that `cosign generate-key-pair` writes.
//!
//! An image that runs on SEV-SNP also carries its expected launch values
//! (`snp`: the 48-byte launch measurement, the VMPL, and whether SMT and a
//! migration agent are allowed) in the same file, under the same signature,
//! so the host cannot swap them independently of the PCRs. Files without
//! `snp` have exactly the canonical bytes they had before the field existed,
//! so their signatures stay valid.
//!
//! Canonical bytes are the compact JSON of the file with keys in a fixed order
//! and PCR indices as decimal strings in numeric order, followed by one `\n`
//! (a text file, as `compute` writes it). Signing the canonical form (and not
//! whatever bytes a publisher happened to write) lets the cluster store the
//! parsed measurements in an `AttestationPolicy` and still verify the signature
//! later. The file on disk *is* the canonical bytes, so `cosign sign-blob` over
//! the file and our signature over the parsed file sign the same bytes;
//! [`MeasurementFile::from_canonical_json`] refuses any other formatting.
//!
//! Length: about 410 lines of code (one file format, its signature and
//! comparison); the rest are its tests, kept beside it.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snp::launch::SnpLaunchPolicy;

/// Highest PCR index of a TPM 2.0 PC-client PCR bank.
pub const MAX_PCR: u8 = 23;

/// Why measurements or their signature were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeasurementError {
    #[error("PCR index {0:?} is not a number from 0 to 23")]
    BadPcrIndex(String),
    #[error("expected value of PCR {pcr} is not hex: {value:?}")]
    BadHex { pcr: u8, value: String },
    #[error("expected value of PCR {pcr} has {len} bytes; a SHA-256 PCR has 32")]
    BadLength { pcr: u8, len: usize },
    #[error("measurement file is not valid JSON: {0}")]
    BadFile(String),
    #[error(
        "measurement file is not in canonical form (compact JSON, PCRs in numeric order, one trailing newline); \
         signatures are over the canonical bytes: rewrite it with `kubectl confidential measurements compute`"
    )]
    NotCanonical,
    #[error("public key is not a PEM ECDSA P-256 key: {0}")]
    BadPublicKey(String),
    #[error("signature is not base64 DER ECDSA: {0}")]
    BadSignatureEncoding(String),
    #[error("signature does not verify with the publisher key")]
    SignatureMismatch,
    #[error("measurement file is for image {actual:?}, not {expected:?}")]
    WrongImage { expected: String, actual: String },
    #[error("PCR {pcr} mismatch: expected {expected}, measured {actual}")]
    Mismatch {
        pcr: u8,
        expected: String,
        actual: String,
    },
    #[error("PCR {0} is expected but was not measured")]
    Missing(u8),
    #[error("SEV-SNP launch measurement is not 48 bytes of hex: {0:?}")]
    BadSnpMeasurement(String),
}

/// One expected PCR value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Expected {
    /// The expected SHA-256 PCR value.
    #[serde(with = "hex_bytes")]
    pub expected: [u8; 32],
    /// A mismatch is reported as a warning instead of refusing the node.
    #[serde(default)]
    pub warn_only: bool,
}

/// Expected values by PCR index (checked to be 0..=23), and the SEV-SNP
/// launch values when the image runs on SEV-SNP.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Measurements {
    pcrs: BTreeMap<u8, Expected>,
    snp: Option<SnpLaunchPolicy>,
}

impl Measurements {
    /// Builds measurements from parsed values.
    pub fn new(values: BTreeMap<u8, Expected>) -> Result<Self, MeasurementError> {
        if let Some(&pcr) = values.keys().find(|&&pcr| pcr > MAX_PCR) {
            return Err(MeasurementError::BadPcrIndex(pcr.to_string()));
        }
        Ok(Self {
            pcrs: values,
            snp: None,
        })
    }

    /// Adds (or removes) the expected SEV-SNP launch values.
    pub fn with_snp(mut self, snp: Option<SnpLaunchPolicy>) -> Self {
        self.snp = snp;
        self
    }

    /// The expected SEV-SNP launch values, when the image has them.
    pub fn snp(&self) -> Option<&SnpLaunchPolicy> {
        self.snp.as_ref()
    }

    /// Parses `{"<pcr>": ("<hex>", warnOnly)}` as stored in an AttestationPolicy.
    pub fn from_hex_map<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
    ) -> Result<Self, MeasurementError> {
        let mut values = BTreeMap::new();
        for (index, value, warn_only) in entries {
            let pcr = parse_pcr_index(index)?;
            let expected = parse_pcr_value(pcr, value)?;
            values.insert(
                pcr,
                Expected {
                    expected,
                    warn_only,
                },
            );
        }
        Self::new(values)
    }

    /// The PCR indices that are expected, in order.
    pub fn pcrs(&self) -> impl Iterator<Item = u8> + '_ {
        self.pcrs.keys().copied()
    }

    /// Iterates over `(pcr, expected)`.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &Expected)> {
        self.pcrs.iter().map(|(pcr, e)| (*pcr, e))
    }

    pub fn get(&self, pcr: u8) -> Option<&Expected> {
        self.pcrs.get(&pcr)
    }

    /// Whether no PCR is expected.
    pub fn is_empty(&self) -> bool {
        self.pcrs.is_empty()
    }

    /// Compares measured PCR values with the expected ones. A mismatch of a
    /// `warnOnly` PCR becomes a warning; any other mismatch or a missing PCR
    /// refuses. Returns the warnings.
    pub fn compare(
        &self,
        measured: &BTreeMap<u8, [u8; 32]>,
    ) -> Result<Vec<String>, MeasurementError> {
        let mut warnings = Vec::new();
        for (&pcr, expected) in &self.pcrs {
            let Some(actual) = measured.get(&pcr) else {
                if expected.warn_only {
                    warnings.push(format!("PCR {pcr} was not measured (warnOnly)"));
                    continue;
                }
                return Err(MeasurementError::Missing(pcr));
            };
            if actual != &expected.expected {
                let mismatch = MeasurementError::Mismatch {
                    pcr,
                    expected: hex::encode(expected.expected),
                    actual: hex::encode(actual),
                };
                if expected.warn_only {
                    warnings.push(format!("{mismatch} (warnOnly)"));
                } else {
                    return Err(mismatch);
                }
            }
        }
        Ok(warnings)
    }
}

/// Parses a PCR index given as a decimal string.
pub fn parse_pcr_index(index: &str) -> Result<u8, MeasurementError> {
    index
        .parse::<u8>()
        .ok()
        .filter(|pcr| *pcr <= MAX_PCR && index == pcr.to_string())
        .ok_or_else(|| MeasurementError::BadPcrIndex(index.to_owned()))
}

/// Parses a 48-byte SEV-SNP launch measurement given as hex.
pub fn parse_snp_measurement(value: &str) -> Result<[u8; 48], MeasurementError> {
    hex::decode(value)
        .ok()
        .and_then(|bytes| <[u8; 48]>::try_from(bytes).ok())
        .ok_or_else(|| MeasurementError::BadSnpMeasurement(value.to_owned()))
}

/// Parses a 32-byte PCR value given as hex.
pub fn parse_pcr_value(pcr: u8, value: &str) -> Result<[u8; 32], MeasurementError> {
    let bytes = hex::decode(value).map_err(|_| MeasurementError::BadHex {
        pcr,
        value: value.to_owned(),
    })?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| MeasurementError::BadLength { pcr, len })
}

/// The signed unit: an image and its expected measurements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeasurementFile {
    pub image: String,
    pub measurements: Measurements,
}

/// Wire form with fixed key order; PCR keys as strings so JSON objects work.
#[derive(Serialize, Deserialize)]
struct WireFile {
    image: String,
    measurements: BTreeMap<String, Expected>,
    #[serde(default)]
    snp: Option<WireSnp>,
}

/// Wire form of the SEV-SNP launch values.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireSnp {
    measurement: String,
    vmpl: u32,
    #[serde(default)]
    allow_smt: bool,
    #[serde(default)]
    allow_migration_agent: bool,
}

impl MeasurementFile {
    /// The bytes a publisher signs and the file holds: compact JSON, fixed key
    /// order, PCRs in numeric order, one trailing newline.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // BTreeMap<String> would sort "10" before "9"; build the object by hand
        // in numeric order instead.
        let mut out = String::from("{\"image\":");
        out.push_str(&serde_json::Value::String(self.image.clone()).to_string());
        out.push_str(",\"measurements\":{");
        for (i, (pcr, expected)) in self.measurements.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "\"{pcr}\":{{\"expected\":\"{}\",\"warnOnly\":{}}}",
                hex::encode(expected.expected),
                expected.warn_only
            ));
        }
        out.push('}');
        if let Some(snp) = self.measurements.snp() {
            out.push_str(&format!(
                ",\"snp\":{{\"measurement\":\"{}\",\"vmpl\":{},\"allowSmt\":{},\"allowMigrationAgent\":{}}}",
                hex::encode(snp.measurement),
                snp.vmpl,
                snp.allow_smt,
                snp.allow_migration_agent
            ));
        }
        out.push_str("}\n");
        out.into_bytes()
    }

    /// Parses a measurement file (any JSON formatting).
    pub fn from_json(bytes: &[u8]) -> Result<Self, MeasurementError> {
        let wire: WireFile =
            serde_json::from_slice(bytes).map_err(|e| MeasurementError::BadFile(e.to_string()))?;
        let mut values = BTreeMap::new();
        for (index, expected) in wire.measurements {
            values.insert(parse_pcr_index(&index)?, expected);
        }
        let snp = wire
            .snp
            .map(|snp| {
                Ok::<_, MeasurementError>(SnpLaunchPolicy {
                    measurement: parse_snp_measurement(&snp.measurement)?,
                    vmpl: snp.vmpl,
                    allow_smt: snp.allow_smt,
                    allow_migration_agent: snp.allow_migration_agent,
                })
            })
            .transpose()?;
        Ok(Self {
            image: wire.image,
            measurements: Measurements::new(values)?.with_snp(snp),
        })
    }

    /// Parses a measurement file that must be exactly its canonical bytes, as
    /// a signed file on disk is (cosign signs the file's bytes as they are).
    pub fn from_canonical_json(bytes: &[u8]) -> Result<Self, MeasurementError> {
        let file = Self::from_json(bytes)?;
        if file.canonical_bytes() != bytes {
            return Err(MeasurementError::NotCanonical);
        }
        Ok(file)
    }

    /// Signs the canonical bytes as `cosign sign-blob --key` does: ECDSA P-256
    /// over SHA-256, DER, base64.
    pub fn sign(&self, key: &SigningKey) -> String {
        let signature: Signature = key.sign(&self.canonical_bytes());
        B64.encode(signature.to_der().as_bytes())
    }

    /// Verifies a cosign-format signature with a PEM public key.
    pub fn verify(
        &self,
        signature_b64: &str,
        public_key_pem: &str,
    ) -> Result<(), MeasurementError> {
        let key = parse_public_key(public_key_pem)?;
        let der = B64
            .decode(signature_b64.trim())
            .map_err(|e| MeasurementError::BadSignatureEncoding(e.to_string()))?;
        let signature = Signature::from_der(&der)
            .map_err(|e| MeasurementError::BadSignatureEncoding(e.to_string()))?;
        key.verify(&self.canonical_bytes(), &signature)
            .map_err(|_| MeasurementError::SignatureMismatch)
    }

    /// Verifies the signature and that the file is for `image`.
    pub fn verify_for(
        &self,
        image: &str,
        signature_b64: &str,
        public_key_pem: &str,
    ) -> Result<(), MeasurementError> {
        if self.image != image {
            return Err(MeasurementError::WrongImage {
                expected: image.to_owned(),
                actual: self.image.clone(),
            });
        }
        self.verify(signature_b64, public_key_pem)
    }
}

/// Parses a PEM (SubjectPublicKeyInfo) ECDSA P-256 public key.
pub fn parse_public_key(pem: &str) -> Result<VerifyingKey, MeasurementError> {
    VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|e| MeasurementError::BadPublicKey(e.to_string()))
}

/// Replays a measured boot: starting from an all-zero PCR, extends each digest
/// in order (`pcr = SHA-256(pcr || digest)`). The simulated firmware extends the
/// same digests into the TPM, and publishers compute expected values with it.
pub fn replay<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    digests
        .into_iter()
        .fold([0u8; 32], |pcr, digest| extend(&pcr, digest))
}

/// One PCR extend: `SHA-256(pcr || digest)`.
pub fn extend(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(pcr);
    hasher.update(digest);
    hasher.finalize().into()
}

/// The SHA-256 of a component (kernel, initrd, command line...) as measured boot
/// would extend it.
pub fn component_digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl fmt::Display for MeasurementFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.canonical_bytes()))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(D::Error::custom)?;
        let len = bytes.len();
        bytes
            .try_into()
            .map_err(|_| D::Error::custom(format!("expected 32 bytes of hex, got {len}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePublicKey;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).expect("valid scalar")
    }

    fn public_pem(key: &SigningKey) -> String {
        key.verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("encode public key")
    }

    fn file() -> MeasurementFile {
        let mut values = BTreeMap::new();
        for pcr in [4u8, 9, 11] {
            values.insert(
                pcr,
                Expected {
                    expected: [pcr; 32],
                    warn_only: pcr == 9,
                },
            );
        }
        MeasurementFile {
            image: "registry.example/node:v1".into(),
            measurements: Measurements::new(values).expect("valid"),
        }
    }

    #[test]
    fn canonical_bytes_order_pcrs_numerically_and_round_trip() {
        let f = file();
        let text = String::from_utf8(f.canonical_bytes()).expect("utf8");
        let nine = text.find("\"9\"").expect("pcr 9");
        let eleven = text.find("\"11\"").expect("pcr 11");
        assert!(nine < eleven, "{text}");
        assert_eq!(
            MeasurementFile::from_json(text.as_bytes()).expect("parse"),
            f
        );
        assert!(
            text.ends_with("}}\n") && !text.ends_with("\n\n"),
            "{text:?}"
        );
        assert_eq!(
            MeasurementFile::from_canonical_json(text.as_bytes()).expect("canonical"),
            f
        );
        for other in [
            text.trim_end().to_owned(),
            format!("{text}\n"),
            text.replace(':', ": "),
        ] {
            assert_eq!(
                MeasurementFile::from_canonical_json(other.as_bytes()),
                Err(MeasurementError::NotCanonical),
                "{other:?}"
            );
        }
        let pretty = "{ \"measurements\": {\"11\": {\"expected\": \"0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b\"}}, \"image\": \"x\" }";
        let parsed = MeasurementFile::from_json(pretty.as_bytes()).expect("parse pretty");
        assert_eq!(
            parsed.measurements.get(11).map(|e| e.warn_only),
            Some(false)
        );
    }

    #[test]
    fn signature_verifies_and_any_change_breaks_it() {
        let f = file();
        let key = key();
        let signature = f.sign(&key);
        f.verify(&signature, &public_pem(&key))
            .expect("valid signature");
        f.verify_for("registry.example/node:v1", &signature, &public_pem(&key))
            .expect("right image");

        let mut tampered = f.clone();
        tampered.image = "registry.example/node:v2".into();
        assert_eq!(
            tampered.verify(&signature, &public_pem(&key)),
            Err(MeasurementError::SignatureMismatch)
        );
        assert!(matches!(
            f.verify_for("registry.example/node:v2", &signature, &public_pem(&key)),
            Err(MeasurementError::WrongImage { .. })
        ));
        let other = SigningKey::from_slice(&[9u8; 32]).expect("valid scalar");
        assert_eq!(
            f.verify(&signature, &public_pem(&other)),
            Err(MeasurementError::SignatureMismatch)
        );
        assert!(matches!(
            f.verify("not base64!", &public_pem(&key)),
            Err(MeasurementError::BadSignatureEncoding(_))
        ));
        assert!(matches!(
            f.verify(&signature, "garbage"),
            Err(MeasurementError::BadPublicKey(_))
        ));
    }

    fn snp_launch() -> SnpLaunchPolicy {
        SnpLaunchPolicy {
            measurement: [0xab; 48],
            vmpl: 0,
            allow_smt: true,
            allow_migration_agent: false,
        }
    }

    #[test]
    fn files_without_snp_keep_their_bytes_and_signatures() {
        // Canonical bytes of `file()` as they were before the `snp` field
        // existed (the text-file form, one trailing newline): a file without
        // launch values keeps them, so its signature still verifies.
        let f = file();
        let before = format!(
            "{{\"image\":\"registry.example/node:v1\",\"measurements\":{{\"4\":{{\"expected\":\"{}\",\"warnOnly\":false}},\"9\":{{\"expected\":\"{}\",\"warnOnly\":true}},\"11\":{{\"expected\":\"{}\",\"warnOnly\":false}}}}}}\n",
            "04".repeat(32),
            "09".repeat(32),
            "0b".repeat(32)
        );
        assert_eq!(
            String::from_utf8(f.canonical_bytes()).expect("utf8"),
            before
        );
        let signature = f.sign(&key());
        let reparsed = MeasurementFile::from_json(before.as_bytes()).expect("old file parses");
        assert_eq!(reparsed.measurements.snp(), None);
        reparsed
            .verify(&signature, &public_pem(&key()))
            .expect("old signature verifies");
    }

    #[test]
    fn snp_launch_values_are_signed_with_the_pcrs() {
        let mut f = file();
        f.measurements = f.measurements.clone().with_snp(Some(snp_launch()));
        let text = String::from_utf8(f.canonical_bytes()).expect("utf8");
        assert!(
            text.ends_with(&format!(
                ",\"snp\":{{\"measurement\":\"{}\",\"vmpl\":0,\"allowSmt\":true,\"allowMigrationAgent\":false}}}}\n",
                "ab".repeat(48)
            )),
            "{text}"
        );
        assert_eq!(
            MeasurementFile::from_json(text.as_bytes()).expect("parses"),
            f
        );
        let signature = f.sign(&key());
        f.verify(&signature, &public_pem(&key())).expect("verifies");
        // Every launch value is covered: changing one breaks the signature,
        // and so does dropping them or adding them to an unsigned file.
        let edits: [fn(&mut SnpLaunchPolicy); 4] = [
            |s| s.measurement[0] ^= 1,
            |s| s.vmpl = 1,
            |s| s.allow_smt = false,
            |s| s.allow_migration_agent = true,
        ];
        for edit in edits {
            let mut snp = snp_launch();
            edit(&mut snp);
            let mut tampered = f.clone();
            tampered.measurements = tampered.measurements.clone().with_snp(Some(snp));
            assert_eq!(
                tampered.verify(&signature, &public_pem(&key())),
                Err(MeasurementError::SignatureMismatch)
            );
        }
        let mut dropped = f.clone();
        dropped.measurements = dropped.measurements.clone().with_snp(None);
        assert_eq!(
            dropped.verify(&signature, &public_pem(&key())),
            Err(MeasurementError::SignatureMismatch)
        );
        let unsigned = file().sign(&key());
        assert_eq!(
            f.verify(&unsigned, &public_pem(&key())),
            Err(MeasurementError::SignatureMismatch)
        );
    }

    #[test]
    fn bad_snp_values_are_refused() {
        let bad = format!(
            "{{\"image\":\"x\",\"measurements\":{{}},\"snp\":{{\"measurement\":\"{}\",\"vmpl\":0}}}}",
            "ab".repeat(32)
        );
        assert!(matches!(
            MeasurementFile::from_json(bad.as_bytes()),
            Err(MeasurementError::BadSnpMeasurement(_))
        ));
        let unknown = format!(
            "{{\"image\":\"x\",\"measurements\":{{}},\"snp\":{{\"measurement\":\"{}\",\"vmpl\":0,\"debug\":true}}}}",
            "ab".repeat(48)
        );
        assert!(matches!(
            MeasurementFile::from_json(unknown.as_bytes()),
            Err(MeasurementError::BadFile(_))
        ));
        assert!(parse_snp_measurement(&"ab".repeat(48)).is_ok());
    }

    #[test]
    fn compare_honours_warn_only() {
        let f = file();
        let mut measured: BTreeMap<u8, [u8; 32]> = f
            .measurements
            .iter()
            .map(|(p, e)| (p, e.expected))
            .collect();
        assert_eq!(f.measurements.compare(&measured), Ok(vec![]));
        measured.insert(9, [0; 32]);
        let warnings = f
            .measurements
            .compare(&measured)
            .expect("warnOnly mismatch admits");
        assert_eq!(warnings.len(), 1);
        measured.insert(4, [0; 32]);
        assert!(matches!(
            f.measurements.compare(&measured),
            Err(MeasurementError::Mismatch { pcr: 4, .. })
        ));
        measured.remove(&4);
        assert_eq!(
            f.measurements.compare(&measured),
            Err(MeasurementError::Missing(4))
        );
    }

    #[test]
    fn bad_indices_and_values_are_refused() {
        assert!(matches!(
            parse_pcr_index("24"),
            Err(MeasurementError::BadPcrIndex(_))
        ));
        assert!(matches!(
            parse_pcr_index("04"),
            Err(MeasurementError::BadPcrIndex(_))
        ));
        assert!(matches!(
            parse_pcr_index("-1"),
            Err(MeasurementError::BadPcrIndex(_))
        ));
        assert!(matches!(
            parse_pcr_value(4, "zz"),
            Err(MeasurementError::BadHex { .. })
        ));
        assert!(matches!(
            parse_pcr_value(4, "abcd"),
            Err(MeasurementError::BadLength { len: 2, .. })
        ));
        assert!(Measurements::from_hex_map([("4", "00".repeat(32).as_str(), false)]).is_ok());
    }

    #[test]
    fn replay_matches_manual_extends() {
        let a = component_digest(b"kernel");
        let b = component_digest(b"initrd");
        let manual = extend(&extend(&[0; 32], &a), &b);
        assert_eq!(replay([&a, &b]), manual);
        assert_ne!(replay([&b, &a]), manual, "order matters");
    }
}
