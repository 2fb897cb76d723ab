//! What the planner sees of a pool, read from the reflector stores the
//! controller's watches keep (Nodes of pools, NodeAttestations,
//! PendingNodes, NodeVersions) instead of listing them on every reconcile.
//! Only the pods of cordoned nodes (the drains) are listed from the API.
//! The translation from API objects to the planner's view is pure and
//! tested here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use confidential_api::keys::{
    ANNOTATION_DONOR_FOR, ANNOTATION_DRAIN_STARTED, ANNOTATION_HEIR_OF, ANNOTATION_PENDING_DONOR,
    LABEL_NODE_POOL, TAINT_UNATTESTED,
};
use confidential_api::{
    NodeAttestation, NodeVersion, PendingGoal, PendingNode, PendingState, Verdict,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use super::Error;
use crate::planner::{Desired, NodeObs, Observed, PendingObs, PodInfo, Seconds};

/// The caches the controller's watches fill.
#[derive(Clone)]
pub struct Stores {
    pub nodes: Store<Node>,
    pub attestations: Store<NodeAttestation>,
    pub pending: Store<PendingNode>,
    pub versions: Store<NodeVersion>,
}

impl Stores {
    /// Waits until every store has its first full list.
    pub async fn ready(&self) {
        // A store whose writer is gone never becomes ready; the controller
        // then ends anyway.
        futures::join!(
            wait_ready(&self.nodes),
            wait_ready(&self.attestations),
            wait_ready(&self.pending),
            wait_ready(&self.versions),
        );
    }

    /// Waits (bounded) until the PendingNode store shows `check` true: the
    /// planner must see the PendingNodes this reconcile wrote, or it would
    /// create their machines again.
    pub async fn await_pending(&self, what: &str, check: impl Fn(&Store<PendingNode>) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check(&self.pending) {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(%what, "the PendingNode cache did not catch up within 10s");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_ready<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    if let Err(err) = store.wait_until_ready().await {
        tracing::warn!(%err, "a cache will not become ready");
    }
}

fn seconds(t: &Time) -> Seconds {
    t.0.as_second()
}

/// Whether an attestation is valid at `now`: trusted and not expired.
pub fn attestation_valid(a: &NodeAttestation, now: Seconds) -> bool {
    a.spec.verdict == Verdict::Trusted && seconds(&a.spec.expires_at) > now
}

/// The planner's view of a pod on a node being drained.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let controller = owners.iter().find(|o| o.controller == Some(true));
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    PodInfo {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        daemon_set: controller.is_some_and(|o| o.kind == "DaemonSet"),
        mirror: pod
            .annotations()
            .contains_key("kubernetes.io/config.mirror"),
        empty_dir: pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v.iter().any(|v| v.empty_dir.is_some())),
        managed: controller.is_some(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        finished: matches!(phase, Some("Succeeded" | "Failed")),
    }
}

/// The planner's view of one Node with its attestation (if any).
pub fn node_obs(
    node: &Node,
    attestation: Option<&NodeAttestation>,
    now: Seconds,
    pods: Vec<PodInfo>,
) -> NodeObs {
    let status = node.status.as_ref();
    let spec = node.spec.as_ref();
    let valid = attestation.is_some_and(|a| attestation_valid(a, now));
    let annotations = node.annotations();
    NodeObs {
        name: node.name_any(),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        cordoned: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        revoked: spec
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TAINT_UNATTESTED)),
        deleting: node.metadata.deletion_timestamp.is_some(),
        kubelet_version: status
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kubelet_version.clone())
            .unwrap_or_default(),
        attested_image: attestation.filter(|_| valid).map(|a| a.spec.image.clone()),
        attestation_invalid: attestation.is_some() && !valid,
        heir_of: annotations.get(ANNOTATION_HEIR_OF).cloned(),
        donor_for: annotations.get(ANNOTATION_DONOR_FOR).cloned(),
        drain_started: annotations
            .get(ANNOTATION_DRAIN_STARTED)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_second()),
        labels: node.labels().clone(),
        pods,
    }
}

