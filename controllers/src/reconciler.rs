//! The NodeVersion reconciler: observes a pool in the API (Nodes,
//! NodeAttestations, PendingNodes, pods of donors), asks the planner for the
//! next actions and executes them idempotently. Progress lives only in the
//! API: PendingNodes (machines being created, attempts, failures), Node
//! annotations (heir/donor pairing, drain start), cordons, and the
//! NodeVersion status written by server-side apply. Killing the process at
//! any point and starting it again resumes the rollout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use confidential_api::conditions::{self, set_condition, types};
use confidential_api::keys::{
    ANNOTATION_DONOR_FOR, ANNOTATION_DRAIN_STARTED, ANNOTATION_HEIR_OF, ANNOTATION_PENDING_DONOR,
    FIELD_MANAGER, LABEL_NODE_POOL,
};
use confidential_api::{
    NodeAttestation, NodeVersion, NodeVersionStatus, PendingGoal, PendingNode, PendingNodeSpec,
    PendingNodeStatus, PendingState, Verdict,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::metrics::{Metrics, Outcome, Pool, PoolState};
use crate::planner::{
    self, Action, Amount, Blocked, DEFAULT_MAX_JOIN_ATTEMPTS, Desired, NodeObs, Observed,
    PendingObs, PodInfo, PoolStatus, Seconds,
};
use crate::provider::{Leave, LeaveRequest, MachineRequest, Provider, ProviderError};

/// Errors of a reconcile; all are retried by the error policy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("invalid NodeVersion {name}: {reason}")]
    Invalid { name: String, reason: String },
    /// etcd (issue 9): the donor may not leave etcd yet; the rest of its
    /// actions wait (caught per action group, never fails a reconcile).
    #[error("{node} waits to leave etcd: {reason}")]
    LeaveWaits { node: String, reason: String },
}

/// Tunables of the reconciler.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Requeue interval while a rollout is in progress.
    pub busy_requeue: Duration,
    /// Requeue interval when the pool is settled.
    pub idle_requeue: Duration,
    pub max_join_attempts: u32,
    /// First retry delay after a failed join, seconds.
    pub join_retry_backoff: Seconds,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            busy_requeue: Duration::from_secs(2),
            idle_requeue: Duration::from_secs(60),
            max_join_attempts: DEFAULT_MAX_JOIN_ATTEMPTS,
            join_retry_backoff: planner::JOIN_RETRY_BACKOFF,
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub provider: Arc<dyn Provider>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub settings: Settings,
}

impl Context {
    pub fn new(
        client: Client,
        provider: Arc<dyn Provider>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "confidential-controllers".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Self {
            client,
            provider,
            metrics,
            recorder,
            settings,
        })
    }
}

fn amount(value: Option<&IntOrString>, default: u32) -> Result<Amount, String> {
    match value {
        None => Ok(Amount::Count(default)),
        Some(IntOrString::Int(n)) => u32::try_from(*n)
            .map(Amount::Count)
            .map_err(|_| format!("negative amount {n}")),
        Some(IntOrString::String(s)) => Amount::parse(s).ok_or_else(|| format!("bad amount {s:?}")),
    }
}

/// The planner's view of a NodeVersion.
pub fn desired_of(nv: &NodeVersion, settings: &Settings) -> Result<Desired, Error> {
    let name = nv.name_any();
    let invalid = |reason: String| Error::Invalid {
        name: name.clone(),
        reason,
    };
    let s = &nv.spec.strategy;
    Ok(Desired {
        pool: name.clone(),
        image: nv.spec.image.clone(),
        kubernetes_version: nv.spec.kubernetes_version.clone(),
        replicas: u32::try_from(nv.spec.replicas)
            .map_err(|_| invalid("negative replicas".into()))?,
        control_plane: nv.spec.control_plane,
        max_surge: amount(s.max_surge.as_ref(), 1).map_err(invalid)?,
        max_unavailable: amount(s.max_unavailable.as_ref(), 0).map_err(invalid)?,
        drain_timeout: s.drain_timeout_seconds.unwrap_or(600).max(0),
        join_deadline: s.join_deadline_seconds.unwrap_or(600).max(1),
        max_join_attempts: settings.max_join_attempts,
        join_retry_backoff: settings.join_retry_backoff,
        delete_empty_dir_data: s.delete_empty_dir_data,
        evict_unmanaged_pods: s.evict_unmanaged_pods,
    })
}

