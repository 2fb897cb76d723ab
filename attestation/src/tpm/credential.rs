//! `TPM2_MakeCredential` in pure Rust for an RSA 2048 EK (TCG default
//! template: name algorithm SHA-256, AES-128-CFB), so the gate can challenge
//! an AK without libtss2. See the module docs of [`crate::tpm`] for why.
//!
//! TPM 2.0 Part 1, 24: seed → OAEP(SHA-256, label "IDENTITY") to the EK;
//! symKey = KDFa(seed, "STORAGE", name); encIdentity = AES-CFB(TPM2B(cred));
//! HMAC key = KDFa(seed, "INTEGRITY"); outer HMAC over encIdentity || name.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rand::RngCore;
use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};
use sha2::Sha256;

use super::verify::TpmError;

type HmacSha256 = Hmac<Sha256>;

/// A credential challenge: give both to `TPM2_ActivateCredential`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Challenge {
    /// Contents of `TPM2B_ID_OBJECT` (integrity HMAC + encrypted identity).
    #[serde(with = "crate::wire::b64")]
    pub credential_blob: Vec<u8>,
    /// Contents of `TPM2B_ENCRYPTED_SECRET` (the OAEP-encrypted seed).
    #[serde(with = "crate::wire::b64")]
    pub secret: Vec<u8>,
}

/// TPM 2.0 KDFa with HMAC-SHA256.
pub fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let len = usize::try_from(bits / 8).unwrap_or(0);
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 1;
    while out.len() < len {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        if label.last() != Some(&0) {
            mac.update(&[0]);
        }
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// Encrypts `credential` (at most 32 bytes) to the EK with SPKI `ek_spki_der`,
/// for the key named `ak_name`.
pub fn make_credential(
    ek_spki_der: &[u8],
    ak_name: &[u8],
    credential: &[u8],
) -> Result<Challenge, TpmError> {
    if credential.len() > 32 {
        return Err(TpmError::EkCertificate(
            "credential longer than a SHA-256 digest".into(),
        ));
    }
    let ek = RsaPublicKey::from_public_key_der(ek_spki_der)
        .map_err(|e| TpmError::EkCertificate(format!("EK is not an RSA key: {e}")))?;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let secret = ek
        .encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|e| TpmError::EkCertificate(format!("OAEP: {e}")))?;

    let sym_key = kdfa(&seed, b"STORAGE", ak_name, &[], 128);
    let mut enc_identity = u16::try_from(credential.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    enc_identity.extend_from_slice(credential);
    cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
        .map_err(|_| TpmError::EkCertificate("AES key length".into()))?
        .encrypt(&mut enc_identity);

    let hmac_key = kdfa(&seed, b"INTEGRITY", &[], &[], 256);
    let mut mac = HmacSha256::new_from_slice(&hmac_key)
        .map_err(|_| TpmError::EkCertificate("HMAC key".into()))?;
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer = mac.finalize().into_bytes();

    let mut blob = 32u16.to_be_bytes().to_vec();
    blob.extend_from_slice(&outer);
    blob.extend_from_slice(&enc_identity);
    Ok(Challenge {
        credential_blob: blob,
        secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_lengths_and_labels() {
        assert_eq!(kdfa(b"k", b"STORAGE", b"n", b"", 128).len(), 16);
        assert_eq!(kdfa(b"k", b"INTEGRITY", b"", b"", 256).len(), 32);
        assert_ne!(
            kdfa(b"k", b"STORAGE", b"n", b"", 256),
            kdfa(b"k", b"INTEGRITY", b"n", b"", 256)
        );
        // The terminating NUL is implied when absent.
        assert_eq!(
            kdfa(b"k", b"A\0", b"", b"", 256),
            kdfa(b"k", b"A", b"", b"", 256)
        );
    }
}