/// The planner's view of a PendingNode.
pub fn pending_obs(p: &PendingNode, now: Seconds) -> PendingObs {
    let status = p.status.clone().unwrap_or_default();
    let failed_at = (status.state == PendingState::Failed).then(|| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "JoinFailed")
            .map_or(now, |c| seconds(&c.last_transition_time))
    });
    PendingObs {
        name: p.name_any(),
        image: p.spec.image.clone(),
        donor: p.annotations().get(ANNOTATION_PENDING_DONOR).cloned(),
        deadline: seconds(&p.spec.deadline),
        attempts: u32::try_from(status.attempts).unwrap_or(0).max(1),
        failed_at,
    }
}

/// Whether a control-plane pool is still rolling (worker pools wait).
pub fn control_plane_rolling(versions: &[Arc<NodeVersion>]) -> bool {
    versions.iter().any(|v| {
        v.spec.control_plane
            && v.status.as_ref().is_none_or(|s| {
                s.outdated_count > 0 || !s.donors.is_empty() || !s.invalid.is_empty()
            })
    })
}

/// Everything the planner needs about the pool `desired`, from snapshots of
/// the caches and the pods of cordoned nodes.
pub fn observed_of(
    desired: &Desired,
    now: Seconds,
    nodes: &[Arc<Node>],
    attestations: &[Arc<NodeAttestation>],
    pending: &[Arc<PendingNode>],
    versions: &[Arc<NodeVersion>],
    mut pods_of: BTreeMap<String, Vec<PodInfo>>,
) -> Observed {
    let by_node: BTreeMap<&str, &NodeAttestation> = attestations
        .iter()
        .map(|a| (a.spec.node_name.as_str(), a.as_ref()))
        .collect();
    let mut observed_nodes: Vec<NodeObs> = nodes
        .iter()
        .filter(|n| n.labels().get(LABEL_NODE_POOL) == Some(&desired.pool))
        .map(|n| {
            let name = n.name_any();
            let pods = pods_of.remove(&name).unwrap_or_default();
            node_obs(n, by_node.get(name.as_str()).copied(), now, pods)
        })
        .collect();
    observed_nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut pending: Vec<PendingObs> = pending
        .iter()
        .filter(|p| p.spec.pool == desired.pool && p.spec.goal == PendingGoal::Join)
        .map(|p| pending_obs(p, now))
        .collect();
    pending.sort_by(|a, b| a.name.cmp(&b.name));
    let earliest_expiry = observed_nodes
        .iter()
        .filter(|n| n.attested_image.is_some())
        .filter_map(|n| by_node.get(n.name.as_str()))
        .map(|a| seconds(&a.spec.expires_at))
        .min();
    Observed {
        now,
        nodes: observed_nodes,
        pending,
        control_plane_rolling: !desired.control_plane && control_plane_rolling(versions),
        earliest_expiry,
    }
}

