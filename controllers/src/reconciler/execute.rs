//! Carries out the planner's actions, one small function per action. Every
//! one is idempotent (a repeat after a crash or a stale observation changes
//! nothing more) and tells the user what happened with an Event.

use confidential_api::conditions;
use confidential_api::keys::{
    ANNOTATION_DONOR_FOR, ANNOTATION_DRAIN_STARTED, ANNOTATION_HEIR_OF, ANNOTATION_PENDING_DONOR,
    FIELD_MANAGER, TAINT_UNATTESTED,
};
use confidential_api::{
    NodeVersion, PendingGoal, PendingNode, PendingNodeSpec, PendingNodeStatus, PendingState,
};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, EvictParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::events::{node_ref, publish};
use super::node_apply::{NodeChange, apply_body, changed, current_intent};
use super::{Context, Error};
use crate::metrics::{Outcome, Pool};
use crate::planner::{Action, Desired, Seconds};
use crate::provider::{Leave, LeaveRequest, MachineRequest};

/// One action for one pool.
pub struct Step<'a> {
    pub ctx: &'a Context,
    pub nv: &'a NodeVersion,
    pub desired: &'a Desired,
}

impl Step<'_> {
    fn nodes(&self) -> Api<Node> {
        Api::all(self.ctx.client.clone())
    }

    fn pending(&self) -> Api<PendingNode> {
        Api::all(self.ctx.client.clone())
    }

    fn pool_ref(&self) -> ObjectReference {
        self.nv.object_ref(&())
    }

    fn machine_request(&self, name: &str, image: &str) -> MachineRequest {
        MachineRequest {
            name: name.to_owned(),
            pool: self.desired.pool.clone(),
            image: image.to_owned(),
            kubernetes_version: self.desired.kubernetes_version.clone(),
            control_plane: self.desired.control_plane,
        }
    }

    /// Executes `action`; returns the pod (`namespace/name`) whose eviction
    /// a PodDisruptionBudget refused, if that is what happened.
    pub async fn execute(&self, action: &Action) -> Result<Option<String>, Error> {
        tracing::debug!(pool = %self.desired.pool, ?action, "executing");
        match action {
            Action::EnsureMachine { name, image } => {
                let request = self.machine_request(name, image);
                self.ctx.provider.create_machine(&request).await?;
            }
            Action::CreateMachine {
                name,
                image,
                donor,
                attempt,
                deadline,
            } => {
                self.create_machine(name, image, donor.as_deref(), *attempt, *deadline)
                    .await?;
            }
            Action::PairHeir { heir, donor } => self.pair_heir(heir, donor).await?,
            Action::CopyLabels { to, labels } => {
                self.apply_node(to, &NodeChange::Label(labels.clone()))
                    .await?;
            }
            Action::Cordon { node, start_drain } => self.cordon(node, *start_drain).await?,
            Action::Revoke { node, reason } => self.revoke(node, reason).await?,
            Action::Evict {
                node,
                namespace,
                pod,
            } => return self.evict(node, namespace, pod).await,
            Action::LeaveControlPlane { node } => self.leave_control_plane(node).await?,
            Action::DeleteMachine { name } => self.ctx.provider.delete_machine(name).await?,
            Action::DeleteNode { node } => self.delete_node(node).await?,
            Action::MarkFailed { name, reason } => self.mark_failed(name, reason).await?,
            Action::ForgetPending { name } => {
                ignore_not_found(self.pending().delete(name, &DeleteParams::default()).await)?;
            }
            Action::UpdateStatus(_) => {}
        }
        Ok(None)
    }

    /// Records the PendingNode (attempt, donor), then asks the provider.
    async fn create_machine(
        &self,
        name: &str,
        image: &str,
        donor: Option<&str>,
        attempt: u32,
        deadline: Seconds,
    ) -> Result<(), Error> {
        let pending = self.pending();
        let mut record = PendingNode::new(
            name,
            PendingNodeSpec {
                node_name: name.to_owned(),
                pool: self.desired.pool.clone(),
                goal: PendingGoal::Join,
                provider_id: None,
                image: image.to_owned(),
                deadline: time_at(deadline),
            },
        );
        if let Some(d) = donor {
            record
                .annotations_mut()
                .insert(ANNOTATION_PENDING_DONOR.into(), d.to_owned());
        }
        match pending.create(&PostParams::default(), &record).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
        let status = PendingNodeStatus {
            state: PendingState::Creating,
            attempts: i32::try_from(attempt).unwrap_or(i32::MAX),
            conditions: vec![],
        };
        pending
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        let machine = self
            .ctx
            .provider
            .create_machine(&self.machine_request(name, image))
            .await?;
        pending
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "providerId": machine.provider_id } })),
            )
            .await?;
        let what = donor.map_or_else(|| "a new slot".to_owned(), |d| format!("donor {d}"));
        publish(
            self.ctx,
            &self.pool_ref(),
            false,
            "MachineCreated",
            "CreateMachine",
            format!("created machine {name} for {what} (attempt {attempt})"),
        );
        Ok(())
    }

    /// Applies one change to the operator's configuration of a Node.
    async fn apply_node(&self, name: &str, change: &NodeChange) -> Result<bool, Error> {
        let nodes = self.nodes();
        let Some(node) = nodes.get_opt(name).await? else {
            return Ok(false);
        };
        let intent = changed(current_intent(&node), change);
        let body = apply_body(name, &intent);
        ignore_not_found(
            nodes
                .patch(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await,
        )?;
        Ok(true)
    }

    async fn pair_heir(&self, heir: &str, donor: &str) -> Result<(), Error> {
        let annotate = |key: &str, value: &str| NodeChange::Annotate {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        self.apply_node(heir, &annotate(ANNOTATION_HEIR_OF, donor))
            .await?;
        self.apply_node(donor, &annotate(ANNOTATION_DONOR_FOR, heir))
            .await?;
        publish(
            self.ctx,
            &self.pool_ref(),
            false,
            "HeirReady",
            "PairHeir",
            format!(
                "{heir} is Ready and attested for {}; it replaces {donor}",
                self.desired.image
            ),
        );
        Ok(())
    }

    async fn cordon(&self, node: &str, start_drain: bool) -> Result<(), Error> {
        let drain_started = start_drain.then(|| {
            (
                ANNOTATION_DRAIN_STARTED.to_owned(),
                jiff::Timestamp::now().to_string(),
            )
        });
        if !self
            .apply_node(node, &NodeChange::Cordon { drain_started })
            .await?
        {
            return Ok(());
        }
        let note = if start_drain {
            format!("cordoned {node} and started draining it")
        } else {
            format!("cordoned {node}: it has no NodeAttestation")
        };
        publish(
            self.ctx,
            &node_ref(node),
            !start_drain,
            "Cordoned",
            "Cordon",
            note.clone(),
        );
        publish(
            self.ctx,
            &self.pool_ref(),
            false,
            "Cordoned",
            "Cordon",
            note,
        );
        Ok(())
    }

    /// Taints `node` `NoExecute` with [`TAINT_UNATTESTED`] and cordons it,
    /// in one update guarded by the Node's resourceVersion: `spec.taints` is
    /// an atomic list (an apply would take the whole list from the node
    /// lifecycle controller), so the list as read is extended and written
    /// back; a concurrent change fails with a conflict and the next
    /// reconcile tries again.
    async fn revoke(&self, name: &str, reason: &str) -> Result<(), Error> {
        let nodes = self.nodes();
        let Some(node) = nodes.get_opt(name).await? else {
            return Ok(());
        };
        let spec = node.spec.clone().unwrap_or_default();
        let mut taints = spec.taints.unwrap_or_default();
        let tainted = taints
            .iter()
            .any(|t| t.key == TAINT_UNATTESTED && t.effect == "NoExecute");
        if tainted && spec.unschedulable == Some(true) {
            return Ok(());
        }
        if !tainted {
            taints.retain(|t| t.key != TAINT_UNATTESTED);
            taints.push(Taint {
                key: TAINT_UNATTESTED.to_owned(),
                value: Some("revoked".to_owned()),
                effect: "NoExecute".to_owned(),
                time_added: Some(Time(jiff::Timestamp::now())),
            });
        }
        let patch = json!({
            "metadata": { "resourceVersion": node.resource_version() },
            "spec": { "taints": taints, "unschedulable": true },
        });
        ignore_not_found(
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        )?;
        let note = format!(
            "{reason}: tainted {TAINT_UNATTESTED}:NoExecute and cordoned; it will be drained and replaced"
        );
        tracing::warn!(node = %name, %reason, "revoked node");
        publish(
            self.ctx,
            &node_ref(name),
            true,
            "Revoked",
            "Revoke",
            note.clone(),
        );
        publish(
            self.ctx,
            &self.pool_ref(),
            true,
            "NodeRevoked",
            "Revoke",
            note,
        );
        Ok(())
    }

    /// Evicts through the Eviction API; a 429 is a PDB saying not now.
    async fn evict(&self, node: &str, namespace: &str, pod: &str) -> Result<Option<String>, Error> {
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace);
        let count = |result: &str| {
            self.ctx
                .metrics
                .evictions
                .get_or_create(&Outcome {
                    result: result.into(),
                })
                .inc();
        };
        match pods.evict(pod, &EvictParams::default()).await {
            Ok(_) => {
                count("evicted");
                publish(
                    self.ctx,
                    &node_ref(node),
                    false,
                    "Evicted",
                    "Drain",
                    format!("evicted {namespace}/{pod}"),
                );
                Ok(None)
            }
            Err(kube::Error::Api(s)) if s.code == 429 => {
                count("refused");
                Ok(Some(format!("{namespace}/{pod}")))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// etcd (issue 9): the donor leaves etcd before its machine and Node go;
    /// while that would cost quorum, the rest of its group waits.
    async fn leave_control_plane(&self, node: &str) -> Result<(), Error> {
        let request = LeaveRequest {
            node: node.to_owned(),
            pool: self.desired.pool.clone(),
            replicas: self.desired.replicas,
        };
        if let Leave::Wait(reason) = self.ctx.provider.leave_control_plane(&request).await? {
            publish(
                self.ctx,
                &node_ref(node),
                true,
                "EtcdRemovalWaiting",
                "LeaveControlPlane",
                reason.clone(),
            );
            return Err(Error::LeaveWaits {
                node: node.to_owned(),
                reason,
            });
        }
        publish(
            self.ctx,
            &self.pool_ref(),
            false,
            "LeftEtcd",
            "LeaveControlPlane",
            format!("{node} left etcd"),
        );
        Ok(())
    }

    async fn delete_node(&self, node: &str) -> Result<(), Error> {
        ignore_not_found(self.nodes().delete(node, &DeleteParams::default()).await)?;
        publish(
            self.ctx,
            &self.pool_ref(),
            false,
            "NodeReplaced",
            "DeleteNode",
            format!("drained and deleted {node}"),
        );
        Ok(())
    }

    /// The machine missed its join deadline: delete it (machine and any
    /// Node) and mark its PendingNode Failed.
    async fn mark_failed(&self, name: &str, reason: &str) -> Result<(), Error> {
        self.ctx.provider.delete_machine(name).await?;
        ignore_not_found(self.nodes().delete(name, &DeleteParams::default()).await)?;
        let failed = conditions::condition(
            "JoinFailed",
            true,
            "JoinDeadlineExceeded",
            reason.to_owned(),
            None,
            Time(jiff::Timestamp::now()),
        );
        let patch = json!({ "status": { "state": PendingState::Failed, "conditions": [failed] } });
        ignore_not_found(
            self.pending()
                .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        )?;
        self.ctx
            .metrics
            .failed_joins
            .get_or_create(&Pool {
                pool: self.desired.pool.clone(),
            })
            .inc();
        publish(
            self.ctx,
            &self.pool_ref(),
            true,
            "JoinFailed",
            "MarkFailed",
            reason.to_owned(),
        );
        Ok(())
    }
}

fn time_at(s: Seconds) -> Time {
    Time(jiff::Timestamp::from_second(s).unwrap_or_else(|_| jiff::Timestamp::now()))
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// What an action touches: actions on the same object run in plan order,
/// actions on different objects run concurrently. Applies to Nodes
/// (pairing, labels, cordons) run one after another: each states the whole
/// applied configuration of its Node, and pairing touches two Nodes.
pub fn action_key(action: &Action) -> String {
    match action {
        Action::CreateMachine { name, .. }
        | Action::EnsureMachine { name, .. }
        | Action::MarkFailed { name, .. }
        | Action::ForgetPending { name }
        | Action::DeleteMachine { name } => name.clone(),
        Action::PairHeir { .. } | Action::CopyLabels { .. } | Action::Cordon { .. } => {
            "node-applies".into()
        }
        Action::Revoke { node, .. }
        | Action::LeaveControlPlane { node }
        | Action::DeleteNode { node } => node.clone(),
        Action::Evict { namespace, pod, .. } => format!("pod/{namespace}/{pod}"),
        Action::UpdateStatus(_) => "status".into(),
    }
}
