//! The join listener's flags and the master-secret file: everything read from
//! the command line and the filesystem before the gate serves, kept apart so
//! the decision and the server never parse flags or files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use confidential_attestation::atls::GateIdentity;
use confidential_attestation::kdf::MasterSecret;

/// Flags of the join listener (flattened into the gate's flags).
#[derive(clap::Args, Debug, Clone)]
pub struct JoinArgs {
    /// Address of the aTLS join listener; join is off when unset.
    #[arg(long = "join-listen", env = "CONFIDENTIAL_JOIN_LISTEN")]
    pub join_listen: Option<SocketAddr>,
    /// JSON file `{"secret": "<hex>", "salt": "<hex>"}`: the cluster master secret.
    #[arg(
        long = "join-master-secret-file",
        env = "CONFIDENTIAL_JOIN_MASTER_SECRET_FILE"
    )]
    pub master_secret_file: Option<PathBuf>,
    /// API server URL handed to joining nodes.
    #[arg(long = "join-api-server", env = "CONFIDENTIAL_JOIN_API_SERVER")]
    pub api_server: Option<String>,
    /// PEM of the cluster CA handed to joining nodes.
    #[arg(long = "join-ca-file", env = "CONFIDENTIAL_JOIN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Name of the AttestationPolicy to enforce.
    #[arg(long = "join-policy", default_value = "default")]
    pub policy: String,
    /// NodeVersion used when a node names no pool.
    #[arg(long = "join-default-pool", default_value = "default")]
    pub default_pool: String,
    /// Lifetime of issued bootstrap tokens.
    #[arg(long = "join-token-ttl-seconds", default_value_t = 900)]
    pub token_ttl_seconds: u64,
    /// Join attempts one source address may start in a burst.
    #[arg(long = "join-attempts-burst", default_value_t = 10)]
    pub attempts_burst: u32,
    /// Join attempts per minute one source address regains after a burst.
    #[arg(long = "join-attempts-per-minute", default_value_t = 30)]
    pub attempts_per_minute: u32,
}

/// Reads a master secret file (`{"secret": hex, "salt": hex}`).
pub fn read_master_secret(path: &Path) -> anyhow::Result<MasterSecret> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    MasterSecret::from_file_json(&text)
        .with_context(|| format!("parsing master secret file {}", path.display()))
}

/// The hex SHA-256 pin of the gate identity every replica derives from the
/// master secret in `path`: what nodes pass as `--gate-pin`.
pub fn gate_pin(path: &Path) -> anyhow::Result<String> {
    let master = read_master_secret(path)?;
    let identity = GateIdentity::derive(&master).context("deriving the gate identity")?;
    Ok(hex::encode(identity.pin()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    #[test]
    fn pin_is_the_pin_of_the_derived_identity() {
        let file = write(&format!(
            r#"{{"secret": "{}", "salt": "{}"}}"#,
            "42".repeat(32),
            hex::encode(b"salt")
        ));
        let master = MasterSecret::new(vec![0x42; 32], b"salt".to_vec()).expect("master");
        let expected = hex::encode(GateIdentity::derive(&master).expect("derives").pin());
        assert_eq!(gate_pin(file.path()).expect("pin"), expected);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, says) in [
            ("not json", "parsing master secret file"),
            (r#"{"secret": "zz", "salt": "00"}"#, "secret is not hex"),
            (r#"{"secret": "00", "salt": "00"}"#, "at least 32"),
        ] {
            let file = write(text);
            let err = format!("{:#}", gate_pin(file.path()).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
        }
        let err = format!(
            "{:#}",
            gate_pin(Path::new("/nonexistent/master")).unwrap_err()
        );
        assert!(err.contains("reading /nonexistent/master"), "{err}");
    }
}
