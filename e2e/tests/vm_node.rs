//! VM nodes boot to Ready for real: the node image (UKI) boots under OVMF
//! with its own swtpm vTPM; inside, the bootstrapper quotes the vTPM over
//! aTLS to the real gate (`confidential-webhook`, its policy built from the
//! PCRs predicted from the UKI), gets its disk key and bootstrap token, sets
//! up LUKS2 on a virtio disk (formats only when `cryptsetup isLuks` says "not
//! LUKS"), mounts it at /var/lib, starts containerd and the kubelet, which
//! does TLS bootstrap; the operator's approver approves; the Node becomes
//! Ready and runs a pod from the image baked into the UKI, referenced by
//! digest (`repository@sha256:...`, what an `Enforce` ImagePolicy admits;
//! the admission side is proven on the operator's VMs in `vm_roll.rs`).
//!
//! Each test boots as few VMs as its claim needs, one at a time (TCG takes a
//! core per VM). `CONFIDENTIAL_VM_ACCEL=tcg` on machines whose KVM cannot run
//! OVMF guests.

mod vm_node_env;

use anyhow::{Context, Result};
use confidential_api::NodeAttestation;
use confidential_testenv::{eventually, workspace_binary};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;
use vm_node_env::*;
use xtask::node_image::runtime::{DEMO_LOG_LINE, system_demo_image};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_node_joins_encrypts_its_disk_and_runs_a_pod() -> Result<()> {
    let _one = ONE_VM_AT_A_TIME.lock().await;
    let env = NodeEnv::start().await?;
    let name = node_name();
    let uuid = disk_uuid();
    let disks = env.disks("a")?;
    let tpm = env.dir.path().join("tpm-a");
    let vm = env.boot(&env.uki, &name, &uuid, &disks, &tpm)?;
    let (vm, _) = NodeEnv::console(vm, "node-image: step kubelet", patience(env.accel, 180))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    let console = vm.console();
    assert!(
        console.contains("probe=NotLuks"),
        "a blank disk is probed as not LUKS"
    );
    assert!(console.contains("state disk open boots=1"), "{console}");

    // The Node registers through TLS bootstrap and becomes Ready.
    let nodes = Api::<Node>::all(env.cluster.client.clone());
    let vm = wait_node_ready(&env.cluster.client, vm, &name, patience(env.accel, 300)).await?;
    let att = Api::<NodeAttestation>::all(env.cluster.client.clone())
        .get(&name)
        .await?;
    assert_eq!(att.spec.image, IMAGE);
    assert_eq!(att.spec.disk_uuid.as_deref(), Some(uuid.as_str()));

    // A pod from the image baked into the UKI runs on it, the image named
    // by its digest as the node-image code computed it: the CRI resolves
    // that name from what the node imported, with no registry. The default
    // pull policy of a digest reference (IfNotPresent) would try a pull if
    // it did not.
    let demo = system_demo_image()?;
    let pods = Api::<Pod>::namespaced(env.cluster.client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "demo" },
        "spec": {
            "nodeName": name,
            "containers": [{ "name": "demo", "image": demo.digest_reference }],
            "automountServiceAccountToken": false,
            "dnsPolicy": "Default",
            "enableServiceLinks": false,
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    eventually(
        "the demo pod's container to run",
        patience(env.accel, 180),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("demo").await?;
                let running = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .and_then(|c| c.state.as_ref())
                    .and_then(|s| s.running.as_ref())
                    .is_some();
                Ok(running.then_some(()))
            }
        },
    )
    .await
    .with_context(|| format!("console:\n{}", vm.console()))?;
    let console = vm.console();
    vm.stop();
    // The workload's output never reaches the host's console.
    assert!(
        !console.contains(DEMO_LOG_LINE),
        "pod output leaked to the console"
    );
    // The container started from the image baked into the UKI (no
    // registry is reachable: the kubelet found it present), on a node
    // running our image.
    let status = pods
        .get("demo")
        .await?
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .context("container status")?;
    assert!(
        status.started == Some(true) && status.restart_count == 0,
        "{status:?}"
    );
    assert!(
        status.image_id.ends_with(&demo.digest),
        "the container runs the manifest of that digest: {status:?}"
    );
    let events =
        Api::<k8s_openapi::api::core::v1::Event>::namespaced(env.cluster.client.clone(), "default")
            .list(&kube::api::ListParams::default().fields("involvedObject.name=demo"))
            .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Pulled")
                && e.message.as_deref().is_some_and(|m| m.contains(&format!(
                    "\"{}\" already present on machine",
                    demo.digest_reference
                )))),
        "{:?}",
        events.items.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    let node = nodes.get(&name).await?;
    assert_eq!(
        node.status.and_then(|s| s.node_info).map(|i| i.os_image),
        Some("kubectl-confidential node v1".to_owned())
    );

    // From the host: the state disk holds a LUKS2 header, nothing in clear.
    assert_eq!(luks_version(&disks[0].path)?, Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_vm_reopens_its_luks_volume_with_the_same_key() -> Result<()> {
    let _one = ONE_VM_AT_A_TIME.lock().await;
    let env = NodeEnv::start().await?;
    let name = node_name();
    let uuid = disk_uuid();
    let disks = env.disks("r")?;
    let tpm = env.dir.path().join("tpm-r");
    let vm = env.boot(&env.uki, &name, &uuid, &disks, &tpm)?;
    let (vm, _) = NodeEnv::console(vm, "state disk open boots=1", patience(env.accel, 180))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    let first = vm.console();
    let first_uuid = console_field(&first, "state disk open", "luks-uuid").context("LUKS UUID")?;
    assert!(first.contains("probe=NotLuks"), "{first}");
    vm.stop();
    assert_eq!(luks_version(&disks[0].path)?, Some(2));

    // Same disk, same vTPM: the node opens the volume (same key), finds the
    // file its first boot wrote, and formats nothing.
    let vm = env.boot(&env.uki, &name, &uuid, &disks, &tpm)?;
    let (vm, _) = NodeEnv::console(vm, "state disk open boots=2", patience(env.accel, 180))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    let second = vm.console();
    vm.stop();
    assert!(second.contains("probe=Luks"), "{second}");
    assert!(!second.contains("luksFormat"), "reformatted:\n{second}");
    assert!(!second.contains("made the state file system"), "{second}");
    assert_eq!(
        console_field(&second, "state disk open", "luks-uuid").as_deref(),
        Some(first_uuid.as_str())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_moved_to_another_vms_tpm_gets_no_key() -> Result<()> {
    let _one = ONE_VM_AT_A_TIME.lock().await;
    let env = NodeEnv::start().await?;
    let owner = node_name();
    let uuid = disk_uuid();
    let disks = env.disks("m")?;
    let vm = env.boot(
        &env.uki,
        &owner,
        &uuid,
        &disks,
        &env.dir.path().join("tpm-owner"),
    )?;
    let (vm, _) = NodeEnv::console(vm, "state disk open boots=1", patience(env.accel, 180))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    vm.stop();

    // The same disk (same UUID) in another VM, with another vTPM and a
    // fresh machine disk: the gate derives the key for *that* machine's
    // identity, which does not open the volume; the node stays down.
    let thief = node_name();
    let other_machine =
        confidential_testenv::vm::VmDisk::machine(&env.dir.path().join("m-other-machine.img"))?;
    let moved = [disks[0].clone(), other_machine];
    let vm = env.boot(
        &env.uki,
        &thief,
        &uuid,
        &moved,
        &env.dir.path().join("tpm-thief"),
    )?;
    let (vm, _) = NodeEnv::console(vm, "bootstrapper failed exit=", patience(env.accel, 180))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    let console = vm.console();
    vm.stop();
    assert!(console.contains("probe=Luks"), "{console}");
    assert!(
        console.contains("`cryptsetup open` on /dev/vdb failed"),
        "{console}"
    );
    assert!(!console.contains("state disk open"), "{console}");
    assert!(
        !console.contains("luksFormat"),
        "never reformatted: {console}"
    );
    assert!(!env.node_exists(&thief).await?, "no Node for the thief");
    assert_eq!(luks_version(&disks[0].path)?, Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_booted_from_a_tampered_uki_is_refused_with_the_pcr_named() -> Result<()> {
    let _one = ONE_VM_AT_A_TIME.lock().await;
    let env = NodeEnv::start().await?;
    let tampered = env.dir.path().join("tampered.efi");
    tamper_initramfs(&env.uki, &tampered)?;
    let name = node_name();
    let disks = env.disks("t")?;
    let vm = env.boot(
        &tampered,
        &name,
        &disk_uuid(),
        &disks,
        &env.dir.path().join("tpm-t"),
    )?;
    let (vm, _) = NodeEnv::console(vm, "bootstrapper failed exit=", patience(env.accel, 240))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    let console = vm.console();
    vm.stop();
    assert!(console.contains("the gate refused the join"), "{console}");
    assert!(console.contains("PCR 4 mismatch"), "{console}");
    assert!(!console.contains("state disk open"), "{console}");
    assert_eq!(
        luks_version(&disks[0].path)?,
        None,
        "the disk was not touched"
    );
    let nodes = Api::<Node>::all(env.cluster.client.clone());
    assert!(nodes.get_opt(&name).await?.is_none(), "no Node");
    let atts = Api::<NodeAttestation>::all(env.cluster.client.clone());
    assert!(atts.get_opt(&name).await?.is_none(), "no NodeAttestation");
    Ok(())
}

/// After joining, the node keeps serving `/v1/attest` (aTLS) inside the VM;
/// the one host port forwarded into the guest is announced at join and
/// recorded in the NodeAttestation, where the gate's re-attestation dials
/// it (a fresh quote with the recorded AK sets `lastVerified`), and where
/// the admin's `kubectl confidential verify` asks the node from outside:
/// passes against the local trusted measurements, fails for another
/// cluster ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_node_is_reattested_and_verified_through_its_forwarded_endpoint() -> Result<()> {
    let _one = ONE_VM_AT_A_TIME.lock().await;
    let env = NodeEnv::start().await?;
    let name = node_name();
    let uuid = disk_uuid();
    let disks = env.disks("v")?;
    let tpm = env.dir.path().join("tpm-v");
    let vm = env.boot(&env.uki, &name, &uuid, &disks, &tpm)?;
    let endpoint = vm
        .attest_endpoint()
        .context("forwarded endpoint")?
        .to_owned();
    let (vm, _) = NodeEnv::console(vm, "node-image: step kubelet", patience(env.accel, 180))
        .await
        .with_context(|| format!("gate log:\n{}", env.gate_log()))?;
    // The bootstrapper's one-line result: {"joined":NAME,"clusterId":HEX}.
    let cluster_id = vm
        .console()
        .lines()
        .find_map(|line| {
            let result: serde_json::Value =
                serde_json::from_str(&line[line.find("{\"joined\"")?..]).ok()?;
            result["clusterId"].as_str().map(str::to_owned)
        })
        .context("the joined line names the cluster ID")?;

    let atts = Api::<NodeAttestation>::all(env.cluster.client.clone());
    let att = atts.get(&name).await?;
    assert_eq!(
        att.spec.attestation_endpoint.as_deref(),
        Some(endpoint.as_str()),
        "the endpoint the node announced is recorded"
    );
    let reattested = wait_reattested(&env.cluster.client, &name, patience(env.accel, 240))
        .await
        .with_context(|| format!("gate log:\n{}\nconsole:\n{}", env.gate_log(), vm.console()))?;
    assert!(
        reattested.0 > att.spec.attested_at.0,
        "verified after the join"
    );

    // The admin verifies the node from outside (the Node must exist).
    eventually("the Node to register", patience(env.accel, 180), || {
        let exists = env.node_exists(&name);
        async move { Ok(exists.await?.then_some(())) }
    })
    .await?;
    let ek_ca = env.dir.path().join("ek-ca.pem");
    std::fs::write(&ek_ca, env.ca.issuer_pem()?)?;
    let plugin = workspace_binary(
        "kubectl-confidential",
        "kubectl-confidential",
        "KUBECTL_CONFIDENTIAL_BIN",
    )?;
    let kubeconfig = &env
        .cluster
        .control_plane
        .as_ref()
        .context("control plane")?
        .kubeconfig;
    let verify = |cluster_id: String| {
        let mut cmd = std::process::Command::new(&plugin);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "verify",
                "--node",
                &name,
                "-o",
                "json",
                "--node-timeout",
                "120",
            ])
            .arg("--measurements")
            .arg(&env.measurements)
            .arg("--publisher-key")
            .arg(&env.publisher_key)
            .arg("--ek-ca")
            .arg(&ek_ca)
            .args(["--cluster-id", &cluster_id]);
        tokio::task::spawn_blocking(move || cmd.output())
    };
    let passed = verify(cluster_id.clone()).await??;
    let report = String::from_utf8_lossy(&passed.stdout);
    assert!(
        passed.status.success(),
        "verify failed:\n{report}\n{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&passed.stdout)?;
    assert_eq!(report[0]["endpoint"], endpoint.as_str(), "{report}");
    assert_eq!(report[0]["verdict"], "Trusted", "{report}");

    let failed = verify("00".repeat(32)).await??;
    assert!(!failed.status.success(), "another cluster ID passed");
    let report: serde_json::Value = serde_json::from_slice(&failed.stdout)?;
    assert_eq!(report[0]["verdict"], "Untrusted", "{report}");
    assert_eq!(report[0]["clusterIdPcr"]["matches"], false, "{report}");
    vm.stop();
    Ok(())
}

/// The node image with the whole runtime (kubelet, containerd, modules,
/// baked images) is as reproducible as the agent-only one: what the policy
/// pins can be rebuilt and checked by anyone.
#[test]
fn node_images_with_the_runtime_are_reproducible() -> Result<()> {
    let first = tempfile::tempdir()?;
    let second = tempfile::tempdir()?;
    let a = std::fs::read(build_node_image(first.path())?)?;
    let b = std::fs::read(build_node_image(second.path())?)?;
    assert!(a == b, "two builds of the node image v1 differ");
    Ok(())
}
