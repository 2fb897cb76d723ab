//! The operator drives VMs: the playground in VM mode (a real control plane,
//! the gate and the operator as `kubectl confidential init` installed them,
//! measurement files predicted from the v1/v2 UKIs) and the operator's QEMU
//! provider creating the pool's machines, each a VM booting the node image
//! under OVMF with its own swtpm vTPM. They join through the real gate; then
//! the real `kubectl confidential upgrade --image v2 --wait` replaces them,
//! while a watcher checks that no node and no machine goes before its heir
//! is Ready and attested; afterwards no process or file of a donor is left.
//!
//! VMs run on KVM, or on QEMU's emulator with `CONFIDENTIAL_VM_ACCEL=tcg`
//! (machines whose KVM cannot run firmware, such as PVM hosts).

#[path = "support/vm_roll.rs"]
mod roll;

use std::time::Duration;

use anyhow::Result;
use confidential_playground::{IMAGE_V1, IMAGE_V2};
use confidential_testenv::vm::Accel;
use roll::{
    DEMO_NAMESPACE, RollWatch, WatchSpec, attested_pool_nodes, create_tag_only_demo_pod,
    demo_containers_run_the_pinned_image, demo_image, deploy_demo, join_timeout, leftovers,
    qemu_provider, vm_playground, wait_demo_pods, wait_machines_running,
};

/// VM machines in the pool: two, as in the issue (both replaced, three VMs
/// at the peak of the roll with maxSurge 1; TCG is slow, 2 shared cores).
const NODES: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_pool_rolls_to_v2_and_no_donor_goes_before_its_heir_is_attested() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            "warn,kube_client=off,confidential_playground=info,confidential_controllers=info",
        )
        .with_test_writer()
        .try_init();
    let accel = Accel::from_env()?;
    let playground = vm_playground(NODES, accel).await?;
    let client = playground.client.clone();
    let provider = qemu_provider(&playground).await?;
    let count = usize::try_from(NODES)?;

    // The operator's machines boot the pool's image: their node OS says v1.
    let v1_machines = wait_machines_running(&provider, "v1", count, join_timeout(accel)).await?;
    assert_eq!(v1_machines.len(), count, "{v1_machines:?}");

    // They join through the gate and become Ready, attested nodes.
    playground
        .wait_for_pool(IMAGE_V1, join_timeout(accel))
        .await?;
    let v1_nodes = attested_pool_nodes(&client, IMAGE_V1).await?;
    assert_eq!(
        v1_nodes,
        v1_machines.keys().cloned().collect(),
        "every node is one of the provider's machines"
    );

    // Real containers of the image baked into the node image, under a PDB,
    // pinned by digest under an Enforce ImagePolicy: the kubelet finds the
    // digest reference on the node.
    deploy_demo(&client).await?;
    let on = wait_demo_pods(&client, 2, join_timeout(accel)).await?;
    assert!(on.iter().all(|n| v1_nodes.contains(n)), "{on:?}");
    assert_eq!(demo_containers_run_the_pinned_image(&client).await?, 2);
    // The same image by tag only is refused in that namespace by the gate.
    let refusal = create_tag_only_demo_pod(&client).await?;
    let demo = demo_image()?;
    assert!(
        refusal.message.contains("denied the request")
            && refusal.message.contains(&format!(
                "image {:?} is not pinned by digest",
                demo.reference
            )),
        "{refusal:?}"
    );

    let watch = RollWatch::start(
        client.clone(),
        provider.clone(),
        WatchSpec {
            image: IMAGE_V2.to_owned(),
            pods: Some((DEMO_NAMESPACE.to_owned(), 1)),
        },
    );
    playground.upgrade(IMAGE_V2).await?;
    playground
        .wait_for_pool(IMAGE_V2, join_timeout(accel))
        .await?;
    let v2_nodes = confidential_testenv::eventually(
        "donor nodes to be gone",
        Duration::from_secs(120),
        || {
            let client = client.clone();
            async move {
                let nodes = attested_pool_nodes(&client, IMAGE_V2).await;
                Ok(nodes.ok().filter(|n| n.len() == count))
            }
        },
    )
    .await?;
    // The pods were evicted (never deleted past the PDB) and run on the heirs.
    let on = wait_demo_pods(&client, 2, join_timeout(accel)).await?;
    assert_eq!(demo_containers_run_the_pinned_image(&client).await?, 2);
    let record = watch.finish().await?;
    eprintln!("roll: {record:?}");
    assert!(
        record.violations.is_empty(),
        "invariants violated: {:?}",
        record.violations
    );
    assert!(
        on.iter().all(|n| v2_nodes.contains(n)),
        "{on:?} / {v2_nodes:?}"
    );
    assert!(
        v2_nodes.is_disjoint(&v1_nodes),
        "nodes are replaced, never patched: {v1_nodes:?} / {v2_nodes:?}"
    );
    for donor in &v1_nodes {
        assert!(
            record.machine_gone.contains_key(donor) && record.node_gone.contains_key(donor),
            "machine and Node {donor} were not both seen deleted: {record:?}"
        );
    }
    // Every donor machine's QEMU, swtpm and files are gone.
    for (name, files) in &v1_machines {
        let left = leftovers(files);
        assert!(left.is_empty(), "machine {name} left {left:?}");
    }
    // The heirs are the provider's machines, running v2.
    let v2_machines =
        wait_machines_running(&provider, "v2", count, Duration::from_secs(10)).await?;
    assert_eq!(v2_nodes, v2_machines.keys().cloned().collect());
    Ok(())
}