fn seconds(t: &Time) -> Seconds {
    t.0.as_second()
}

fn now() -> Seconds {
    jiff::Timestamp::now().as_second()
}

fn time_at(s: Seconds) -> Time {
    Time(jiff::Timestamp::from_second(s).unwrap_or_else(|_| jiff::Timestamp::now()))
}

fn pod_info(pod: &Pod) -> PodInfo {
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

/// Reads everything the planner needs about the pool.
pub async fn observe(client: &Client, desired: &Desired) -> Result<Observed, Error> {
    let now = now();
    let pool_selector = format!("{LABEL_NODE_POOL}={}", desired.pool);
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes
        .list(&ListParams::default().labels(&pool_selector))
        .await?;
    let attestations: Api<NodeAttestation> = Api::all(client.clone());
    let mut by_node: BTreeMap<String, NodeAttestation> = BTreeMap::new();
    for a in attestations.list(&ListParams::default()).await? {
        by_node.insert(a.spec.node_name.clone(), a);
    }
    let pending_api: Api<PendingNode> = Api::all(client.clone());
    let pending_list = pending_api.list(&ListParams::default()).await?;
    let pods_api: Api<Pod> = Api::all(client.clone());

    let mut observed_nodes = Vec::new();
    for node in node_list {
        let name = node.name_any();
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let attestation = by_node.get(&name);
        let valid = attestation.is_some_and(|a| {
            a.spec.verdict == Verdict::Trusted && seconds(&a.spec.expires_at) > now
        });
        let annotations = node.annotations();
        let cordoned = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let pods = if cordoned {
            pods_api
                .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
                .await?
                .iter()
                .map(pod_info)
                .collect()
        } else {
            Vec::new()
        };
        observed_nodes.push(NodeObs {
            name: name.clone(),
            ready,
            cordoned,
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
        });
    }
    let pending = pending_list
        .iter()
        .filter(|p| p.spec.pool == desired.pool && p.spec.goal == PendingGoal::Join)
        .map(|p| {
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
        })
        .collect();
    let versions: Api<NodeVersion> = Api::all(client.clone());
    let control_plane_rolling = !desired.control_plane
        && versions
            .list(&ListParams::default())
            .await?
            .iter()
            .any(|v| {
                v.spec.control_plane
                    && v.status.as_ref().is_none_or(|s| {
                        s.outdated_count > 0 || !s.donors.is_empty() || !s.invalid.is_empty()
                    })
            });
    let earliest_expiry = observed_nodes
        .iter()
        .filter(|n| n.attested_image.is_some())
        .filter_map(|n| by_node.get(&n.name))
        .map(|a| seconds(&a.spec.expires_at))
        .min();
    Ok(Observed {
        now,
        nodes: observed_nodes,
        pending,
        control_plane_rolling,
        earliest_expiry,
    })
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Results of executing a plan that feed back into the status.
#[derive(Default)]
struct Outcomes {
    /// Pods whose eviction was refused (429: a PDB), `namespace/name`.
    refused: Vec<String>,
}

/// Publishes an Event without waiting for it: Events are best effort and
/// must not slow the rollout down.
async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    let recorder = ctx.recorder.clone();
    let reference = reference.clone();
    tokio::spawn(async move {
        if let Err(err) = recorder.publish(&event, &reference).await {
            tracing::debug!(%err, "publishing event");
        }
    });
}

fn node_ref(name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.to_owned()),
        uid: Some(name.to_owned()),
        ..Default::default()
    }
}

