//! Evidence as it travels from a node to a verifier.
//!
//! Evidence keeps the bytes exactly as the TPM or the AMD secure processor
//! produced them (signatures are over those bytes, so re-encoding would break
//! them). The JSON envelope carries a `version`: a verifier refuses versions
//! it does not know instead of guessing, and fields are only ever added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::{b64, hex_map};

/// The current evidence format version.
pub const EVIDENCE_VERSION: u32 = 1;

/// Versioned wrapper around [`Evidence`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceEnvelope {
    pub version: u32,
    pub evidence: Evidence,
}

impl EvidenceEnvelope {
    pub fn new(evidence: Evidence) -> Self {
        Self {
            version: EVIDENCE_VERSION,
            evidence,
        }
    }
}

/// What a node presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Evidence {
    /// A TPM 2.0 quote (vTPM or simulated).
    Tpm(TpmEvidence),
    /// An AMD SEV-SNP attestation report with its VCEK.
    SevSnp(SnpEvidence),
}

/// The kinds of evidence a verifier knows. A closed set: a policy cannot
/// name a kind no verifier checks, and a match over kinds is exhaustive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvidenceKind {
    /// A TPM 2.0 quote.
    Tpm,
    /// An AMD SEV-SNP attestation report.
    SevSnp,
}

impl EvidenceKind {
    /// Every kind, for exhaustive tests and property generators.
    pub const ALL: [EvidenceKind; 2] = [EvidenceKind::Tpm, EvidenceKind::SevSnp];

    /// The kind's name on the wire and in metric labels (`tpm`, `sev-snp`).
    pub fn name(self) -> &'static str {
        match self {
            EvidenceKind::Tpm => "tpm",
            EvidenceKind::SevSnp => "sev-snp",
        }
    }
}

impl std::fmt::Display for EvidenceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Evidence {
    /// The kind of this evidence.
    pub fn kind(&self) -> EvidenceKind {
        match self {
            Evidence::Tpm(_) => EvidenceKind::Tpm,
            Evidence::SevSnp(_) => EvidenceKind::SevSnp,
        }
    }
}

/// A TPM2_Quote and what is needed to trust its signer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmEvidence {
    /// Marshalled `TPMS_ATTEST` exactly as TPM2_Quote returned it.
    #[serde(with = "b64")]
    pub attest: Vec<u8>,
    /// ECDSA P-256 signature over SHA-256(`attest`): `r || s`, 32 bytes each.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    /// Quoted SHA-256 PCR values, index → 32 bytes.
    #[serde(with = "hex_map")]
    pub pcrs: BTreeMap<u32, Vec<u8>>,
    /// Marshalled `TPMT_PUBLIC` of the attestation key (its TPM name is the
    /// SHA-256 of these bytes).
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
    /// DER EK certificate (RSA 2048 EK) read from the TPM's NV index.
    #[serde(with = "b64")]
    pub ek_certificate: Vec<u8>,
}

/// An SEV-SNP attestation report and its chip's VCEK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnpEvidence {
    /// The raw 1184-byte report from `/dev/sev-guest`.
    #[serde(with = "b64")]
    pub report: Vec<u8>,
    /// DER VCEK certificate for this chip and TCB.
    #[serde(with = "b64")]
    pub vcek: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_serialisation_is_stable() {
        let env = EvidenceEnvelope::new(Evidence::Tpm(TpmEvidence {
            attest: vec![1, 2],
            signature: vec![3],
            pcrs: BTreeMap::from([(7, vec![0xab; 2])]),
            ak_public: vec![4],
            ek_certificate: vec![5],
        }));
        let json = serde_json::to_string(&env).expect("serialises");
        assert_eq!(
            json,
            r#"{"version":1,"evidence":{"kind":"tpm","attest":"AQI=","signature":"Aw==","pcrs":{"7":"abab"},"akPublic":"BA==","ekCertificate":"BQ=="}}"#
        );
        let back: EvidenceEnvelope = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, env);
    }

    #[test]
    fn kind_names_match_the_wire_tag() {
        for kind in EvidenceKind::ALL {
            let evidence = match kind {
                EvidenceKind::Tpm => Evidence::Tpm(TpmEvidence {
                    attest: vec![],
                    signature: vec![],
                    pcrs: BTreeMap::new(),
                    ak_public: vec![],
                    ek_certificate: vec![],
                }),
                EvidenceKind::SevSnp => Evidence::SevSnp(SnpEvidence {
                    report: vec![],
                    vcek: vec![],
                }),
            };
            assert_eq!(evidence.kind(), kind);
            let json = serde_json::to_value(&evidence).expect("serialises");
            assert_eq!(json["kind"], kind.name());
        }
    }
}
