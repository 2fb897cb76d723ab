//! The environment of the rollout suites: a real control plane with the
//! CRDs, the simulated cloud with a pool at v1, a workload under a PDB, the
//! operator in-process (with leader election), and an invariant watcher.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use confidential_api::conditions::{is_true, types};
use confidential_api::keys::{LABEL_NODE_POOL, NAMESPACE};
use confidential_api::{NodeAttestation, NodeVersion, NodeVersionSpec, RolloutStrategy, Verdict};
use confidential_controllers::metrics::Metrics;
use confidential_controllers::operator::{self, Leadership};
use confidential_controllers::provider::{MachineRequest, Provider};
use confidential_controllers::reconciler::Settings;
use confidential_testenv::cloud::{CloudConfig, SimulatedCloud};
use confidential_testenv::{
    TestCluster, client_from_kubeconfig, eventually, install_crds, unique_name,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

pub const V1: &str = "registry.example/node-image:v1";
pub const V2: &str = "registry.example/node-image:v2";
pub const K8S: &str = "v1.35.4";
pub const WAIT: Duration = Duration::from_secs(180);

pub struct Env {
    pub cluster: TestCluster,
    /// Client without 429 retries (as the controller uses).
    pub client: Client,
    pub sim: SimulatedCloud,
    pub pool: String,
    pub ns: String,
}

pub async fn setup(pool_size: u32, config: CloudConfig) -> Result<Env> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let client = client_from_kubeconfig(&cluster.kubeconfig).await?;
    let ns = unique_name("app");
    for name in [NAMESPACE, ns.as_str()] {
        let created = Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": name } }))?,
            )
            .await;
        match created {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
    }
    let sim = SimulatedCloud::new(client.clone(), &cluster.kubeconfig, config).await?;
    let pool = unique_name("pool");
    for i in 0..pool_size {
        sim.adopt(&MachineRequest {
            name: format!("{pool}-v1-{i}"),
            pool: pool.clone(),
            image: V1.into(),
            kubernetes_version: K8S.into(),
            control_plane: false,
        })
        .await?;
    }
    Ok(Env {
        cluster,
        client,
        sim,
        pool,
        ns,
    })
}

/// A Deployment of `replicas` pods guarded by a PDB with `min_available`,
/// waited for until all pods are Ready.
pub async fn workload(env: &Env, replicas: i32, min_available: i32) -> Result<()> {
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.client.clone(), &env.ns);
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "web" },
                "spec": { "replicas": replicas,
                    "selector": { "matchLabels": { "app": "web" } },
                    "template": { "metadata": { "labels": { "app": "web" } },
                        "spec": { "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10" }] } } }
            }))?,
        )
        .await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &env.ns);
    pdbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": { "name": "web" },
            "spec": { "minAvailable": min_available, "selector": { "matchLabels": { "app": "web" } } }
        }))?,
    )
    .await?;
    let want = replicas;
    eventually("workload Ready and PDB observed", WAIT, || async {
        let healthy = healthy_pods(&env.client, &env.ns).await?;
        let pdb = pdbs.get("web").await?;
        let observed = pdb.status.as_ref().map_or(0, |s| s.current_healthy);
        Ok((healthy as i32 == want && observed == want).then_some(()))
    })
    .await
}

pub async fn healthy_pods(client: &Client, ns: &str) -> Result<usize> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

pub async fn node_version(env: &Env, replicas: i32, strategy: RolloutStrategy) -> Result<()> {
    let api: Api<NodeVersion> = Api::all(env.client.clone());
    api.create(
        &PostParams::default(),
        &NodeVersion::new(
            &env.pool,
            NodeVersionSpec {
                image: V1.into(),
                kubernetes_version: K8S.into(),
                replicas,
                control_plane: false,
                strategy,
            },
        ),
    )
    .await?;
    Ok(())
}

pub async fn set_image(env: &Env, image: &str) -> Result<()> {
    let api: Api<NodeVersion> = Api::all(env.client.clone());
    api.patch(
        &env.pool,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "image": image } })),
    )
    .await?;
    Ok(())
}

pub fn settings() -> Settings {
    Settings {
        busy_requeue: Duration::from_millis(500),
        idle_requeue: Duration::from_secs(5),
        max_join_attempts: 3,
        join_retry_backoff: 1,
    }
}

/// The operator in-process with the simulated cloud as its provider.
pub fn controller(env: &Env, metrics: Arc<Metrics>, identity: &str) -> JoinHandle<()> {
    controller_with(env, Arc::new(env.sim.clone()), metrics, identity)
}

