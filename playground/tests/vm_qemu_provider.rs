//! The QEMU provider on real components: a real control plane (for the
//! PendingNode it reports on), a real swtpm, the real UKI built by the node
//! image code, a real QEMU booting it under OVMF. One VM only (QEMU's TCG
//! emulator is slow on this machine); the accelerator comes from
//! `CONFIDENTIAL_VM_ACCEL` as in the VM boot suite.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::{PendingGoal, PendingNode, PendingNodeSpec};
use confidential_controllers::provider::{MachineRequest, Provider};
use confidential_playground::node_images::NodeImages;
use confidential_playground::vm_provider::{
    LaunchConfig, MACHINE_RUNNING, MachineState, NO_CONTROL_PLANE_MACHINES, QemuProvider,
};
use confidential_playground::{IMAGE_V1, IMAGE_V2};
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::vm::Accel;
use confidential_testenv::{ControlPlane, ControlPlaneOptions, crds_dir, install_crds};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};

fn request(name: &str, image: &str) -> MachineRequest {
    MachineRequest {
        name: name.to_owned(),
        pool: "default".to_owned(),
        image: image.to_owned(),
        kubernetes_version: "v1.35.4".to_owned(),
        control_plane: false,
    }
}

fn boot_timeout(accel: Accel) -> Duration {
    match accel {
        Accel::Kvm => Duration::from_secs(180),
        Accel::Tcg => Duration::from_secs(900),
    }
}

/// Waits until the PendingNode's MachineRunning condition has `reason`.
async fn wait_for_condition(
    pending: &Api<PendingNode>,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> Result<(String, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let node = pending.get(name).await?;
        let condition = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == MACHINE_RUNNING))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        if let Some((status, r, message)) = &condition
            && r == reason
        {
            return Ok((status.clone(), message.clone()));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "PendingNode {name}: no MachineRunning reason {reason} within {timeout:?} (now {condition:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_qemu_machine_boots_its_pools_image_reports_its_state_and_leaves_nothing_behind()
-> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,confidential_playground=info")
        .with_test_writer()
        .try_init();
    let accel = Accel::from_env()?;
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    install_crds(&client, &crds_dir()).await?;
    let work = tempfile::Builder::new()
        .prefix("qemu-provider-")
        .tempdir()?;
    let ca = Arc::new(tokio::task::spawn_blocking(SwtpmCa::new).await??);
    let images = Arc::new(NodeImages::new(&work.path().join("images"))?);
    let provider = Arc::new(QemuProvider::new(
        ca,
        images.clone(),
        LaunchConfig {
            // No gate in this test: the machine is only booted.
            gate_endpoints: vec!["10.0.2.100:9443".to_owned()],
            gate_pin: [7; 32],
            forwards: Vec::new(),
        },
        accel,
        &work.path().join("machines"),
    )?);
    let reporter = provider.report_to(client.clone());

    // Refusals first: nothing is started for them.
    let mut control_plane_request = request("cp-0", IMAGE_V1);
    control_plane_request.control_plane = true;
    let err = provider
        .create_machine(&control_plane_request)
        .await
        .expect_err("control-plane machines are refused");
    assert!(err.to_string().contains(NO_CONTROL_PLANE_MACHINES), "{err}");
    let err = provider
        .control_plane_membership()
        .expect_err("no etcd on these machines");
    assert_eq!(err, NO_CONTROL_PLANE_MACHINES);
    let err = provider
        .create_machine(&request(
            "latest-0",
            "registry.example/confidential-node:latest",
        ))
        .await
        .expect_err("no version tag");
    assert!(err.to_string().contains("is not an image version"), "{err}");
    assert!(provider.states().is_empty(), "refusals start nothing");

    // The PendingNode the reconciler would have written before asking.
    let name = "default-vm-0";
    let pending: Api<PendingNode> = Api::all(client.clone());
    pending
        .create(
            &PostParams::default(),
            &PendingNode::new(
                name,
                PendingNodeSpec {
                    node_name: name.to_owned(),
                    pool: "default".to_owned(),
                    goal: PendingGoal::Join,
                    provider_id: None,
                    image: IMAGE_V2.to_owned(),
                    deadline: Time(jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)),
                },
            ),
        )
        .await?;

    let machine = provider.create_machine(&request(name, IMAGE_V2)).await?;
    assert_eq!(machine.image, IMAGE_V2);
    assert_eq!(machine.provider_id, format!("qemu://{name}"));
    // The boot is under way: state Booting, and the PendingNode says so.
    let (status, _) =
        wait_for_condition(&pending, name, "Booting", Duration::from_secs(120)).await?;
    assert_eq!(status, "False");
    let (status, message) =
        wait_for_condition(&pending, name, "Running", boot_timeout(accel)).await?;
    assert_eq!(status, "True");
    assert!(message.contains("v2"), "{message}");
    assert_eq!(
        provider.state(name),
        Some(MachineState::Running {
            version: "v2".to_owned()
        }),
        "the node OS that runs is the pool's image version"
    );
    let files = provider.files(name).context("the machine exists")?;
    let vm_dir = files.vm_dir.clone().context("the VM runs")?;
    assert_eq!(files.pids.len(), 2, "QEMU and its swtpm: {files:?}");
    assert!(files.pids.iter().all(|&pid| process_exists(pid)));
    // The VM booted exactly the v2 UKI the images built.
    assert_eq!(
        std::fs::read(vm_dir.join("esp/EFI/BOOT/BOOTX64.EFI"))?,
        std::fs::read(images.uki(IMAGE_V2)?)?,
    );
    let env = std::fs::read_to_string(vm_dir.join("node.env"))?;
    assert!(
        env.contains(&format!("CONFIDENTIAL_NODE_NAME={name}\n")),
        "{env}"
    );
    let state_disk = files.dir.join("state.raw");
    assert!(state_disk.metadata()?.len() >= 1 << 30, "a state disk");
    assert!(files.dir.join("machine.raw").exists(), "a machine disk");

    // Idempotent by name: the same machine, no second VM.
    let again = provider.create_machine(&request(name, IMAGE_V2)).await?;
    assert_eq!(again, machine);
    assert_eq!(provider.files(name), Some(files.clone()));
    assert_eq!(provider.states().len(), 1);

    // QEMU ending is seen and reported: kill it by its pid.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &files.pids[0].to_string()])
        .status()?;
    assert!(killed.success());
    let (status, message) =
        wait_for_condition(&pending, name, "Exited", Duration::from_secs(60)).await?;
    assert_eq!(status, "False");
    assert!(message.contains("ended by a signal"), "{message}");

    // Delete: every process stopped and every file removed; again is a no-op.
    provider.delete_machine(name).await?;
    assert_eq!(provider.state(name), None);
    for pid in &files.pids {
        assert!(!process_exists(*pid), "process {pid} still runs");
    }
    assert!(!files.dir.exists(), "{} is left", files.dir.display());
    assert!(!vm_dir.exists(), "{} is left", vm_dir.display());
    provider.delete_machine(name).await?;
    assert!(
        std::fs::read_dir(work.path().join("machines"))?
            .next()
            .is_none(),
        "no machine directory is left"
    );
    reporter.abort();
    Ok(())
}
