//! The NodeVersion reconciler: observes a pool from the caches of its
//! watches (Nodes, NodeAttestations, PendingNodes, NodeVersions; the pods of
//! donors from the API), asks the planner for the next actions and executes
//! them idempotently. Progress lives only in the API: PendingNodes (machines
//! being created, attempts, failures), Node annotations (heir/donor pairing,
//! drain start), cordons and taints, and the NodeVersion status written by
//! server-side apply. Killing the process at any point and starting it again
//! resumes the rollout.
//!
//! Modules: [`observe`] (caches to the planner's view), [`execute`] (one
//! function per action), [`node_apply`] (Node changes by server-side apply),
//! [`status`] (conditions and counts), [`events`].

use std::sync::Arc;
use std::time::Duration;

use confidential_api::keys::LABEL_NODE_POOL;
use confidential_api::{NodeAttestation, NodeVersion, PendingNode, PendingState};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::metrics::Metrics;
use crate::planner::{self, Action, Amount, DEFAULT_MAX_JOIN_ATTEMPTS, Desired, Seconds};
use crate::provider::{Provider, ProviderError};

pub mod events;
pub mod execute;
pub mod node_apply;
pub mod observe;
pub mod status;

use observe::Stores;

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
    pub stores: Stores,
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

/// Reconciles one pool: observe, plan, execute, write status.
pub async fn reconcile(nv: Arc<NodeVersion>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.stores.ready().await;
    let desired = desired_of(&nv, &ctx.settings)?;
    let observed = observe::observe(&ctx.client, &ctx.stores, &desired).await?;
    let actions = planner::plan(&desired, &observed);
    // etcd (issue 9): a control-plane pool does not roll without etcd access.
    let actions = crate::etcd::hold_without_membership(
        &desired,
        ctx.provider.control_plane_membership(),
        actions,
    );
    let (mut status, groups) = group_actions(&actions);
    let executed: Vec<(Vec<String>, Vec<planner::Blocked>)> = futures::stream::iter(groups)
        .map(|group| {
            let (ctx, nv, desired) = (ctx.clone(), nv.clone(), desired.clone());
            async move {
                let step = execute::Step {
                    ctx: &ctx,
                    nv: &nv,
                    desired: &desired,
                };
                let mut refused = Vec::new();
                let mut waiting = Vec::new();
                for action in &group {
                    match step.execute(action).await {
                        Ok(pod) => refused.extend(pod),
                        // etcd (issue 9): the donor keeps its machine and Node.
                        Err(Error::LeaveWaits { node, reason }) => {
                            waiting.push(planner::Blocked::EtcdQuorumWait { node, reason });
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
    let refused: Vec<String> = refused.into_iter().flatten().collect();
    status::write_status(&ctx, &nv, &status, &refused).await?;
    await_own_writes(&ctx.stores, &actions).await;
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

/// The status the plan ends with, and its other actions grouped by what
/// they touch (see [`execute::action_key`]), in plan order.
fn group_actions(actions: &[Action]) -> (planner::PoolStatus, Vec<Vec<Action>>) {
    let mut status = planner::PoolStatus::default();
    let mut groups: Vec<(String, Vec<Action>)> = Vec::new();
    for action in actions {
        if let Action::UpdateStatus(s) = action {
            status = s.clone();
            continue;
        }
        let key = execute::action_key(action);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(action.clone()),
            None => groups.push((key, vec![action.clone()])),
        }
    }
    (status, groups.into_iter().map(|(_, g)| g).collect())
}

/// Waits until the PendingNode cache shows what this reconcile wrote, so the
/// next plan does not create the same machines again.
async fn await_own_writes(stores: &Stores, actions: &[Action]) {
    for action in actions {
        let key = |name: &str| ObjectRef::<PendingNode>::new(name);
        match action {
            Action::CreateMachine { name, .. } => {
                stores
                    .await_pending(name, |s| s.get(&key(name)).is_some())
                    .await;
            }
            Action::ForgetPending { name } => {
                stores
                    .await_pending(name, |s| s.get(&key(name)).is_none())
                    .await;
            }
            Action::MarkFailed { name, .. } => {
                stores
                    .await_pending(name, |s| {
                        s.get(&key(name)).is_none_or(|p| {
                            p.status
                                .as_ref()
                                .is_some_and(|st| st.state == PendingState::Failed)
                        })
                    })
                    .await;
            }
            _ => {}
        }
    }
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

/// Runs the NodeVersion controller until the stream ends. Its watches fill
/// the caches the reconciler observes from.
pub async fn run(
    client: Client,
    provider: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
    settings: Settings,
) {
    let (nodes, nodes_writer) = reflector::store();
    let (attestations, attestations_writer) = reflector::store();
    let (pending, pending_writer) = reflector::store();
    let node_events = reflector(
        nodes_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(LABEL_NODE_POOL),
        ),
    )
    .default_backoff()
    .touched_objects();
    let attestation_events = reflector(
        attestations_writer,
        watcher(
            Api::<NodeAttestation>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let pending_events = reflector(
        pending_writer,
        watcher(
            Api::<PendingNode>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let controller = Controller::new(
        Api::<NodeVersion>::all(client.clone()),
        watcher::Config::default(),
    );
    let stores = Stores {
        nodes,
        attestations,
        pending,
        versions: controller.store(),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "confidential-controllers".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let ctx = Arc::new(Context {
        client,
        provider,
        metrics,
        recorder,
        settings,
        stores,
    });
    controller
        .watches_stream(node_events, |node| {
            pool_ref(node.labels().get(LABEL_NODE_POOL))
        })
        .watches_stream(attestation_events, |a| pool_ref(a.spec.pool.as_ref()))
        .watches_stream(pending_events, |p| {
            Some(ObjectRef::<NodeVersion>::new(&p.spec.pool))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "reconcile");
            }
        })
        .await;
}
