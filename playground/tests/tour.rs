//! The README's tour, run as CI runs it: `scripts/tour` end to end on real
//! components (control plane, swtpm machines, the real plugin, gate,
//! bootstrapper and operator). The script itself fails on any step that
//! does not do what the README shows (a refusal that is accepted, a verify
//! that fails, a process left running); this test also checks that every
//! step was reached and that a healthy run prints no ERROR lines.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

#[test]
fn the_readme_tour_runs_end_to_end_and_leaves_nothing_running() -> Result<()> {
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
        .current_dir(&root)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
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
        "tour: done; nothing left running",
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
    Ok(())
}
