//! Revocation on real components: a node whose NodeAttestation expired or
//! failed re-attestation is tainted `NoExecute` (its pods leave through the
//! controller-manager's taint eviction), cordoned, and replaced, and stays
//! revoked when a later attestation succeeds.

use anyhow::{Result, bail};
use confidential_api::keys::{LABEL_NODE_POOL, TAINT_UNATTESTED};
use confidential_api::{NodeAttestation, RolloutStrategy};
use confidential_controllers::metrics::Metrics;
use confidential_testenv::cloud::CloudConfig;
use confidential_testenv::eventually;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::env::{
    Env, InvariantWatch, V1, WAIT, controller, node_version, settle_v1, setup, workload,
};

/// Whether `node` carries the unattested taint with effect NoExecute and is
/// cordoned.
fn revoked(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|t| {
        t.iter()
            .any(|t| t.key == TAINT_UNATTESTED && t.effect == "NoExecute")
    });
    tainted && spec.and_then(|s| s.unschedulable) == Some(true)
}

/// Changes the NodeAttestation of `node` as the gate would after a failed
/// or missed re-attestation.
async fn tamper_attestation(env: &Env, node: &str, spec: serde_json::Value) -> Result<()> {
    Api::<NodeAttestation>::all(env.client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?;
    Ok(())
}

/// Waits until `node` is tainted and cordoned and no workload pod is bound
/// to it any more (the taint eviction controller removed them).
async fn wait_revoked_and_emptied(env: &Env, node: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        &format!("{node} tainted, cordoned and emptied"),
        WAIT,
        || async {
            let Some(n) = nodes.get_opt(node).await? else {
                bail!("{node} was deleted before it was seen revoked");
            };
            let on_node = pods
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await?
                .items
                .len();
            Ok((revoked(&n) && on_node == 0).then_some(()))
        },
    )
    .await
}

/// Waits until the pool has three nodes again, `gone` not among them.
async fn wait_replaced(env: &Env, gone: &str) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    eventually(&format!("{gone} replaced"), WAIT, || async {
        let list = nodes
            .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={}", env.pool)))
            .await?;
        let names: Vec<String> = list.iter().map(|n| n.name_any()).collect();
        Ok((names.len() == 3 && !names.iter().any(|n| n == gone)).then_some(names))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_attestation_expires_is_tainted_cordoned_and_replaced() -> Result<()> {
    let env = setup(3, CloudConfig::default()).await?;
    workload(&env, 3, 2).await?;
    node_version(&env, 3, RolloutStrategy::default()).await?;
    let ctl = controller(&env, Metrics::new(), "replica-a");
    settle_v1(&env, 3).await?;
    // The NoExecute taint removes the revoked node's pods at once, PDB or
    // not (an untrusted node must not keep running workloads): one of the
    // three pods may go that way, so the pod floor here is one.
    let watch = InvariantWatch::start(&env, 1, 2, V1);
    // The attestation of one node lapses (its re-attestation was missed).
    let expired = format!("{}-v1-1", env.pool);
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
    tamper_attestation(&env, &expired, json!({ "expiresAt": past.to_string() })).await?;
    wait_revoked_and_emptied(&env, &expired).await?;
    // Replaced: the node is gone, three nodes attested for the (unchanged) image.
    let names = wait_replaced(&env, &expired).await?;
    let violations = watch.finish().await?;
    assert!(violations.is_empty(), "invariants violated: {violations:?}");
    assert_eq!(env.sim.machines_created(), 1, "exactly one replacement");
    assert_eq!(names.iter().filter(|n| n.contains("-v1-")).count(), 2);
    let nodes: Api<Node> = Api::all(env.client.clone());
    for name in &names {
        let node = nodes.get(name).await?;
        assert!(!revoked(&node), "{name} was revoked too");
    }
    // The user sees why: a Warning Event on the node.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(env.client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(expired.as_str()))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(reasons.iter().any(|r| r == "Revoked"), "{reasons:?}");
    ctl.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_failed_reattestation_stays_revoked_when_renewed_and_is_replaced() -> Result<()>
{
    let env = setup(3, CloudConfig::default()).await?;
    workload(&env, 3, 2).await?;
    node_version(&env, 3, RolloutStrategy::default()).await?;
    let ctl = controller(&env, Metrics::new(), "replica-a");
    settle_v1(&env, 3).await?;
    // Re-attestation failed for longer than the grace: the gate revoked it.
    let failed = format!("{}-v1-0", env.pool);
    tamper_attestation(&env, &failed, json!({ "verdict": "Revoked" })).await?;
    wait_revoked_and_emptied(&env, &failed).await?;
    // A later attestation succeeding again does not lift the revocation: the
    // node is still replaced and the taint stays until it is gone.
    tamper_attestation(&env, &failed, json!({ "verdict": "Trusted" })).await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let names = eventually(&format!("{failed} replaced"), WAIT, || async {
        if let Some(node) = nodes.get_opt(&failed).await? {
            if !revoked(&node) {
                bail!("{failed} was un-revoked: {:?}", node.spec);
            }
            return Ok(None);
        }
        Ok(Some(wait_replaced(&env, &failed).await?))
    })
    .await?;
    assert_eq!(env.sim.machines_created(), 1, "exactly one replacement");
    assert_eq!(names.len(), 3);
    ctl.abort();
    Ok(())
}
