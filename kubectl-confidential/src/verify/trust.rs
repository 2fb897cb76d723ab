//! What `verify` trusts, read only from local files the admin controls: the
//! publisher-signed measurement files (signature checked here, with the
//! publisher key given on the command line), the cluster ID (from the cluster
//! file `init` writes, or `--cluster-id`) and the TPM EK CA certificates.
//! Nothing here comes from the cluster being verified: a compromised cluster
//! could otherwise tell the verifier what to expect.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use confidential_attestation::measurements::{MeasurementFile, extend};
use serde::{Deserialize, Serialize};

/// The local cluster file: what an admin keeps about a cluster to verify it
/// later. `init` writes it; `verify` reads `clusterId`.
///
/// ```json
/// {"clusterId": "<64 hex>", "gateEndpoint": "203.0.113.7:30443", "gatePin": "<64 hex>"}
/// ```
/// - `clusterId`: hex of the 32-byte cluster ID (HKDF of the master secret)
///   that every node extends into its cluster-ID PCR after joining;
/// - `gateEndpoint`: where machines reach the gate's join endpoint;
/// - `gatePin`: hex SHA-256 of the gate's SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterFile {
    pub cluster_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_pin: Option<String>,
    /// The images `init` installed: repository -> digest.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub images: std::collections::BTreeMap<String, String>,
}

/// Parses 32 bytes of hex (a cluster ID, a pin).
pub fn parse_hex32(what: &str, text: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text.trim()).with_context(|| format!("{what} is not hex"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("{what} has {} bytes; it must have 32", bytes.len()))
}

impl ClusterFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the cluster file {}", path.display()))?;
        let file: Self = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a cluster file ({{\"clusterId\": \"<hex>\", ...}})",
                path.display()
            )
        })?;
        parse_hex32(
            &format!("clusterId in {}", path.display()),
            &file.cluster_id,
        )?;
        Ok(file)
    }
}

/// One publisher-signed measurement file whose signature verified.
#[derive(Debug, Clone)]
pub struct TrustedFile {
    pub path: PathBuf,
    pub file: MeasurementFile,
}

/// The local trust inputs `verify` and `recover` share: what a node must
/// have booted (publisher-signed measurement files) and which TPMs count
/// (EK CAs). Never read from the cluster or the node.
#[derive(clap::Args, Debug, Clone)]
pub struct TrustArgs {
    /// Publisher-signed measurement file of a trusted node image
    /// (repeatable); its signature is read from FILE.sig unless --signature.
    #[arg(long = "measurements", value_name = "FILE", required = true)]
    pub measurements: Vec<PathBuf>,
    /// Signature of the (single) measurement file: base64, or @FILE.
    #[arg(long)]
    pub signature: Option<String>,
    /// The image publisher's public key (PEM, as `cosign generate-key-pair` writes it).
    #[arg(long, value_name = "FILE")]
    pub publisher_key: PathBuf,
    /// PEM certificates of the TPM EK CAs to trust (repeatable).
    #[arg(long = "ek-ca", value_name = "FILE", required = true)]
    pub ek_ca: Vec<PathBuf>,
    /// The PCR the nodes extend with the cluster ID.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u8).range(0..=23))]
    pub cluster_id_pcr: u8,
}

impl TrustArgs {
    /// Reads and checks the files (signatures verified here) into the
    /// [`Trust`] nodes of the cluster `cluster_id` are compared with.
    pub fn load(&self, cluster_id: [u8; 32]) -> Result<Trust> {
        Ok(Trust {
            files: read_signed_files(
                &self.measurements,
                self.signature.as_deref(),
                &self.publisher_key,
            )?,
            cluster_id,
            cluster_id_pcr: self.cluster_id_pcr,
            ek_cas: read_ek_cas(&self.ek_ca)?,
        })
    }
}

/// Everything `verify` compares the nodes' evidence with.
#[derive(Debug, Clone)]
pub struct Trust {
    /// Trusted images' expected measurements, in the order given.
    pub files: Vec<TrustedFile>,
    pub cluster_id: [u8; 32],
    /// The PCR the bootstrapper extends with the cluster ID.
    pub cluster_id_pcr: u8,
    /// DER certificates of the trusted TPM EK CAs.
    pub ek_cas: Vec<Vec<u8>>,
}

impl Trust {
    /// The value of the cluster-ID PCR of a node of this cluster: one extend
    /// of the cluster ID from zero (the bootstrapper extends it once, after
    /// joining).
    pub fn expected_cluster_pcr(&self) -> [u8; 32] {
        extend(&[0; 32], &self.cluster_id)
    }
}

/// Reads a signature given as base64 text or `@path` (what `cosign sign-blob
/// --output-signature` writes).
pub fn read_signature(value: &str) -> Result<String> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("reading the signature {path}")),
        None => Ok(value.trim().to_owned()),
    }
}

/// Reads a measurement file that must be canonical and signed by
/// `public_key_pem`; `signature` defaults to `<file>.sig`.
pub fn read_signed_file(
    path: &Path,
    signature: Option<&str>,
    public_key_pem: &str,
    key_path: &Path,
) -> Result<TrustedFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = MeasurementFile::from_canonical_json(&bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    let signature = match signature {
        Some(value) => read_signature(value)?,
        None => {
            let default = format!("{}.sig", path.display());
            read_signature(&format!("@{default}"))
                .with_context(|| format!("no signature for {}; pass --signature", path.display()))?
        }
    };
    file.verify(&signature, public_key_pem).with_context(|| {
        format!(
            "{} is not signed by the publisher key {}; nothing from it is trusted",
            path.display(),
            key_path.display()
        )
    })?;
    Ok(TrustedFile {
        path: path.to_owned(),
        file,
    })
}

/// Reads the publisher key and every measurement file signed by it (each
/// file's signature from `FILE.sig`, or `signature` for a single file).
pub fn read_signed_files(
    paths: &[PathBuf],
    signature: Option<&str>,
    publisher_key: &Path,
) -> Result<Vec<TrustedFile>> {
    if signature.is_some() && paths.len() > 1 {
        bail!(
            "--signature applies to one --measurements file; put each file's signature in FILE.sig"
        );
    }
    let key_pem = std::fs::read_to_string(publisher_key)
        .with_context(|| format!("reading the publisher key {}", publisher_key.display()))?;
    paths
        .iter()
        .map(|path| read_signed_file(path, signature, &key_pem, publisher_key))
        .collect()
}

/// Reads the PEM EK CA certificates.
pub fn read_ek_cas(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    let mut cas = Vec::new();
    for path in paths {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the EK CA {}", path.display()))?;
        let certs = confidential_attestation::tpm::parse_certificates(&pem)
            .with_context(|| format!("parsing the EK CA {}", path.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", path.display());
        }
        cas.extend(certs);
    }
    Ok(cas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_needs_a_32_byte_hex_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.json");
        let id = "ab".repeat(32);
        std::fs::write(
            &path,
            format!(r#"{{"clusterId":"{id}","gateEndpoint":"10.0.0.1:30443","gatePin":"{id}"}}"#),
        )
        .expect("write");
        let file = ClusterFile::read(&path).expect("valid");
        assert_eq!(file.cluster_id, id);
        assert_eq!(file.gate_endpoint.as_deref(), Some("10.0.0.1:30443"));
        for bad in [
            r#"{"clusterId":"abcd"}"#,
            r#"{"clusterId":"zz"}"#,
            r#"{"gatePin":"00"}"#,
            "[]",
        ] {
            std::fs::write(&path, bad).expect("write");
            assert!(ClusterFile::read(&path).is_err(), "{bad}");
        }
    }
}
