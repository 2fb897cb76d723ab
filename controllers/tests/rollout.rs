//! End-to-end rollouts on the real control plane of the test environment
//! (etcd, kube-apiserver, kube-controller-manager with the disruption, node
//! lifecycle and garbage collector controllers, kube-scheduler), with the
//! simulated cloud booting machines and a kubelet stand-in running pods.
//! Evictions go through the real Eviction API and real PDBs.
//!
//! A watcher samples the cluster throughout every rollout and records any
//! violation of the DESIGN.md invariants: the Deployment's healthy pods never
//! below its PDB, never fewer schedulable Ready nodes than
//! `replicas - maxUnavailable`, and no node deleted before a heir Ready and
//! attested for the new image existed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::conditions::{is_true, types};
use confidential_api::keys::{LABEL_NODE_POOL, NAMESPACE};
use confidential_api::{NodeAttestation, NodeVersion, NodeVersionSpec, RolloutStrategy, Verdict};
use confidential_controllers::metrics::Metrics;
use confidential_controllers::operator::{self, Leadership};
use confidential_controllers::provider::{MachineRequest, Provider};
use confidential_controllers::reconciler::Settings;
use confidential_controllers::sim_provider::{SimConfig, SimProvider};
use confidential_testenv::{
    TestCluster, client_from_kubeconfig, eventually, install_crds, unique_name,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

const V1: &str = "registry.example/node-image:v1";
const V2: &str = "registry.example/node-image:v2";
const K8S: &str = "v1.35.4";
const WAIT: Duration = Duration::from_secs(180);

struct Env {
    cluster: TestCluster,
    /// Client without 429 retries (as the controller uses).
    client: Client,
    sim: SimProvider,
    _kubelets: JoinHandle<()>,
    pool: String,
    ns: String,
}

async fn setup(pool_size: u32, sim: SimConfig) -> Result<Env> {
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
    let sim = SimProvider::new(client.clone(), sim);
    let kubelets = sim.spawn_kubelets();
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
        _kubelets: kubelets,
        pool,
        ns,
    })
}

/// A Deployment of `replicas` pods guarded by a PDB with `min_available`,
/// waited for until all pods are Ready.
async fn workload(env: &Env, replicas: i32, min_available: i32) -> Result<()> {
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

async fn healthy_pods(client: &Client, ns: &str) -> Result<usize> {
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

async fn node_version(env: &Env, replicas: i32, strategy: RolloutStrategy) -> Result<()> {
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

async fn set_image(env: &Env, image: &str) -> Result<()> {
    let api: Api<NodeVersion> = Api::all(env.client.clone());
    api.patch(
        &env.pool,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "image": image } })),
    )
    .await?;
    Ok(())
}

fn settings() -> Settings {
    Settings {
        busy_requeue: Duration::from_millis(500),
        idle_requeue: Duration::from_secs(5),
        max_join_attempts: 3,
        join_retry_backoff: 1,
    }
}

fn controller(env: &Env, metrics: Arc<Metrics>, identity: &str) -> JoinHandle<()> {
    let client = env.client.clone();
    let provider: Arc<dyn Provider> = Arc::new(env.sim.clone());
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
struct InvariantWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<Vec<String>>>,
}

impl InvariantWatch {
    fn start(env: &Env, min_pods: usize, min_nodes: usize, image: &'static str) -> Self {
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
                let names: BTreeSet<String> = list.iter().map(|n| n.name_any()).collect();
                for gone in seen.difference(&names) {
                    // A node left: a heir for it must be Ready and attested.
                    let heir = list.iter().any(|n| {
                        n.annotations()
                            .get(confidential_api::keys::ANNOTATION_HEIR_OF)
                            == Some(gone)
                            && ready(n)
                            && attested(&n.name_any())
                    });
                    if !heir {
                        violations.push(format!("{gone} left without a Ready, attested heir"));
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

    async fn finish(self) -> Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

async fn nv_status(env: &Env) -> Result<NodeVersion> {
    Ok(Api::<NodeVersion>::all(env.client.clone())
        .get(&env.pool)
        .await?)
}

/// Waits until every node of the pool is attested for `image`, the status
/// says so and nothing is in flight.
async fn wait_rolled(env: &Env, replicas: usize, image: &str) -> Result<Vec<String>> {
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

async fn settle_v1(env: &Env, replicas: usize) -> Result<()> {
    wait_rolled(env, replicas, V1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_five_rolls_to_v2_with_surge_two_and_the_pdb_holds() -> Result<()> {
    let env = setup(5, SimConfig::default()).await?;
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
    let env = setup(2, SimConfig::default()).await?;
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
    let env = setup(1, SimConfig::default()).await?;
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
    let env = setup(5, SimConfig::default()).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_attestation_expires_is_cordoned_and_replaced() -> Result<()> {
    let env = setup(3, SimConfig::default()).await?;
    workload(&env, 3, 2).await?;
    node_version(&env, 3, RolloutStrategy::default()).await?;
    let ctl = controller(&env, Metrics::new(), "replica-a");
    settle_v1(&env, 3).await?;
    let watch = InvariantWatch::start(&env, 2, 2, V1);
    // The attestation of one node lapses (its re-attestation failed).
    let expired = format!("{}-v1-1", env.pool);
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
    Api::<NodeAttestation>::all(env.client.clone())
        .patch(
            &expired,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "expiresAt": past.to_string() } })),
        )
        .await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    // Replaced: the node is gone, three nodes attested for the (unchanged) image.
    let names = eventually("expired node replaced", WAIT, || async {
        let list = nodes
            .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={}", env.pool)))
            .await?;
        let names: Vec<String> = list.iter().map(|n| n.name_any()).collect();
        Ok((names.len() == 3 && !names.contains(&expired)).then_some(names))
    })
    .await?;
    let violations = watch.finish().await?;
    assert!(violations.is_empty(), "invariants violated: {violations:?}");
    assert_eq!(env.sim.machines_created(), 1, "exactly one replacement");
    assert_eq!(names.iter().filter(|n| n.contains("-v1-")).count(), 2);
    ctl.abort();
    Ok(())
}
