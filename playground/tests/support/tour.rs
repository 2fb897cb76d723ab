//! Runs the README's tour (`scripts/tour`) as CI runs it and checks that
//! every step was reached and that a healthy run prints no ERROR lines;
//! shared by `tests/tour.rs` (the command as it is) and `tests/vm_tour.rs`
//! (on VM nodes; a `vm_*` target, so `scripts/test` runs it with the VM
//! suites).

use std::path::Path;
use std::process::Command;

use anyhow::Result;

/// Runs `scripts/tour` with `env`; returns its stdout and stderr.
pub fn run_tour(env: &[(&str, &str)]) -> Result<(String, String)> {
    // The binaries the script runs, built when missing.
    for (name, package, env) in [
        (
            "kubectl-confidential",
            "kubectl-confidential",
            "KUBECTL_CONFIDENTIAL_BIN",
        ),
        (
            "confidential-webhook",
            "confidential-webhook",
            "CONFIDENTIAL_WEBHOOK_BIN",
        ),
        (
            "confidential-bootstrapper",
            "confidential-bootstrapper",
            "CONFIDENTIAL_BOOTSTRAPPER_BIN",
        ),
    ] {
        confidential_testenv::workspace_binary(name, package, env)?;
    }
    confidential_testenv::binaries::ensure()?;
    let playground = env!("CARGO_BIN_EXE_confidential-playground");
    let target = Path::new(playground)
        .parent()
        .and_then(Path::parent)
        .expect("target dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/tour"))
        .env("TOUR_SKIP_BUILD", "1")
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .current_dir(&root)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the tour failed");
    for step in [
        "== 1. playground up",
        "== 2. kubectl confidential init",
        "cluster ID: ",
        "== 4. verify every node",
        "refused: ",
        "NodeAttestation",
        "== 6. kubectl confidential upgrade",
        "== 7. verify every node again",
        "nothing left running",
    ] {
        assert!(
            stdout.contains(step) || stderr.contains(step),
            "the tour never showed {step:?}"
        );
    }
    assert!(
        !stderr.contains(" ERROR ") && !stdout.contains(" ERROR "),
        "a healthy tour prints no ERROR lines"
    );
    Ok((stdout, stderr))
}
