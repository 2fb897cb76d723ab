//! Pure-Rust verification of a TPM2 quote: the AK's public area and
//! attributes, the ECDSA signature over the exact `TPMS_ATTEST` bytes, the
//! aTLS nonce in `extraData`, the PCR digest against the reported PCR values,
//! and the EK certificate against the trusted EK CAs.

use std::collections::BTreeMap;

use p256::ecdsa::VerifyingKey;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::evidence::TpmEvidence;
use crate::wire::{Reader, WireError};

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ECC_NIST_P256: u16 = 0x0003;
const ATTR_FIXED_TPM: u32 = 1 << 1;
const ATTR_FIXED_PARENT: u32 = 1 << 4;
const ATTR_SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const ATTR_RESTRICTED: u32 = 1 << 16;
const ATTR_SIGN: u32 = 1 << 18;
const AK_REQUIRED: u32 =
    ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_SIGN;

/// Why TPM evidence was refused. [`TpmError::reason`] is the metric label.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TpmError {
    #[error(transparent)]
    Malformed(#[from] WireError),
    #[error("attestation key is not a restricted, fixedTPM ECC P-256 signing key: {0}")]
    AkAttributes(&'static str),
    #[error("quote signature does not verify with the attestation key")]
    Signature,
    #[error("quote is not bound to this connection (nonce mismatch): replayed or relayed")]
    Nonce,
    #[error("PCR values do not match the quoted PCR digest")]
    PcrDigest,
    #[error("EK certificate: {0}")]
    EkCertificate(String),
    #[error("EK certificate is not issued by a trusted EK CA")]
    EkUntrusted,
}

impl TpmError {
    pub fn reason(&self) -> &'static str {
        match self {
            TpmError::Malformed(_) => "malformed-evidence",
            TpmError::AkAttributes(_) => "ak-attributes",
            TpmError::Signature => "quote-signature",
            TpmError::Nonce => "nonce-mismatch",
            TpmError::PcrDigest => "pcr-digest",
            TpmError::EkCertificate(_) => "ek-certificate",
            TpmError::EkUntrusted => "ek-untrusted",
        }
    }
}

/// What a verified quote establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// Quoted SHA-256 PCR values.
    pub pcrs: BTreeMap<u32, [u8; 32]>,
    /// TPM name of the AK (`0x000b || SHA-256(TPMT_PUBLIC)`).
    pub ak_name: Vec<u8>,
    /// Hex SHA-256 of the AK public area: the node's identity.
    pub ak_fingerprint: String,
    /// DER SubjectPublicKeyInfo of the EK (from its certificate).
    pub ek_public: Vec<u8>,
}

/// Parsed `TPMS_ATTEST` of a quote.
#[derive(Debug)]
pub struct QuoteInfo<'a> {
    pub extra_data: &'a [u8],
    pub selected: Vec<u32>,
    pub pcr_digest: &'a [u8],
}

/// Parses the fields of a quote's `TPMS_ATTEST` that the verifier needs.
pub fn parse_attest(attest: &[u8]) -> Result<QuoteInfo<'_>, WireError> {
    let mut r = Reader::new(attest);
    if r.u32("magic")? != TPM_GENERATED_VALUE {
        return Err(WireError("not TPM-generated (magic)"));
    }
    if r.u16("type")? != TPM_ST_ATTEST_QUOTE {
        return Err(WireError("not a quote"));
    }
    r.tpm2b("qualifiedSigner")?;
    let extra_data = r.tpm2b("extraData")?;
    r.take(8 + 4 + 4 + 1, "clockInfo")?;
    r.u64("firmwareVersion")?;
    let count = r.u32("pcrSelect.count")?;
    if count > 16 {
        return Err(WireError("too many PCR selections"));
    }
    let mut selected = Vec::new();
    for _ in 0..count {
        if r.u16("pcrSelect.hash")? != TPM_ALG_SHA256 {
            return Err(WireError("PCR bank is not SHA-256"));
        }
        let size = r.u8("sizeofSelect")?;
        let bitmap = r.take(usize::from(size), "pcrSelect")?;
        for (byte_index, byte) in bitmap.iter().enumerate() {
            for bit in 0..8u32 {
                if byte & (1 << bit) != 0 {
                    let index = u32::try_from(byte_index)
                        .unwrap_or(u32::MAX)
                        .saturating_mul(8)
                        + bit;
                    if selected.contains(&index) {
                        return Err(WireError("PCR selected twice"));
                    }
                    selected.push(index);
                }
            }
        }
    }
    let pcr_digest = r.tpm2b("pcrDigest")?;
    if !r.is_empty() {
        return Err(WireError("trailing bytes after TPMS_ATTEST"));
    }
    Ok(QuoteInfo {
        extra_data,
        selected,
        pcr_digest,
    })
}

