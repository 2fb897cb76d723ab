//! End-to-end rollouts on the real control plane of the test environment
//! (etcd, kube-apiserver, kube-controller-manager with the disruption, node
//! lifecycle, taint eviction and garbage collector controllers,
//! kube-scheduler), with the simulated cloud of the test environment booting
//! machines whose kubelet stand-ins do TLS bootstrap (approved by the
//! operator's approver) and run their pods. Evictions go through the real
//! Eviction API and real PDBs.
//!
//! A watcher samples the cluster throughout every rollout and records any
//! violation of the DESIGN.md invariants: the Deployment's healthy pods never
//! below its PDB, never fewer schedulable Ready nodes than
//! `replicas - maxUnavailable`, and no node deleted before a heir Ready and
//! attested for the new image existed.

mod env;
mod revocation;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::RolloutStrategy;
use confidential_api::conditions::{is_true, types};
use confidential_controllers::metrics::Metrics;
use confidential_testenv::cloud::CloudConfig;
use confidential_testenv::eventually;
use env::{
    InvariantWatch, V2, WAIT, controller, controller_with, healthy_pods, node_version, nv_status,
    set_image, settle_v1, setup, wait_rolled, workload,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_five_rolls_to_v2_with_surge_two_and_the_pdb_holds() -> Result<()> {
    let env = setup(5, CloudConfig::default()).await?;
    workload(&env, 6, 5).await?;
    node_version(
        &env,
        5,
        RolloutStrategy {
            max_surge: Some(IntOrString::Int(2)),
            drain_timeout_seconds: Some(120),
            join_deadline_seconds: Some(60),
            ..Default::default()
        },
    )
    .await?;
    let metrics = Metrics::new();
    let ctl = controller(&env, metrics.clone(), "replica-a");
    // A second replica: must stay passive while the first holds the Lease.
    let standby = controller(&env, metrics.clone(), "replica-b");
    settle_v1(&env, 5).await?;
    assert_eq!(env.sim.machines_created(), 0, "nothing to do at v1");

    let watch = InvariantWatch::start(&env, 5, 5, V2);
    set_image(&env, V2).await?;
    let names = wait_rolled(&env, 5, V2).await?;
    let violations = watch.finish().await?;
    assert!(violations.is_empty(), "invariants violated: {violations:?}");
    assert!(
        names.iter().all(|n| !n.contains("-v1-")),
        "old nodes remain: {names:?}"
    );
    assert_eq!(
        env.sim.machines_created(),
        5,
        "one machine per replaced node"
    );
    let text = metrics.encode();
    assert!(
        text.contains("confidential_controllers_evictions_total{result=\"evicted\"}"),
        "{text}"
    );
    assert!(healthy_pods(&env.client, &env.ns).await? >= 5);
    // Every eviction went through the Eviction API: pods of old nodes were
    // replaced by the ReplicaSet, none is left on a deleted node.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    for pod in pods.list(&ListParams::default()).await? {
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        assert!(names.contains(&node), "pod on {node}, not a pool node");
    }
    ctl.abort();
    standby.abort();
    drop(env.cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heir_that_never_attests_is_retried_then_the_rollout_is_blocked() -> Result<()> {
    let env = setup(2, CloudConfig::default()).await?;
    node_version(
        &env,
        2,
        RolloutStrategy {
            join_deadline_seconds: Some(2),
            ..Default::default()
        },
    )
    .await?;
    let ctl = controller(&env, Metrics::new(), "replica-a");
    settle_v1(&env, 2).await?;
    env.sim.set_never_attest(true);
    set_image(&env, V2).await?;
    let nv = eventually("RolloutBlocked", WAIT, || async {
        let nv = nv_status(&env).await?;
        let blocked = nv
            .status
            .as_ref()
            .is_some_and(|s| is_true(&s.conditions, types::ROLLOUT_BLOCKED));
        Ok(blocked.then_some(nv))
    })
    .await?;
    let status = nv.status.context("status")?;
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == types::ROLLOUT_BLOCKED)
        .context("condition")?;
    assert_eq!(condition.reason, "JoinsFailing", "{condition:?}");
    assert!(condition.message.contains("3 times"), "{condition:?}");
    assert_eq!(env.sim.machines_created(), 3, "three attempts, then stop");
    // Give a stuck loop the chance to show itself: no fourth machine.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.sim.machines_created(), 3, "the pool kept retrying");
    let nodes: Api<Node> = Api::all(env.client.clone());
    for i in 0..2 {
        let node = nodes.get(&format!("{}-v1-{i}", env.pool)).await?;
        assert_ne!(
            node.spec.and_then(|s| s.unschedulable),
            Some(true),
            "an old node was cordoned"
        );
    }
    ctl.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_pdb_times_out_into_rollout_blocked_and_resumes_when_relaxed() -> Result<()> {
    let env = setup(1, CloudConfig::default()).await?;
    workload(&env, 2, 2).await?;
    node_version(
        &env,
        1,
        RolloutStrategy {
            drain_timeout_seconds: Some(2),
            ..Default::default()
        },
    )
    .await?;
    let ctl = controller(&env, Metrics::new(), "replica-a");
    settle_v1(&env, 1).await?;
    set_image(&env, V2).await?;
    let status = eventually("drain timeout", WAIT, || async {
        let nv = nv_status(&env).await?;
        let Some(status) = nv.status else {
            return Ok(None);
        };
        let timed_out = status.conditions.iter().any(|c| {
            c.type_ == types::ROLLOUT_BLOCKED && c.status == "True" && c.reason == "DrainTimeout"
        });
        Ok(timed_out.then_some(status))
    })
    .await?;
    assert_eq!(status.blocking_pods.len(), 2, "{status:?}");
    assert!(status.blocking_pods.iter().all(|p| p.starts_with(&env.ns)));
    let old = format!("{}-v1-0", env.pool);
    let nodes: Api<Node> = Api::all(env.client.clone());
    assert!(
        nodes.get_opt(&old).await?.is_some(),
        "the donor was deleted"
    );
    assert_eq!(
        healthy_pods(&env.client, &env.ns).await?,
        2,
        "a pod was removed"
    );

    // Relax the PDB: the drain completes and the donor goes.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &env.ns);
    pdbs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "minAvailable": 1 } })),
    )
    .await?;
    let names = wait_rolled(&env, 1, V2).await?;
    assert!(!names.contains(&old));
    let nv = nv_status(&env).await?;
    assert!(!is_true(
        &nv.status.context("status")?.conditions,
        types::ROLLOUT_BLOCKED
    ));
    ctl.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_killed_ten_times_during_a_rollout_resumes_safely() -> Result<()> {
    let env = setup(5, CloudConfig::default()).await?;
    workload(&env, 6, 5).await?;
    node_version(
        &env,
        5,
        RolloutStrategy {
            max_surge: Some(IntOrString::Int(2)),
            ..Default::default()
        },
    )
    .await?;
    let metrics = Metrics::new();
    let current = Arc::new(Mutex::new(controller(&env, metrics.clone(), "replica-0")));
    settle_v1(&env, 5).await?;
    let watch = InvariantWatch::start(&env, 5, 5, V2);
    set_image(&env, V2).await?;
    // Kill at pseudo-random points (no rand dependency: a fixed LCG).
    let mut seed: u64 = 0x5eed;
    for round in 1..=10 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(200 + (seed >> 33) % 1500);
        tokio::time::sleep(after).await;
        let mut handle = current.lock().await;
        handle.abort();
        // Each incarnation has a new identity, so it must wait out the
        // Lease of the killed one: a real restart.
        *handle = controller(&env, metrics.clone(), &format!("replica-{round}"));
    }
    let names = wait_rolled(&env, 5, V2).await?;
    let violations = watch.finish().await?;
    assert!(violations.is_empty(), "invariants violated: {violations:?}");
    assert!(names.iter().all(|n| !n.contains("-v1-")), "{names:?}");
    // Restarts may create a machine twice only if a PendingNode was lost;
    // it never is, so exactly five replacements were made.
    let created = env.sim.machines_created();
    if created != 5 {
        bail!("{created} machines created for five replacements");
    }
    current.lock().await.abort();
    Ok(())
}

