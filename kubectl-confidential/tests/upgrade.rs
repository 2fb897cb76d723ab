//! `kubectl confidential upgrade` against a real control plane: refusals
//! change nothing; an accepted upgrade changes the pool; `--wait` follows the
//! status the real operator binary writes while it rolls the pool, and
//! reports a blocked rollout as a failure.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Result;
use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL, image_label_value};
use confidential_api::{AttestationPolicy, NodeVersion, NodeVersionSpec};
use confidential_controllers::provider::MachineRequest;
use confidential_testenv::cloud::{CloudConfig, SimulatedCloud};
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::{
    ManagedProcess, TestCluster, crds_dir, eventually, install_crds, unique_name,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

/// Bound of each wait on the operator (generous: shared, loaded machine).
const WAIT: Duration = Duration::from_secs(300);

fn plugin(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const V1: &str = "registry.example/node:v1";
const V2: &str = "registry.example/node:v2";
const V3: &str = "registry.example/node:v3";

/// A pool of `replicas` at [`V1`] and a policy listing [`V2`] and [`V3`],
/// signed by the test publisher (the shared fixture).
async fn setup(cluster: &TestCluster, replicas: i32) -> Result<(String, String)> {
    install_crds(&cluster.client, &crds_dir()).await?;
    let pool = unique_name("pool");
    let policy = unique_name("policy");
    Api::<NodeVersion>::all(cluster.client.clone())
        .create(
            &PostParams::default(),
            &NodeVersion::new(
                &pool,
                NodeVersionSpec {
                    image: V1.into(),
                    kubernetes_version: "v1.35.4".into(),
                    replicas,
                    control_plane: false,
                    strategy: Default::default(),
                },
            ),
        )
        .await?;
    let publisher = Publisher::random("acme");
    let images = [V2, V3]
        .iter()
        .map(|image| {
            publisher.entry(&fixtures::measurement_file(
                image,
                &[(4, [0x44; 32], false)],
            ))
        })
        .collect();
    Api::<AttestationPolicy>::all(cluster.client.clone())
        .create(
            &PostParams::default(),
            &AttestationPolicy::new(&policy, fixtures::policy_spec(None, &[&publisher], images)),
        )
        .await?;
    Ok((pool, policy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refuses_bad_requests_and_changes_nothing() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let (pool, policy) = setup(&cluster, 3).await?;
    let kc = &cluster.kubeconfig;
    let pools: Api<NodeVersion> = Api::all(cluster.client.clone());

    let out = plugin(kc, &["upgrade", "--pool", &pool, "--policy", &policy]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to upgrade"),
        "{}",
        stderr(&out)
    );

    let out = plugin(
        kc,
        &[
            "upgrade",
            "--pool",
            "no-such-pool",
            "--image",
            "registry.example/node:v2",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--pool"), "{}", stderr(&out));

    let out = plugin(
        kc,
        &[
            "upgrade",
            "--pool",
            &pool,
            "--policy",
            &policy,
            "--image",
            "registry.example/node:v4",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no measurements"), "{}", stderr(&out));

    let unchanged = pools.get(&pool).await?;
    assert_eq!(unchanged.spec.image, V1);
    assert_eq!(unchanged.metadata.generation, Some(1));
    Ok(())
}

/// The real operator binary (`confidential-controllers`, `record-only`
/// provider, as the operator's suites and benchmark run it), logging to
/// `dir`; stopped by its pid when dropped.
fn operator(kubeconfig: &Path, dir: &Path) -> Result<ManagedProcess> {
    let binary = confidential_testenv::workspace_binary(
        "confidential-controllers",
        "confidential-controllers",
        "CONFIDENTIAL_CONTROLLERS_BIN",
    )?;
    let mut command = Command::new(binary);
    command
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .args([
            "--provider=record-only",
            "--no-leader-election",
            "--metrics-listen=127.0.0.1:0",
            "--busy-requeue-ms=500",
        ]);
    ManagedProcess::spawn(
        "confidential-controllers",
        command,
        &dir.join("operator.log"),
    )
}

/// `upgrade --wait` in a background thread; its output.
async fn upgrade_and_wait(
    kubeconfig: &Path,
    pool: &str,
    policy: &str,
    image: &str,
) -> Result<Output> {
    let kc = kubeconfig.to_owned();
    let args = [
        "upgrade", "--pool", pool, "--policy", policy, "--image", image, "--wait",
    ]
    .map(str::to_owned);
    Ok(tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        plugin(&kc, &args)
    })
    .await?)
}

/// The Nodes of `pool`: (name, image label).
async fn pool_nodes(client: &kube::Client, pool: &str) -> Result<Vec<(String, String)>> {
    Ok(Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={pool}")))
        .await?
        .iter()
        .map(|n| {
            (
                n.name_any(),
                n.labels()
                    .get(LABEL_NODE_IMAGE)
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect())
}

/// `--wait` follows the status the real operator writes while it rolls a
/// pool of simulated machines (the test environment's cloud follows the
/// operator's PendingNodes, as a Cluster API bridge would): when `upgrade`
/// returns, the roll has finished, so every node of the pool is a new
/// machine at the new image and no old machine is left. A blocked rollout
/// (a node running a pod that may not be evicted) makes `--wait` fail with
/// the operator's own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_waits_for_the_rollout_and_reports_a_block() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let (pool, policy) = setup(&cluster, 2).await?;
    let client = confidential_testenv::client_from_kubeconfig(&cluster.kubeconfig).await?;
    let cloud =
        SimulatedCloud::new(client.clone(), &cluster.kubeconfig, CloudConfig::default()).await?;
    for i in 0..2 {
        cloud
            .adopt(&MachineRequest {
                name: format!("{pool}-v1-{i}"),
                pool: pool.clone(),
                image: V1.into(),
                kubernetes_version: "v1.35.4".into(),
                control_plane: false,
            })
            .await?;
    }
    let follower = cloud.follow_pending_nodes();
    let dir = tempfile::tempdir()?;
    let mut operator = operator(&cluster.kubeconfig, dir.path())?;
    let pools: Api<NodeVersion> = Api::all(client.clone());
    eventually("the operator to report the pool at v1", WAIT, || async {
        let nv = pools.get(&pool).await?;
        let status = nv.status.unwrap_or_default();
        Ok((status.observed_generation == nv.metadata.generation
            && status.up_to_date_count == 2
            && status.outdated_count == 0)
            .then_some(()))
    })
    .await?;
    let before = pool_nodes(&client, &pool).await?;
    assert_eq!(before.len(), 2, "{before:?}");

    let out = upgrade_and_wait(&cluster.kubeconfig, &pool, &policy, V2).await?;
    operator.check_running()?;
    assert!(
        out.status.success(),
        "{}\noperator log:\n{}",
        stderr(&out),
        operator.log_tail(30)
    );
    assert!(stderr(&out).contains("2/2 up to date"), "{}", stderr(&out));
    assert!(stderr(&out).contains("rollout of"), "{}", stderr(&out));
    // Read at once: had --wait returned before the roll finished, old nodes
    // would still be here or the heirs would not all be at v2.
    let after = pool_nodes(&client, &pool).await?;
    let v2 = image_label_value(V2);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after
            .iter()
            .all(|(name, image)| image == &v2 && !before.iter().any(|(old, _)| old == name)),
        "--wait returned with {after:?} (before: {before:?})"
    );
    assert_eq!(pools.get(&pool).await?.spec.image, V2);
    assert_eq!(cloud.machines_created(), 2, "one heir per node");

    // A pod without a controller on a node: the operator may not evict it
    // without opt-in, so the next roll blocks and --wait says why.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let bare = unique_name("bare");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": { "name": bare },
            "spec": { "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10" }] }
        }))?,
    )
    .await?;
    eventually("the bare pod to run", WAIT, || async {
        let pod = pods.get(&bare).await?;
        Ok(pod
            .status
            .and_then(|s| s.phase)
            .filter(|phase| phase == "Running")
            .map(|_| ()))
    })
    .await?;
    let out = upgrade_and_wait(&cluster.kubeconfig, &pool, &policy, V3).await?;
    operator.check_running()?;
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("rollout blocked") && stderr(&out).contains("PodsNotEvictable"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&bare), "{}", stderr(&out));
    follower.abort();
    operator.stop(Duration::from_secs(5));
    Ok(())
}
