//! The plugin installs through a real Krew (built from sigs.k8s.io/krew) from
//! the archive and manifest that `cargo xtask krew` produces, and kubectl then
//! finds it as `kubectl confidential`. A manifest whose checksum does not match
//! the archive is refused and installs nothing.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use xtask::krew::{Platform, package};

fn krew(root: &Path, args: &[&str]) -> std::process::Output {
    let krew = confidential_testenv::binaries::ensure_krew().expect("krew binary");
    Command::new(krew)
        .env("KREW_ROOT", root)
        .args(args)
        .output()
        .expect("run krew")
}

fn packaged(out: &Path) -> Result<xtask::krew::Package> {
    let platform = Platform {
        os: "linux".into(),
        arch: "amd64".into(),
        binary: env!("CARGO_BIN_EXE_kubectl-confidential").into(),
    };
    package(
        "v0.1.0",
        "https://downloads.example/kubectl-confidential",
        &[platform],
        out,
    )
}

#[test]
fn krew_installs_the_plugin_and_kubectl_finds_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pkg = packaged(&dir.path().join("dist"))?;
    let root = dir.path().join("krew");
    let archive = &pkg.archives[0].0;
    let out = krew(
        &root,
        &[
            "install",
            &format!("--manifest={}", pkg.manifest.display()),
            &format!("--archive={}", archive.display()),
        ],
    );
    assert!(
        out.status.success(),
        "krew install failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The archive ships kubectl's plugin-completion helper next to the binary.
    let store = root.join("store/confidential/v0.1.0");
    let helper = std::fs::read_to_string(store.join("kubectl_complete-confidential"))?;
    assert!(
        helper.contains("kubectl-confidential __complete"),
        "{helper}"
    );

    let installed = root.join("bin/kubectl-confidential");
    let version = Command::new(&installed).arg("--version").output()?;
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    // Krew records what it installed in a receipt (`krew list` would need the
    // central index, which is not reachable offline).
    let receipt = std::fs::read_to_string(root.join("receipts/confidential.yaml"))?;
    assert!(receipt.contains("version: v0.1.0"), "{receipt}");

    // kubectl (built with the test control plane) discovers plugins on PATH.
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(confidential_testenv::binaries::kubectl()?)
        .env("PATH", path)
        .args(["confidential", "--help"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verify"));
    Ok(())
}

#[test]
fn krew_refuses_an_archive_whose_checksum_does_not_match() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pkg = packaged(&dir.path().join("dist"))?;
    let (archive, sha) = &pkg.archives[0];
    let manifest = std::fs::read_to_string(&pkg.manifest)?;
    let wrong = "0".repeat(64);
    std::fs::write(&pkg.manifest, manifest.replace(sha.as_str(), &wrong))?;
    let root = dir.path().join("krew");
    let out = krew(
        &root,
        &[
            "install",
            &format!("--manifest={}", pkg.manifest.display()),
            &format!("--archive={}", archive.display()),
        ],
    );
    assert!(!out.status.success(), "a checksum mismatch must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.to_lowercase().contains("sha256") || stderr.contains("checksum"),
        "{stderr}"
    );
    assert!(
        !root.join("bin/kubectl-confidential").exists(),
        "nothing may be installed"
    );
    Ok(())
}

#[test]
fn packaging_refuses_bad_versions_and_missing_binaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let platform = Platform {
        os: "linux".into(),
        arch: "amd64".into(),
        binary: env!("CARGO_BIN_EXE_kubectl-confidential").into(),
    };
    for bad in ["0.1.0", "v0.1", "v0..1"] {
        assert!(
            package(
                bad,
                "https://x",
                std::slice::from_ref(&platform),
                dir.path()
            )
            .is_err(),
            "{bad}"
        );
    }
    let missing = Platform {
        binary: "/no/such/binary".into(),
        ..platform
    };
    assert!(package("v0.1.0", "https://x", &[missing], dir.path()).is_err());
    assert!(package("v0.1.0", "https://x", &[], dir.path()).is_err());
    assert!("linux-amd64=/x".parse::<Platform>().is_err());
}