/// Observes the pool: snapshots of the caches, and the pods of its cordoned
/// nodes listed from the API.
pub async fn observe(
    client: &Client,
    stores: &Stores,
    desired: &Desired,
) -> Result<Observed, Error> {
    let now = jiff::Timestamp::now().as_second();
    let nodes = stores.nodes.state();
    let pods_api: Api<Pod> = Api::all(client.clone());
    let mut pods_of = BTreeMap::new();
    for node in nodes.iter().filter(|n| {
        n.labels().get(LABEL_NODE_POOL) == Some(&desired.pool)
            && n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
    }) {
        let name = node.name_any();
        let pods = pods_api
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await?
            .iter()
            .map(pod_info)
            .collect();
        pods_of.insert(name, pods);
    }
    Ok(observed_of(
        desired,
        now,
        &nodes,
        &stores.attestations.state(),
        &stores.pending.state(),
        &stores.versions.state(),
        pods_of,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, pool: &str, extra: serde_json::Value) -> Arc<Node> {
        let mut value = json!({
            "metadata": { "name": name, "labels": { LABEL_NODE_POOL: pool },
                "annotations": { ANNOTATION_HEIR_OF: "old-0",
                    ANNOTATION_DRAIN_STARTED: "2026-01-01T00:00:10Z" } },
            "status": {
                "conditions": [{ "type": "Ready", "status": "True" }],
                "nodeInfo": { "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                    "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "v1.35.4",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64" }
            }
        });
        if let (Some(target), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            target.extend(extra.clone());
        }
        Arc::new(serde_json::from_value(value).unwrap_or_else(|e| panic!("node fixture: {e}")))
    }

    fn attestation(node: &str, verdict: &str, expires: &str) -> Arc<NodeAttestation> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "confidential.dev/v1alpha1", "kind": "NodeAttestation",
                "metadata": { "name": node },
                "spec": { "nodeName": node, "evidenceKind": "Tpm", "image": "node:v2",
                    "akFingerprint": "00", "attestedAt": "2026-01-01T00:00:00Z",
                    "expiresAt": expires, "verdict": verdict }
            }))
            .unwrap_or_else(|e| panic!("attestation fixture: {e}")),
        )
    }

    fn desired() -> Desired {
        crate::planner::tests::desired(2)
    }

    const NOW: Seconds = 1_767_225_600; // 2026-01-01T00:00:00Z

    #[test]
    fn nodes_of_the_pool_carry_their_attestation_annotations_and_readiness() {
        let nodes = vec![
            node("b", "workers", json!({})),
            node("a", "workers", json!({})),
            node("x", "other", json!({})),
        ];
        let atts = vec![
            attestation("a", "Trusted", "2026-01-02T00:00:00Z"),
            attestation("b", "Trusted", "2025-12-31T00:00:00Z"),
        ];
        let observed = observed_of(&desired(), NOW, &nodes, &atts, &[], &[], BTreeMap::new());
        let names: Vec<&str> = observed.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"], "only the pool, by name");
        let a = &observed.nodes[0];
        assert!(a.ready);
        assert_eq!(a.attested_image.as_deref(), Some("node:v2"));
        assert!(!a.attestation_invalid);
        assert_eq!(a.heir_of.as_deref(), Some("old-0"));
        assert_eq!(a.drain_started, Some(NOW + 10));
        assert_eq!(a.kubelet_version, "v1.35.4");
        let b = &observed.nodes[1];
        assert_eq!(b.attested_image, None, "expired");
        assert!(b.attestation_invalid);
        assert_eq!(observed.earliest_expiry, Some(NOW + 86_400));
    }

    #[test]
    fn an_untrusted_verdict_is_invalid_and_the_unattested_taint_means_revoked() {
        let nodes = vec![node(
            "a",
            "workers",
            json!({ "spec": { "unschedulable": true, "taints": [
                { "key": TAINT_UNATTESTED, "effect": "NoExecute" }] } }),
        )];
        let atts = vec![attestation("a", "Revoked", "2026-01-02T00:00:00Z")];
        let observed = observed_of(&desired(), NOW, &nodes, &atts, &[], &[], BTreeMap::new());
        let a = &observed.nodes[0];
        assert!(a.attestation_invalid);
        assert!(a.revoked);
        assert!(a.cordoned);
        assert_eq!(observed.earliest_expiry, None);
    }

    #[test]
    fn a_failed_pending_node_reports_when_it_failed() {
        let pending: PendingNode = serde_json::from_value(json!({
            "apiVersion": "confidential.dev/v1alpha1", "kind": "PendingNode",
            "metadata": { "name": "new-0", "annotations": { ANNOTATION_PENDING_DONOR: "old-0" } },
            "spec": { "nodeName": "new-0", "pool": "workers", "goal": "Join",
                "image": "node:v2", "deadline": "2026-01-01T00:01:00Z" },
            "status": { "state": "Failed", "attempts": 2, "conditions": [{
                "type": "JoinFailed", "status": "True", "reason": "JoinDeadlineExceeded",
                "message": "", "lastTransitionTime": "2026-01-01T00:01:05Z" }] }
        }))
        .unwrap_or_else(|e| panic!("pending fixture: {e}"));
        let obs = pending_obs(&pending, NOW);
        assert_eq!(obs.donor.as_deref(), Some("old-0"));
        assert_eq!(obs.attempts, 2);
        assert_eq!(obs.deadline, NOW + 60);
        assert_eq!(obs.failed_at, Some(NOW + 65));
    }
}