/// Parses an ECC P-256 restricted signing key's `TPMT_PUBLIC`.
pub fn parse_ak_public(public: &[u8]) -> Result<VerifyingKey, TpmError> {
    let mut r = Reader::new(public);
    if r.u16("type")? != TPM_ALG_ECC {
        return Err(TpmError::AkAttributes("not an ECC key"));
    }
    if r.u16("nameAlg")? != TPM_ALG_SHA256 {
        return Err(TpmError::AkAttributes("name algorithm is not SHA-256"));
    }
    let attributes = r.u32("objectAttributes")?;
    if attributes & AK_REQUIRED != AK_REQUIRED {
        return Err(TpmError::AkAttributes(
            "missing fixedTPM/fixedParent/sensitiveDataOrigin/restricted/sign",
        ));
    }
    r.tpm2b("authPolicy")?;
    if r.u16("symmetric")? != TPM_ALG_NULL {
        return Err(TpmError::AkAttributes(
            "a signing key has no symmetric algorithm",
        ));
    }
    let scheme = r.u16("scheme")?;
    if scheme != TPM_ALG_NULL {
        r.u16("scheme.hash")?;
    }
    if r.u16("curve")? != TPM_ECC_NIST_P256 {
        return Err(TpmError::AkAttributes("curve is not NIST P-256"));
    }
    if r.u16("kdf")? != TPM_ALG_NULL {
        r.u16("kdf.hash")?;
    }
    let x = r.tpm2b("x")?;
    let y = r.tpm2b("y")?;
    if x.len() != 32 || y.len() != 32 || !r.is_empty() {
        return Err(TpmError::AkAttributes("malformed P-256 point"));
    }
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(4);
    sec1.extend_from_slice(x);
    sec1.extend_from_slice(y);
    VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| TpmError::AkAttributes("point not on curve"))
}

/// The TPM name of a public area with name algorithm SHA-256.
pub fn tpm_name(public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(public));
    name
}

