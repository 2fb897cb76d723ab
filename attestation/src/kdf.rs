//! Key derivation: every cluster key is HKDF-SHA256 from the master secret and
//! salt that `init` generates, with info `key-<id>`. Deriving instead of
//! storing means the gate can hand a rebooting node its disk key again without
//! a key database, and a recovered control plane can re-derive everything from
//! the master secret alone.

use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;

/// Minimum master secret length.
pub const MIN_MASTER_SECRET: usize = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KdfError {
    #[error("master secret is {0} bytes; at least {MIN_MASTER_SECRET} are required")]
    ShortSecret(usize),
    #[error("cannot derive {0} bytes")]
    TooLong(usize),
}

/// Why a master secret file was refused.
#[derive(Debug, Error)]
pub enum MasterFileError {
    #[error("not a master secret file ({{\"secret\": \"<hex>\", \"salt\": \"<hex>\"}}): {0}")]
    Json(#[from] serde_json::Error),
    #[error("{field} is not hex: {source}")]
    Hex {
        field: &'static str,
        #[source]
        source: hex::FromHexError,
    },
    #[error(transparent)]
    Kdf(#[from] KdfError),
}

/// The master secret file `init` writes and the gate reads:
/// `{"secret": "<hex>", "salt": "<hex>"}` (other fields are ignored).
#[derive(serde::Deserialize)]
struct MasterFile {
    secret: String,
    salt: String,
}

/// The cluster's master secret and salt.
#[derive(Clone)]
pub struct MasterSecret {
    secret: Vec<u8>,
    salt: Vec<u8>,
}

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

/// Whether `s` is a disk UUID as the node names it: 8-4-4-4-12 hex digits.
/// A disk key is derived from it, so anything else is refused rather than
/// derived for (the node checks its own flag, `recover` the node's claim).
pub fn is_valid_disk_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl MasterSecret {
    pub fn new(secret: Vec<u8>, salt: Vec<u8>) -> Result<Self, KdfError> {
        if secret.len() < MIN_MASTER_SECRET {
            return Err(KdfError::ShortSecret(secret.len()));
        }
        Ok(Self { secret, salt })
    }

    /// Parses the JSON of a master secret file (`{"secret": hex, "salt": hex}`).
    pub fn from_file_json(text: &[u8]) -> Result<Self, MasterFileError> {
        let file: MasterFile = serde_json::from_slice(text)?;
        let decode = |field: &'static str, value: &str| {
            hex::decode(value.trim()).map_err(|source| MasterFileError::Hex { field, source })
        };
        Ok(Self::new(
            decode("secret", &file.secret)?,
            decode("salt", &file.salt)?,
        )?)
    }

    /// Derives `len` bytes for `key-<id>`.
    pub fn derive(&self, id: &str, len: usize) -> Result<Vec<u8>, KdfError> {
        let hk = Hkdf::<Sha256>::new(Some(&self.salt), &self.secret);
        let mut out = vec![0u8; len];
        hk.expand(format!("key-{id}").as_bytes(), &mut out)
            .map_err(|_| KdfError::TooLong(len))?;
        Ok(out)
    }

    fn derive32(&self, id: &str) -> [u8; 32] {
        let hk = Hkdf::<Sha256>::new(Some(&self.salt), &self.secret);
        let mut out = [0u8; 32];
        hk.expand(format!("key-{id}").as_bytes(), &mut out)
            .expect("32 bytes is within HKDF-SHA256's 8160-byte output limit");
        out
    }

    /// Key of the state disk with this UUID (`key-disk-<uuid>`).
    pub fn disk_key(&self, disk_uuid: &str) -> [u8; 32] {
        self.derive32(&format!("disk-{}", disk_uuid.to_ascii_lowercase()))
    }

    /// Key of state disk `disk_uuid` of the machine attesting as `identity`
    /// (its AK fingerprint or SNP identity): `key-disk-<identity>/<uuid>`.
    /// The gate hands it at join and `kubectl confidential recover` at
    /// recovery; both call this one derivation. A machine naming another
    /// machine's disk gets another key.
    pub fn node_disk_key(&self, identity: &str, disk_uuid: &str) -> [u8; 32] {
        self.disk_key(&format!("{identity}/{disk_uuid}"))
    }

    /// The cluster ID nodes extend into a PCR after joining.
    pub fn cluster_id(&self) -> [u8; 32] {
        self.derive32("cluster-id")
    }

    /// The gate's stable identity key (`key-gate-identity`, a P-256 scalar).
    /// Every gate replica derives the same key, so nodes can pin it
    /// ([`crate::atls::GateIdentity::pin`]) in their launch configuration.
    /// A derived value that is not a valid scalar (probability ~2^-128) is
    /// re-derived with a counter.
    pub fn gate_identity_key(&self) -> p256::SecretKey {
        (0u32..)
            .find_map(|i| {
                let id = if i == 0 {
                    "gate-identity".to_owned()
                } else {
                    format!("gate-identity-{i}")
                };
                p256::SecretKey::from_slice(&self.derive32(&id)).ok()
            })
            .expect("a valid P-256 scalar is found within a few tries")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterSecret {
        MasterSecret::new(vec![7; 32], b"salt".to_vec()).expect("long enough")
    }

    #[test]
    fn refuses_short_secret() {
        assert_eq!(
            MasterSecret::new(vec![0; 31], vec![]).err(),
            Some(KdfError::ShortSecret(31))
        );
    }

    #[test]
    fn derivations_are_deterministic_and_distinct() {
        let m = master();
        assert_eq!(m.disk_key("ABC"), master().disk_key("abc"));
        assert_ne!(m.disk_key("a"), m.disk_key("b"));
        assert_ne!(m.disk_key("cluster-id")[..], m.cluster_id()[..]);
        let other = MasterSecret::new(vec![7; 32], b"pepper".to_vec()).expect("ok");
        assert_ne!(m.cluster_id(), other.cluster_id());
        assert_eq!(m.derive("cluster-id", 32).expect("ok"), m.cluster_id());
    }

    #[test]
    fn master_file_parses_and_says_what_is_wrong() {
        let text = format!(
            r#"{{"secret": "{}", "salt": "{}"}}"#,
            "07".repeat(32),
            hex::encode(b"salt")
        );
        let parsed = MasterSecret::from_file_json(text.as_bytes()).expect("valid");
        assert_eq!(parsed.cluster_id(), master().cluster_id());
        for (text, says) in [
            ("not json", "not a master secret file"),
            (r#"{"secret": "zz", "salt": "00"}"#, "secret is not hex"),
            (r#"{"secret": "00", "salt": "0"}"#, "salt is not hex"),
            (r#"{"secret": "00", "salt": "00"}"#, "at least 32"),
        ] {
            let err = MasterSecret::from_file_json(text.as_bytes()).expect_err(text);
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn node_disk_key_binds_identity_and_disk() {
        let m = master();
        assert_eq!(m.node_disk_key("ab", "D-1"), m.disk_key("ab/d-1"));
        assert_ne!(m.node_disk_key("ab", "d-1"), m.node_disk_key("cd", "d-1"));
        assert_ne!(m.node_disk_key("ab", "d-1"), m.node_disk_key("ab", "d-2"));
    }

    #[test]
    fn known_answer() {
        // HKDF-SHA256(salt "salt", ikm 32×0x07, info "key-cluster-id"),
        // computed independently; pinned so a refactor cannot silently change
        // every cluster's keys.
        assert_eq!(
            hex::encode(master().cluster_id()),
            "5b8347292859ff11a4bb14b76c8b69849a5d7c4937e2714de1ad2175f136f28e"
        );
        // info "key-disk-ab12/5e1f0000-0000-4000-8000-000000000001".
        assert_eq!(
            hex::encode(master().node_disk_key("ab12", "5e1f0000-0000-4000-8000-000000000001")),
            "b6980d4305940908a0f0c5c37c5a8488fbd20c404330ebfbc7c4e47580be0be4"
        );
    }
}