/// The shipped operator's provider (`record-only`: it only writes
/// PendingNodes) with the simulated cloud following those PendingNodes, as
/// a Cluster API bridge would, and as the rollout benchmark drives the real
/// binary: the pool rolls, machines come and go with their records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_only_operator_rolls_a_pool_whose_machines_follow_its_pending_nodes() -> Result<()>
{
    let env = setup(2, CloudConfig::default()).await?;
    workload(&env, 2, 1).await?;
    node_version(&env, 2, RolloutStrategy::default()).await?;
    let follower = env.sim.follow_pending_nodes();
    let ctl = controller_with(
        &env,
        Arc::new(confidential_controllers::provider::RecordOnly::new()),
        Metrics::new(),
        "replica-a",
    );
    settle_v1(&env, 2).await?;
    let watch = InvariantWatch::start(&env, 1, 2, V2);
    set_image(&env, V2).await?;
    let names = wait_rolled(&env, 2, V2).await?;
    let violations = watch.finish().await?;
    assert!(violations.is_empty(), "invariants violated: {violations:?}");
    assert_eq!(env.sim.machines_created(), 2, "one machine per PendingNode");
    // The machines of the deleted v1 nodes went with them.
    let machines = eventually("old machines deleted", WAIT, || async {
        let machines = env.sim.machines();
        Ok((machines.len() == 2).then_some(machines))
    })
    .await?;
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(machines, expected);
    follower.abort();
    ctl.abort();
    Ok(())
}
