//! The master secret: generated here (or given with `--master-secret`),
//! written to a local file only the admin can read, and installed as the
//! Secret the gate reads. Every key of the cluster (disk keys, the cluster
//! ID, the gate's identity) derives from it,
//! so `init` never replaces the one a cluster already holds and never
//! overwrites a local file that may be the only copy of another cluster's.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use confidential_attestation::atls::GateIdentity;
use confidential_attestation::kdf::MasterSecret;
use serde::{Deserialize, Serialize};

/// Bytes of a generated master secret and salt.
const SECRET_BYTES: usize = 32;
const SALT_BYTES: usize = 16;

/// The master-secret file: the format the gate reads
/// (`--join-master-secret-file`), hex-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterSecretFile {
    secret: String,
    salt: String,
}

impl MasterSecretFile {
    /// A fresh secret and salt from the operating system's generator.
    pub fn generate() -> Self {
        let secret: [u8; SECRET_BYTES] = rand::random();
        let salt: [u8; SALT_BYTES] = rand::random();
        Self {
            secret: hex::encode(secret),
            salt: hex::encode(salt),
        }
    }

    /// Parses and checks a master-secret file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let file: Self = serde_json::from_slice(bytes)
            .context(r#"not a master-secret file ({"secret": "<hex>", "salt": "<hex>"})"#)?;
        let normalised = Self {
            secret: file.secret.trim().to_ascii_lowercase(),
            salt: file.salt.trim().to_ascii_lowercase(),
        };
        normalised.master()?;
        Ok(normalised)
    }

    /// Reads and checks the master-secret file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the master secret {}", path.display()))?;
        Self::parse(&bytes).with_context(|| format!("{} is not usable", path.display()))
    }

    /// The key-derivation root, through the one parser the gate and
    /// `recover` use for this file format.
    pub fn master(&self) -> Result<MasterSecret> {
        Ok(MasterSecret::from_file_json(self.to_json().as_bytes())?)
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({ "secret": self.secret, "salt": self.salt }).to_string()
    }
}

/// What the cluster's identity is, as the admin's cluster file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Hex of the cluster ID nodes extend into their cluster-ID PCR.
    pub cluster_id: String,
    /// Hex SHA-256 of the gate's public key, which nodes pin.
    pub gate_pin: String,
}

impl Identity {
    pub fn of(file: &MasterSecretFile) -> Result<Self> {
        let master = file.master()?;
        Ok(Self {
            cluster_id: hex::encode(master.cluster_id()),
            gate_pin: hex::encode(
                GateIdentity::derive(&master)
                    .context("deriving the gate identity")?
                    .pin(),
            ),
        })
    }
}

/// What the local output path holds before `init` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalFile {
    Absent,
    Holds(MasterSecretFile),
    /// Exists but is not a master-secret file (the reason).
    Unreadable(String),
}

impl LocalFile {
    pub fn inspect(path: &Path) -> Self {
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::Absent,
            Err(e) => Self::Unreadable(e.to_string()),
            Ok(bytes) => match MasterSecretFile::parse(&bytes) {
                Ok(file) => Self::Holds(file),
                Err(e) => Self::Unreadable(format!("{e:#}")),
            },
        }
    }
}

/// Which master secret to install, and whether to write the local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterPlan {
    pub secret: MasterSecretFile,
    /// Write the secret to this path (mode 0600, created new).
    pub write: Option<PathBuf>,
}

