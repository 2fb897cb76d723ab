//! Every binary of the workspace starts, documents itself with `--help` and
//! `--version`, and refuses an unknown flag with a usage error (exit 2) that
//! names the flag.

use std::process::Command;

use anyhow::Result;

const BINARIES: [(&str, &str, &str); 5] = [
    (
        "confidential-webhook",
        "confidential-webhook",
        "CONFIDENTIAL_WEBHOOK_BIN",
    ),
    (
        "confidential-controllers",
        "confidential-controllers",
        "CONFIDENTIAL_CONTROLLERS_BIN",
    ),
    (
        "confidential-bootstrapper",
        "confidential-bootstrapper",
        "CONFIDENTIAL_BOOTSTRAPPER_BIN",
    ),
    (
        "kubectl-confidential",
        "kubectl-confidential",
        "KUBECTL_CONFIDENTIAL_BIN",
    ),
    (
        "confidential-playground",
        "confidential-playground",
        "CONFIDENTIAL_PLAYGROUND_BIN",
    ),
];

#[test]
fn every_binary_has_help_version_and_refuses_unknown_flags() -> Result<()> {
    for (name, package, env) in BINARIES {
        let path = confidential_testenv::workspace_binary(name, package, env)?;
        let help = Command::new(&path).arg("--help").output()?;
        assert!(help.status.success(), "{name} --help failed");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Usage"),
            "{name} --help"
        );

        let version = Command::new(&path).arg("--version").output()?;
        assert!(version.status.success(), "{name} --version failed");
        assert!(
            String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
            "{name} --version"
        );

        let bad = Command::new(&path).arg("--no-such-flag").output()?;
        assert_eq!(
            bad.status.code(),
            Some(2),
            "{name} must exit 2 on a bad flag"
        );
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains("--no-such-flag"), "{name}: {stderr}");
    }
    Ok(())
}
