//! The README's tour, run as CI runs it: `scripts/tour` end to end on real
//! components (control plane, the real plugin, gate, bootstrapper and
//! operator; swtpm process machines, or QEMU VM nodes with the real kubelet,
//! containerd and runc). The script itself fails on any step that does not
//! do what the README shows (a refusal that is accepted, a verify that
//! fails, a demo container that did not start from the digest-pinned image,
//! a process left running); these tests also check that every step was
//! reached and that a healthy run prints no ERROR lines.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

/// Runs `scripts/tour` with `env`; returns its stdout and stderr.
fn run_tour(env: &[(&str, &str)]) -> Result<(String, String)> {
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

/// The README's command as it is (`--machines auto`: VMs where KVM runs
/// them, else process machines).
#[test]
fn the_readme_tour_runs_end_to_end_and_leaves_nothing_running() -> Result<()> {
    run_tour(&[])?;
    Ok(())
}

/// `scripts/tour --machines vm` with one node (each VM takes about a minute
/// under TCG): the machines are VMs the operator's QEMU provider started,
/// the demo pods are real containers started from the image the node image
/// carries, found by its digest reference, the roll replaced the VM, and
/// `verify --all-nodes` reached the VM node both times.
#[test]
fn the_readme_tour_runs_on_vm_nodes() -> Result<()> {
    let (stdout, stderr) = run_tour(&[("TOUR_MACHINES", "vm"), ("TOUR_NODES", "1")])?;
    // Both verifies reached the VM node (at the endpoint it announced).
    let output = format!("{stdout}\n{stderr}");
    assert_eq!(output.matches("1/1 nodes trusted").count(), 2, "{output}");
    assert!(!output.contains("NOT RUN on VM nodes"), "{output}");
    for shown in [
        "VM machines (",
        "already present on machine",
        "image \"ghcr.io/kubectl-confidential/demo:v1\" is not pinned by digest",
        "(vm machines); nothing left running",
    ] {
        assert!(stderr.contains(shown), "the VM tour never showed {shown:?}");
    }
    Ok(())
}