/// Decides the master secret (pure): the one given with `--master-secret`,
/// else the one the cluster already holds, else a generated one. Refuses to
/// replace the cluster's, and to overwrite a local file holding another.
pub fn plan_master_secret(
    given: Option<MasterSecretFile>,
    in_cluster: Option<MasterSecretFile>,
    out: &Path,
    local: LocalFile,
    generate: impl FnOnce() -> MasterSecretFile,
) -> Result<MasterPlan> {
    let out_text = out.display();
    match (given, in_cluster) {
        (Some(given), Some(cluster)) if given != cluster => bail!(
            "the cluster already holds another master secret (Secret confidential-master-secret); \
             init never replaces it, because the disk keys, the cluster ID and the gate's identity \
             derive from it. Pass the cluster's own master-secret file, or none"
        ),
        (Some(given), _) => Ok(MasterPlan {
            secret: given,
            write: None,
        }),
        (None, Some(cluster)) => match local {
            LocalFile::Holds(file) if file == cluster => Ok(MasterPlan {
                secret: cluster,
                write: None,
            }),
            LocalFile::Absent => Ok(MasterPlan {
                secret: cluster,
                write: Some(out.to_owned()),
            }),
            LocalFile::Holds(_) | LocalFile::Unreadable(_) => bail!(
                "{out_text} holds something other than this cluster's master secret; \
                 refusing to overwrite it (it may be another cluster's only copy). \
                 Move it away or pass --master-secret-out OTHER_FILE"
            ),
        },
        (None, None) => match local {
            LocalFile::Absent => Ok(MasterPlan {
                secret: generate(),
                write: Some(out.to_owned()),
            }),
            LocalFile::Holds(_) | LocalFile::Unreadable(_) => bail!(
                "refusing to overwrite {out_text}: it may be the only copy of another cluster's \
                 master secret. Pass --master-secret {out_text} to install that one, or move it away"
            ),
        },
    }
}

/// Writes `secret` to a new file readable only by its owner; fails if the
/// file exists.
pub fn write_master_secret(path: &Path, secret: &MasterSecretFile) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {}; refusing to overwrite an existing file",
                path.display()
            )
        })?;
    file.write_all(secret.to_json().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> MasterSecretFile {
        MasterSecretFile {
            secret: hex::encode([byte; 32]),
            salt: hex::encode([byte; 16]),
        }
    }

    const OUT: &str = "confidential-master-secret.json";

    #[test]
    fn a_new_cluster_gets_a_generated_secret_written_locally() {
        let plan = plan_master_secret(None, None, Path::new(OUT), LocalFile::Absent, || secret(1))
            .expect("plan");
        assert_eq!(plan.secret, secret(1));
        assert_eq!(plan.write.as_deref(), Some(Path::new(OUT)));
    }

    #[test]
    fn an_existing_local_file_is_never_overwritten() {
        for local in [
            LocalFile::Holds(secret(2)),
            LocalFile::Unreadable("garbage".into()),
        ] {
            let err = plan_master_secret(None, None, Path::new(OUT), local, || secret(1))
                .expect_err("must refuse");
            assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        }
        let err = plan_master_secret(
            None,
            Some(secret(1)),
            Path::new(OUT),
            LocalFile::Holds(secret(2)),
            || secret(3),
        )
        .expect_err("must refuse");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    }

    #[test]
    fn the_clusters_secret_is_kept_and_never_replaced() {
        let plan = plan_master_secret(
            None,
            Some(secret(1)),
            Path::new(OUT),
            LocalFile::Holds(secret(1)),
            || secret(9),
        )
        .expect("second run");
        assert_eq!(plan.secret, secret(1));
        assert_eq!(plan.write, None);
        let plan = plan_master_secret(
            None,
            Some(secret(1)),
            Path::new(OUT),
            LocalFile::Absent,
            || secret(9),
        )
        .expect("restores the local copy");
        assert_eq!(plan.secret, secret(1));
        assert!(plan.write.is_some());
        let err = plan_master_secret(
            Some(secret(2)),
            Some(secret(1)),
            Path::new(OUT),
            LocalFile::Absent,
            || secret(9),
        )
        .expect_err("another secret");
        assert!(err.to_string().contains("never replaces"), "{err}");
        let plan = plan_master_secret(
            Some(secret(1)),
            Some(secret(1)),
            Path::new(OUT),
            LocalFile::Holds(secret(7)),
            || secret(9),
        )
        .expect("the same given secret");
        assert_eq!(plan.write, None);
    }

    #[test]
    fn files_are_parsed_strictly_and_written_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        for bad in [
            &b"{}"[..],
            br#"{"secret":"zz","salt":"00"}"#,
            br#"{"secret":"00","salt":"00"}"#,
            b"not json",
        ] {
            assert!(MasterSecretFile::parse(bad).is_err());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(OUT);
        let generated = MasterSecretFile::generate();
        write_master_secret(&path, &generated).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(MasterSecretFile::read(&path).expect("read"), generated);
        assert!(write_master_secret(&path, &secret(1)).is_err());
        assert_eq!(LocalFile::inspect(&path), LocalFile::Holds(generated));
    }
}