/// DER certificates from concatenated PEM blocks.
pub fn parse_certificates(pem: &str) -> Result<Vec<Vec<u8>>, TpmError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| TpmError::EkCertificate(format!("PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

/// Checks the EK certificate was signed by one of `trusted` (DER) and fits
/// the TCG EK profile now ([`super::ek::check_ek_profile`]: validity, not a
/// CA, key usage), and returns its SubjectPublicKeyInfo. Every listed CA is a
/// trust anchor.
pub fn verify_ek_certificate(ek_der: &[u8], trusted: &[Vec<u8>]) -> Result<Vec<u8>, TpmError> {
    let (_, ek) = x509_parser::parse_x509_certificate(ek_der)
        .map_err(|e| TpmError::EkCertificate(e.to_string()))?;
    for ca_der in trusted {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca_der) else {
            continue;
        };
        if ca.subject() == ek.issuer() && ek.verify_signature(Some(ca.public_key())).is_ok() {
            super::ek::check_ek_profile(&ek, x509_parser::time::ASN1Time::now())
                .map_err(|e| TpmError::EkCertificate(e.to_string()))?;
            return Ok(ek.public_key().raw.to_vec());
        }
    }
    Err(TpmError::EkUntrusted)
}

/// Verifies TPM evidence bound to `nonce`, with EK trust anchors `ek_cas`.
pub fn verify_quote(
    evidence: &TpmEvidence,
    nonce: &[u8; 32],
    ek_cas: &[Vec<u8>],
) -> Result<VerifiedQuote, TpmError> {
    let ak = parse_ak_public(&evidence.ak_public)?;
    // ring's P-256 verification is several times faster than the pure-Rust
    // one; the key was validated on the curve by `parse_ak_public`.
    if evidence.signature.len() != 64 {
        return Err(TpmError::Signature);
    }
    let point = ak.to_encoded_point(false);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        point.as_bytes(),
    )
    .verify(&evidence.attest, &evidence.signature)
    .map_err(|_| TpmError::Signature)?;
    let info = parse_attest(&evidence.attest)?;
    if info.extra_data != nonce {
        return Err(TpmError::Nonce);
    }
    let mut selected = info.selected.clone();
    selected.sort_unstable();
    if selected != evidence.pcrs.keys().copied().collect::<Vec<_>>() {
        return Err(TpmError::PcrDigest);
    }
    let mut pcrs = BTreeMap::new();
    let mut h = Sha256::new();
    for index in &info.selected {
        let value: [u8; 32] = evidence
            .pcrs
            .get(index)
            .and_then(|v| v.as_slice().try_into().ok())
            .ok_or(TpmError::PcrDigest)?;
        h.update(value);
        pcrs.insert(*index, value);
    }
    if h.finalize()[..] != *info.pcr_digest {
        return Err(TpmError::PcrDigest);
    }
    let ek_public = verify_ek_certificate(&evidence.ek_certificate, ek_cas)?;
    Ok(VerifiedQuote {
        pcrs,
        ak_name: tpm_name(&evidence.ak_public),
        ak_fingerprint: hex::encode(Sha256::digest(&evidence.ak_public)),
        ek_public,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real swtpm quote over nonce `[0x11; 32]` (regenerate with the
    /// ignored `write_quote_fixture` test in `e2e/tests/tpm.rs`).
    fn fixture() -> (TpmEvidence, Vec<Vec<u8>>) {
        let ev = serde_json::from_str(include_str!("../../testdata/tpm/quote.json"))
            .expect("fixture parses");
        let cas = parse_certificates(include_str!("../../testdata/tpm/ek-ca.pem")).expect("CA");
        (ev, cas)
    }

    #[test]
    fn recorded_swtpm_quote_verifies() {
        let (ev, cas) = fixture();
        let v = verify_quote(&ev, &[0x11; 32], &cas).expect("verifies");
        let pcr4 = include_str!("../../testdata/tpm/image-pcr4.hex").trim();
        assert_eq!(v.pcrs.get(&4).map(hex::encode).as_deref(), Some(pcr4));
        assert_eq!(v.ak_name.len(), 34);
    }

    #[test]
    fn every_field_is_checked() {
        let (ev, cas) = fixture();
        assert_eq!(verify_quote(&ev, &[0x12; 32], &cas), Err(TpmError::Nonce));
        let mut bad = ev.clone();
        bad.signature[5] ^= 1;
        assert_eq!(
            verify_quote(&bad, &[0x11; 32], &cas),
            Err(TpmError::Signature)
        );
        let mut bad = ev.clone();
        bad.pcrs.remove(&7);
        assert_eq!(
            verify_quote(&bad, &[0x11; 32], &cas),
            Err(TpmError::PcrDigest)
        );
        let mut bad = ev.clone();
        // Clear the `restricted` attribute: such a key could sign forged quotes.
        bad.ak_public[5] &= !0x01;
        assert!(matches!(
            verify_quote(&bad, &[0x11; 32], &cas),
            Err(TpmError::AkAttributes(_))
        ));
        assert_eq!(
            verify_quote(&ev, &[0x11; 32], &[]),
            Err(TpmError::EkUntrusted)
        );
    }

    #[test]
    fn attest_parser_refuses_garbage() {
        assert!(parse_attest(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x17]).is_err());
        assert!(parse_attest(&[]).is_err());
    }
}
