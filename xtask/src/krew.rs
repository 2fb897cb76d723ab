//! Krew packaging: one `.tar.gz` per platform holding the plugin binary, the
//! `kubectl_complete-confidential` helper of kubectl's plugin completion and
//! the licence, and the plugin manifest rendered from
//! `krew/confidential.yaml.tmpl` with each archive's URL and SHA-256.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// One platform's build of the plugin.
#[derive(Clone, Debug)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    /// The `kubectl-confidential` binary built for it.
    pub binary: PathBuf,
}

impl std::str::FromStr for Platform {
    type Err = anyhow::Error;

    /// Parses `os/arch=path`.
    fn from_str(s: &str) -> Result<Self> {
        let (target, binary) = s.split_once('=').with_context(|| {
            format!(
                "{s:?}: expected OS/ARCH=PATH, e.g. linux/amd64=target/release/kubectl-confidential"
            )
        })?;
        let (os, arch) = target
            .split_once('/')
            .with_context(|| format!("{target:?}: expected OS/ARCH"))?;
        if os.is_empty() || arch.is_empty() {
            bail!("{target:?}: OS and ARCH must not be empty");
        }
        Ok(Self {
            os: os.to_owned(),
            arch: arch.to_owned(),
            binary: PathBuf::from(binary),
        })
    }
}

/// What was written.
#[derive(Debug)]
pub struct Package {
    pub manifest: PathBuf,
    /// `(archive path, sha256 hex)` per platform.
    pub archives: Vec<(PathBuf, String)>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes the archives and `confidential.yaml` into `out`. `version` is a
/// Krew version (`v` + semver); archives are expected at `base_url/<name>`.
pub fn package(
    version: &str,
    base_url: &str,
    platforms: &[Platform],
    out: &Path,
) -> Result<Package> {
    let semver = version.strip_prefix('v').with_context(|| {
        format!("version {version:?} must start with v (Krew requires v<semver>)")
    })?;
    if semver.split('.').count() != 3 || semver.split('.').any(|p| p.is_empty()) {
        bail!("version {version:?} is not v<major>.<minor>.<patch>");
    }
    if platforms.is_empty() {
        bail!("no platform given; pass --platform linux/amd64=<path to kubectl-confidential>");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let licence = repo_root().join("LICENSE");
    let helper = repo_root().join("krew").join(COMPLETE_HELPER);
    let mut archives = Vec::new();
    let mut entries = String::new();
    for platform in platforms {
        if !platform.binary.is_file() {
            bail!(
                "{} does not exist; build the plugin first",
                platform.binary.display()
            );
        }
        let name = format!(
            "kubectl-confidential-{version}-{}-{}.tar.gz",
            platform.os, platform.arch
        );
        let path = out.join(&name);
        write_archive(&path, &platform.binary, &helper, &licence)?;
        let sha = hex::encode(Sha256::digest(std::fs::read(&path)?));
        entries.push_str(&format!(
            "  - selector:\n      matchLabels:\n        os: {os}\n        arch: {arch}\n    uri: {base}/{name}\n    sha256: {sha}\n    files:\n    - from: kubectl-confidential\n      to: .\n    - from: {COMPLETE_HELPER}\n      to: .\n    - from: LICENSE\n      to: .\n    bin: kubectl-confidential\n",
            os = platform.os,
            arch = platform.arch,
            base = base_url.trim_end_matches('/'),
        ));
        archives.push((path, sha));
    }
    let template_path = repo_root().join("krew/confidential.yaml.tmpl");
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?;
    let manifest = template
        .replace("{{VERSION}}", version)
        .replace("{{PLATFORMS}}\n", &entries);
    let manifest_path = out.join("confidential.yaml");
    std::fs::write(&manifest_path, manifest)?;
    Ok(Package {
        manifest: manifest_path,
        archives,
    })
}

/// kubectl's plugin completion runs `kubectl_complete-<plugin>` from PATH.
pub const COMPLETE_HELPER: &str = "kubectl_complete-confidential";

fn write_archive(path: &Path, binary: &Path, helper: &Path, licence: &Path) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    // Krew's unpacker handles only regular files, not GNU sparse entries.
    tar.sparse(false);
    tar.append_path_with_name(binary, "kubectl-confidential")
        .with_context(|| format!("adding {}", binary.display()))?;
    tar.append_path_with_name(helper, COMPLETE_HELPER)
        .with_context(|| format!("adding {}", helper.display()))?;
    tar.append_path_with_name(licence, "LICENSE")
        .context("adding LICENSE")?;
    tar.into_inner()?.finish()?;
    Ok(())
}
