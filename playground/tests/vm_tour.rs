//! The README's tour on VM nodes (its default): `scripts/tour --machines vm` end to end
//! (QEMU VMs from the operator's QEMU provider, real kubelet, containerd and
//! runc). The script fails on any step that does not do what the README
//! shows, including a demo container that did not start from the
//! digest-pinned image; this test also checks what only VM nodes show.

#[path = "support/tour.rs"]
mod support;

use anyhow::Result;
use support::run_tour;

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