async fn execute(
    ctx: &Context,
    nv: &NodeVersion,
    desired: &Desired,
    action: &Action,
) -> Result<Option<String>, Error> {
    let client = &ctx.client;
    let nodes: Api<Node> = Api::all(client.clone());
    let pending: Api<PendingNode> = Api::all(client.clone());
    let nv_ref = nv.object_ref(&());
    match action {
        Action::CreateMachine {
            name,
            image,
            donor,
            attempt,
            deadline,
        } => {
            let mut record = PendingNode::new(
                name,
                PendingNodeSpec {
                    node_name: name.clone(),
                    pool: desired.pool.clone(),
                    goal: PendingGoal::Join,
                    provider_id: None,
                    image: image.clone(),
                    deadline: time_at(*deadline),
                },
            );
            if let Some(d) = donor {
                record
                    .annotations_mut()
                    .insert(ANNOTATION_PENDING_DONOR.into(), d.clone());
            }
            match pending.create(&PostParams::default(), &record).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(err) => return Err(err.into()),
            }
            let status = PendingNodeStatus {
                state: PendingState::Creating,
                attempts: i32::try_from(*attempt).unwrap_or(i32::MAX),
                conditions: vec![],
            };
            pending
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": status })),
                )
                .await?;
            let machine = ctx
                .provider
                .create_machine(&MachineRequest {
                    name: name.clone(),
                    pool: desired.pool.clone(),
                    image: image.clone(),
                    kubernetes_version: desired.kubernetes_version.clone(),
                    control_plane: desired.control_plane,
                })
                .await?;
            pending
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "providerId": machine.provider_id } })),
                )
                .await?;
            let what = donor
                .as_ref()
                .map_or_else(|| "a new slot".to_owned(), |d| format!("donor {d}"));
            publish(
                ctx,
                &nv_ref,
                false,
                "MachineCreated",
                "CreateMachine",
                format!("created machine {name} for {what} (attempt {attempt})"),
            )
            .await;
        }
        Action::PairHeir { heir, donor } => {
            let heir_patch =
                json!({ "metadata": { "annotations": { ANNOTATION_HEIR_OF: donor } } });
            nodes
                .patch(heir, &PatchParams::default(), &Patch::Merge(heir_patch))
                .await?;
            let donor_patch =
                json!({ "metadata": { "annotations": { ANNOTATION_DONOR_FOR: heir } } });
            nodes
                .patch(donor, &PatchParams::default(), &Patch::Merge(donor_patch))
                .await?;
            publish(
                ctx,
                &nv_ref,
                false,
                "HeirReady",
                "PairHeir",
                format!(
                    "{heir} is Ready and attested for {}; it replaces {donor}",
                    desired.image
                ),
            )
            .await;
        }
        Action::CopyLabels { to, labels } => {
            let patch = json!({ "metadata": { "labels": labels } });
            nodes
                .patch(to, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
        Action::Cordon { node, start_drain } => {
            let mut patch = json!({ "spec": { "unschedulable": true } });
            if *start_drain {
                patch["metadata"] = json!({ "annotations": {
                    ANNOTATION_DRAIN_STARTED: jiff::Timestamp::now().to_string() } });
            }
            ignore_not_found(
                nodes
                    .patch(node, &PatchParams::default(), &Patch::Merge(patch))
                    .await,
            )?;
            let note = if *start_drain {
                format!("cordoned {node} and started draining it")
            } else {
                format!("cordoned {node}: its attestation is not valid")
            };
            publish(
                ctx,
                &node_ref(node),
                !*start_drain,
                "Cordoned",
                "Cordon",
                note.clone(),
            )
            .await;
            publish(ctx, &nv_ref, false, "Cordoned", "Cordon", note).await;
        }
        Action::Evict {
            node,
            namespace,
            pod,
        } => {
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            match pods.evict(pod, &EvictParams::default()).await {
                Ok(_) => {
                    ctx.metrics
                        .evictions
                        .get_or_create(&Outcome {
                            result: "evicted".into(),
                        })
                        .inc();
                    publish(
                        ctx,
                        &node_ref(node),
                        false,
                        "Evicted",
                        "Drain",
                        format!("evicted {namespace}/{pod}"),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if s.code == 429 => {
                    ctx.metrics
                        .evictions
                        .get_or_create(&Outcome {
                            result: "refused".into(),
                        })
                        .inc();
                    return Ok(Some(format!("{namespace}/{pod}")));
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
        // etcd (issue 9): the donor leaves etcd before its machine and Node
        // go; while that would cost quorum, the rest of its group waits.
        Action::LeaveControlPlane { node } => {
            let request = LeaveRequest {
                node: node.clone(),
                pool: desired.pool.clone(),
                replicas: desired.replicas,
            };
            if let Leave::Wait(reason) = ctx.provider.leave_control_plane(&request).await? {
                publish(
                    ctx,
                    &node_ref(node),
                    true,
                    "EtcdRemovalWaiting",
                    "LeaveControlPlane",
                    reason.clone(),
                )
                .await;
                return Err(Error::LeaveWaits {
                    node: node.clone(),
                    reason,
                });
            }
            publish(
                ctx,
                &nv_ref,
                false,
                "LeftEtcd",
                "LeaveControlPlane",
                format!("{node} left etcd"),
            )
            .await;
        }
        Action::DeleteMachine { name } => {
            ctx.provider.delete_machine(name).await?;
        }
        Action::DeleteNode { node } => {
            ignore_not_found(nodes.delete(node, &DeleteParams::default()).await)?;
            publish(
                ctx,
                &nv_ref,
                false,
                "NodeReplaced",
                "DeleteNode",
                format!("drained and deleted {node}"),
            )
            .await;
        }
        Action::MarkFailed { name, reason } => {
            ctx.provider.delete_machine(name).await?;
            ignore_not_found(nodes.delete(name, &DeleteParams::default()).await)?;
            let failed = conditions::condition(
                "JoinFailed",
                true,
                "JoinDeadlineExceeded",
                reason.clone(),
                None,
                Time(jiff::Timestamp::now()),
            );
            let patch =
                json!({ "status": { "state": PendingState::Failed, "conditions": [failed] } });
            ignore_not_found(
                pending
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await,
            )?;
            ctx.metrics
                .failed_joins
                .get_or_create(&Pool {
                    pool: desired.pool.clone(),
                })
                .inc();
            publish(
                ctx,
                &nv_ref,
                true,
                "JoinFailed",
                "MarkFailed",
                reason.clone(),
            )
            .await;
        }
        Action::ForgetPending { name } => {
            ignore_not_found(pending.delete(name, &DeleteParams::default()).await)?;
        }
        Action::UpdateStatus(_) => {}
    }
    Ok(None)
}

/// What an action touches: actions on the same object run in plan order,
/// actions on different objects run concurrently.
fn action_key(action: &Action) -> String {
    match action {
        Action::CreateMachine { name, .. }
        | Action::MarkFailed { name, .. }
        | Action::ForgetPending { name }
        | Action::DeleteMachine { name } => name.clone(),
        Action::PairHeir { donor, .. } => donor.clone(),
        Action::CopyLabels { to, .. } => format!("labels/{to}"),
        Action::Cordon { node, .. }
        | Action::LeaveControlPlane { node }
        | Action::DeleteNode { node } => node.clone(),
        Action::Evict { namespace, pod, .. } => format!("pod/{namespace}/{pod}"),
        Action::UpdateStatus(_) => "status".into(),
    }
}

fn blocked_message(blocked: &[Blocked]) -> (String, String) {
    let mut reason = String::new();
    let mut parts = Vec::new();
    for b in blocked {
        match b {
            Blocked::JoinsFailing { donor, attempts } => {
                reason = "JoinsFailing".into();
                parts.push(format!(
                    "machines {} failed to join and attest {attempts} times",
                    donor
                        .as_ref()
                        .map_or_else(|| "for a new slot".to_owned(), |d| format!("replacing {d}"))
                ));
            }
            Blocked::DrainTimeout { node, pods } => {
                if reason.is_empty() {
                    reason = "DrainTimeout".into();
                }
                parts.push(format!(
                    "drain of {node} exceeded its timeout; still waiting for {} (evictions are retried, pods are never deleted directly)",
                    pods.join(", ")
                ));
            }
            Blocked::PodsNotEvictable { node, pods } => {
                if reason.is_empty() {
                    reason = "PodsNotEvictable".into();
                }
                parts.push(format!(
                    "{node} runs pods that may not be evicted without opt-in (emptyDir: deleteEmptyDirData; no controller: evictUnmanagedPods): {}",
                    pods.join(", ")
                ));
            }
            // etcd (issue 9)
            Blocked::EtcdUnavailable { reason: why } => {
                reason = "EtcdUnavailable".into();
                parts.push(why.clone());
            }
            Blocked::EtcdQuorumWait { node, reason: why } => {
                if reason.is_empty() {
                    reason = "EtcdQuorumWait".into();
                }
                parts.push(format!("{node} stays until it can leave etcd: {why}"));
            }
        }
    }
    (reason, parts.join("; "))
}

async fn write_status(
    ctx: &Context,
    nv: &NodeVersion,
    status: &PoolStatus,
    outcomes: &Outcomes,
) -> Result<(), Error> {
    let api: Api<NodeVersion> = Api::all(ctx.client.clone());
    let generation = nv.metadata.generation;
    let now = Time(jiff::Timestamp::now());
    let previous = nv.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
    let outdated = status.outdated.len() + status.invalid.len();
    set_condition(
        &mut conditions,
        conditions::condition(
            types::OUTDATED,
            outdated > 0,
            if outdated > 0 {
                "NodesOutdated"
            } else {
                "AllNodesUpToDate"
            },
            format!(
                "{} outdated, {} invalid, {} up to date",
                status.outdated.len(),
                status.invalid.len(),
                status.up_to_date.len()
            ),
            generation,
            now.clone(),
        ),
    );
    let (reason, message) = blocked_message(&status.blocked);
    let blocked = !status.blocked.is_empty();
    set_condition(
        &mut conditions,
        conditions::condition(
            types::ROLLOUT_BLOCKED,
            blocked,
            if blocked { &reason } else { "NotBlocked" },
            if blocked { message } else { String::new() },
            generation,
            now.clone(),
        ),
    );
    let was_progressing = conditions::is_true(&previous.conditions, types::ROLLOUT_PROGRESSING);
    set_condition(
        &mut conditions,
        conditions::condition(
            types::ROLLOUT_PROGRESSING,
            status.progressing,
            if status.progressing {
                "ReplacingNodes"
            } else {
                "RolloutComplete"
            },
            format!(
                "{} donors, {} heirs, {} pending",
                status.donors.len(),
                status.heirs.len(),
                status.pending.len()
            ),
            generation,
            now.clone(),
        ),
    );
    if was_progressing
        && !status.progressing
        && let Some(started) = previous
            .conditions
            .iter()
            .find(|c| c.type_ == types::ROLLOUT_PROGRESSING)
    {
        let took = jiff::Timestamp::now().as_second() - seconds(&started.last_transition_time);
        ctx.metrics
            .rollout_duration
            .get_or_create(&Pool {
                pool: nv.name_any(),
            })
            .observe(took.max(0) as f64);
    }
    let mut blocking = status.blocking_pods.clone();
    for pod in &outcomes.refused {
        if !blocking.contains(pod) {
            blocking.push(pod.clone());
        }
    }
    let new = NodeVersionStatus {
        up_to_date: status.up_to_date.clone(),
        outdated: status.outdated.clone(),
        donors: status.donors.clone(),
        heirs: status.heirs.clone(),
        pending: status.pending.clone(),
        invalid: status.invalid.clone(),
        up_to_date_count: i32::try_from(status.up_to_date.len()).unwrap_or(i32::MAX),
        outdated_count: i32::try_from(outdated).unwrap_or(i32::MAX),
        blocking_pods: blocking,
        conditions,
        observed_generation: generation,
    };
    if blocked && !conditions::is_true(&previous.conditions, types::ROLLOUT_BLOCKED) {
        publish(
            ctx,
            &nv.object_ref(&()),
            true,
            "RolloutBlocked",
            "Rollout",
            blocked_message(&status.blocked).1,
        )
        .await;
    }
    let pool = nv.name_any();
    for (state, count) in [
        ("upToDate", status.up_to_date.len()),
        ("outdated", status.outdated.len()),
        ("invalid", status.invalid.len()),
        ("donor", status.donors.len()),
        ("heir", status.heirs.len()),
        ("pending", status.pending.len()),
    ] {
        ctx.metrics
            .nodes
            .get_or_create(&PoolState {
                pool: pool.clone(),
                state: state.into(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    if Some(&new) == nv.status.as_ref() {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "confidential.dev/v1alpha1",
        "kind": "NodeVersion",
        "status": new,
    });
    api.patch_status(
        &nv.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Reconciles one pool: observe, plan, execute, write status.
pub async fn reconcile(nv: Arc<NodeVersion>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let desired = desired_of(&nv, &ctx.settings)?;
    let observed = observe(&ctx.client, &desired).await?;
    // A crash between recording a PendingNode and asking the provider
    // leaves a record without a machine: ensure every live record has one
    // (creation is idempotent).
    for p in &observed.pending {
        if p.failed_at.is_none()
            && p.deadline >= observed.now
            && !observed.nodes.iter().any(|n| n.name == p.name)
        {
            ctx.provider
                .create_machine(&MachineRequest {
                    name: p.name.clone(),
                    pool: desired.pool.clone(),
                    image: p.image.clone(),
                    kubernetes_version: desired.kubernetes_version.clone(),
                    control_plane: desired.control_plane,
                })
                .await?;
        }
    }
    let actions = planner::plan(&desired, &observed);
    // etcd (issue 9): a control-plane pool does not roll without etcd access.
    let actions = crate::etcd::hold_without_membership(
        &desired,
        ctx.provider.control_plane_membership(),
        actions,
    );
    let mut status = PoolStatus::default();
    let mut groups: Vec<(String, Vec<Action>)> = Vec::new();
    for action in &actions {
        if let Action::UpdateStatus(s) = action {
            status = s.clone();
            continue;
        }
        let key = action_key(action);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(action.clone()),
            None => groups.push((key, vec![action.clone()])),
        }
    }
    let executed: Vec<(Vec<String>, Vec<Blocked>)> = futures::stream::iter(groups)
        .map(|(_, group)| {
            let ctx = ctx.clone();
            let nv = nv.clone();
            let desired = desired.clone();
            async move {
                let mut refused = Vec::new();
                let mut waiting = Vec::new();
                for action in &group {
                    tracing::debug!(pool = %desired.pool, ?action, "executing");
                    match execute(&ctx, &nv, &desired, action).await {
                        Ok(pod) => refused.extend(pod),
                        // etcd (issue 9): the donor keeps its machine and Node.
                        Err(Error::LeaveWaits { node, reason }) => {
                            waiting.push(Blocked::EtcdQuorumWait { node, reason });
                            break;
                        }
                        Err(err) => return Err(err),
                    }
                }
                Ok::<_, Error>((refused, waiting))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let (refused, waiting): (Vec<_>, Vec<_>) = executed.into_iter().unzip();
    status.blocked.extend(waiting.into_iter().flatten());
    let outcomes = Outcomes {
        refused: refused.into_iter().flatten().collect(),
    };
    write_status(&ctx, &nv, &status, &outcomes).await?;
    // Wake up before the earliest attestation of the pool expires.
    let busy = status.progressing || !status.blocked.is_empty();
    let mut after = if busy {
        ctx.settings.busy_requeue
    } else {
        ctx.settings.idle_requeue
    };
    if let Some(expiry) = observed.earliest_expiry {
        let until = u64::try_from(expiry - observed.now + 1).unwrap_or(0);
        after = after.min(Duration::from_secs(until));
    }
    Ok(Requeue::requeue(after))
}

/// Retries failed reconciles after a short delay.
pub fn error_policy(_nv: Arc<NodeVersion>, error: &Error, ctx: Arc<Context>) -> Requeue {
    tracing::warn!(%error, "reconcile failed");
    ctx.metrics.reconcile_errors.inc();
    Requeue::requeue(ctx.settings.busy_requeue)
}

fn pool_ref(pool: Option<&String>) -> Option<ObjectRef<NodeVersion>> {
    pool.map(|p| ObjectRef::new(p))
}

/// Runs the NodeVersion controller until the stream ends.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let versions: Api<NodeVersion> = Api::all(client.clone());
    Controller::new(versions, watcher::Config::default())
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(LABEL_NODE_POOL),
            |node| pool_ref(node.labels().get(LABEL_NODE_POOL)),
        )
        .watches(
            Api::<NodeAttestation>::all(client.clone()),
            watcher::Config::default(),
            |a| pool_ref(a.spec.pool.as_ref()),
        )
        .watches(
            Api::<PendingNode>::all(client.clone()),
            watcher::Config::default(),
            |p| Some(ObjectRef::<NodeVersion>::new(&p.spec.pool)),
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "reconcile");
            }
        })
        .await;
}