/// The operator in-process with `provider`.
pub fn controller_with(
    env: &Env,
    provider: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
    identity: &str,
) -> JoinHandle<()> {
    let client = env.client.clone();
    let leadership = Leadership {
        namespace: NAMESPACE.into(),
        lease: "confidential-controllers".into(),
        identity: identity.into(),
        duration: Duration::from_secs(3),
    };
    tokio::spawn(operator::run(
        client,
        provider,
        metrics,
        settings(),
        Some(leadership),
    ))
}

/// Samples the cluster until stopped; returns the violations seen.
pub struct InvariantWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<Vec<String>>>,
}

impl InvariantWatch {
    pub fn start(env: &Env, min_pods: usize, min_nodes: usize, image: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = env.client.clone();
        let ns = env.ns.clone();
        let pool = env.pool.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut violations = Vec::new();
            let nodes: Api<Node> = Api::all(client.clone());
            let attestations: Api<NodeAttestation> = Api::all(client.clone());
            let mut seen: BTreeSet<String> = BTreeSet::new();
            let mut initial: BTreeSet<String> = BTreeSet::new();
            let mut ready_new: BTreeSet<String> = BTreeSet::new();
            let mut credited: BTreeSet<String> = BTreeSet::new();
            let mut samples = 0u32;
            while !flag.load(Ordering::Relaxed) {
                samples += 1;
                let healthy = healthy_pods(&client, &ns).await?;
                if healthy < min_pods {
                    violations.push(format!("only {healthy} healthy pods (PDB {min_pods})"));
                }
                let list = nodes
                    .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={pool}")))
                    .await?;
                let atts = attestations.list(&ListParams::default()).await?;
                let attested = |n: &str| {
                    atts.iter().any(|a| {
                        a.spec.node_name == n
                            && a.spec.image == image
                            && a.spec.verdict == Verdict::Trusted
                    })
                };
                let ready = |n: &Node| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                };
                let schedulable = list
                    .iter()
                    .filter(|n| {
                        ready(n)
                            && !n
                                .spec
                                .as_ref()
                                .and_then(|s| s.unschedulable)
                                .unwrap_or(false)
                    })
                    .count();
                if schedulable < min_nodes {
                    violations.push(format!(
                        "only {schedulable} schedulable Ready nodes (minimum {min_nodes})"
                    ));
                }
                // A node that left must have been replaced: by a node that
                // was not there when the watch started, seen Ready and
                // attested in this sample or an earlier one, and not
                // credited to another node that left. (Not by the heir-of
                // annotation: the operator's next server-side apply of the
                // heir drops it as soon as the donor is gone, often before a
                // sample on a loaded machine sees both.)
                let names: BTreeSet<String> = list.iter().map(|n| n.name_any()).collect();
                if samples == 1 {
                    initial = names.clone();
                }
                for n in &list {
                    let name = n.name_any();
                    if !initial.contains(&name) && ready(n) && attested(&name) {
                        ready_new.insert(name);
                    }
                }
                for gone in seen.difference(&names) {
                    let heir = ready_new.difference(&credited).next().cloned();
                    match heir {
                        Some(heir) => {
                            credited.insert(heir);
                        }
                        None => {
                            violations.push(format!("{gone} left without a Ready, attested heir"))
                        }
                    }
                }
                seen = names;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            if samples < 3 {
                violations.push(format!("only {samples} samples taken"));
            }
            Ok(violations)
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

pub async fn nv_status(env: &Env) -> Result<NodeVersion> {
    Ok(Api::<NodeVersion>::all(env.client.clone())
        .get(&env.pool)
        .await?)
}

/// Waits until every node of the pool is attested for `image`, the status
/// says so and nothing is in flight.
pub async fn wait_rolled(env: &Env, replicas: usize, image: &str) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let attestations: Api<NodeAttestation> = Api::all(env.client.clone());
    eventually(&format!("pool rolled to {image}"), WAIT, || async {
        let nv = nv_status(env).await?;
        let Some(status) = nv.status else {
            return Ok(None);
        };
        let list = nodes
            .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={}", env.pool)))
            .await?;
        let atts = attestations.list(&ListParams::default()).await?;
        let names: Vec<String> = list.iter().map(|n| n.name_any()).collect();
        let all_attested = names.iter().all(|n| {
            atts.iter()
                .any(|a| &a.spec.node_name == n && a.spec.image == image)
        });
        let done = status.up_to_date_count as usize == replicas
            && status.outdated_count == 0
            && status.pending.is_empty()
            && names.len() == replicas
            && all_attested
            && !is_true(&status.conditions, types::ROLLOUT_PROGRESSING);
        Ok(done.then_some(names))
    })
    .await
}

pub async fn settle_v1(env: &Env, replicas: usize) -> Result<()> {
    wait_rolled(env, replicas, V1).await?;
    Ok(())
}
