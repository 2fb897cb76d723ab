//! Rollout benchmark on the real control plane of the test environment.
//!
//! For each pool size and surge it starts a fresh control plane, boots a pool
//! of machines of the test environment's simulated cloud at image v1 (kubelet
//! stand-ins after TLS bootstrap) running one pod per node, starts the real
//! `confidential-controllers` binary as a separate process with
//! `--provider record-only` (the simulated cloud follows the PendingNodes it
//! writes, as a Cluster API bridge would, with the injected join and pod
//! termination delays), changes the image to v2 and measures the wall time
//! until every node is replaced, against the theoretical minimum
//! `ceil(N / surge) * (join + drain)`. Each join also pays a real TLS
//! bootstrap (CSR approved by the operator, signed by the controller-manager).
//! It
//! samples the controller process's CPU time and resident memory during the
//! roll. Finally it measures the controller's memory with 1,000 Nodes and
//! NodeAttestations in the cluster.
//!
//! Run: `cargo bench -p confidential-controllers --bench rollout`
//! (environment: `ROLLOUT_BENCH_SIZES=20,100`, `ROLLOUT_BENCH_JOIN_MS=1000`,
//! `ROLLOUT_BENCH_DRAIN_MS=500`, `ROLLOUT_BENCH_SURGES=1,10%`, `ROLLOUT_BENCH_MEMORY_NODES=1000`,
//! `ROLLOUT_BENCH_OUT=target/rollout-bench.json`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use confidential_api::keys::image_label_value as image_label;
use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL};
use confidential_api::{
    EvidenceKind, NodeAttestation, NodeAttestationSpec, NodeVersion, NodeVersionSpec,
    RolloutStrategy, Verdict,
};
use confidential_controllers::provider::MachineRequest;
use confidential_testenv::cloud::{CloudConfig, SimulatedCloud};
use confidential_testenv::{TestCluster, client_from_kubeconfig, eventually, install_crds};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const V1: &str = "registry.example/node-image:v1";
const V2: &str = "registry.example/node-image:v2";
const K8S: &str = "v1.35.4";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The controller binary as a child process, with /proc sampling.
struct ControllerProcess {
    child: tokio::process::Child,
    pid: u32,
}

impl ControllerProcess {
    fn start(kubeconfig: &std::path::Path, args: &[String]) -> Result<Self> {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_confidential-controllers"))
            .args(args)
            .arg("--metrics-listen=127.0.0.1:0")
            .arg("--no-leader-election")
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting confidential-controllers")?;
        let pid = child.id().context("controller pid")?;
        Ok(Self { child, pid })
    }

    /// (resident KiB, peak resident KiB, CPU seconds).
    fn sample(&self) -> Option<(u64, u64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let after = stat.rsplit(')').next()?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15; after the ')' they are 12, 13.
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((field("VmRSS:")?, field("VmHWM:")?, ticks as f64 / 100.0))
    }

    async fn stop(mut self) {
        // Only the process this benchmark started, by its handle.
        if let Err(error) = self.child.kill().await {
            eprintln!(
                "stopping confidential-controllers (pid {}): {error}",
                self.pid
            );
        }
    }
}

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    match Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": name } }))?,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn ready_pods(client: &Client, ns: &str) -> Result<usize> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default())
        .await?
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .is_some_and(|s| s.phase.as_deref() == Some("Running"))
        })
        .count())
}

async fn rolled(client: &Client, pool: &str, n: usize, image: &str) -> Result<bool> {
    let nv = Api::<NodeVersion>::all(client.clone()).get(pool).await?;
    let Some(status) = nv.status else {
        return Ok(false);
    };
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={pool}")))
        .await?;
    let label = image_label(image);
    Ok(status.up_to_date_count as usize == n
        && status.outdated_count == 0
        && nodes.items.len() == n
        && nodes
            .iter()
            .all(|n| n.labels().get(LABEL_NODE_IMAGE) == Some(&label)))
}

async fn rollout(n: usize, surge: IntOrString, join_ms: u64, drain_ms: u64) -> Result<Value> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let client = client_from_kubeconfig(&cluster.kubeconfig).await?;
    create_namespace(&client, confidential_api::keys::NAMESPACE).await?;
    create_namespace(&client, "bench").await?;
    let pool = "bench".to_owned();
    let sim = SimulatedCloud::new(
        client.clone(),
        &cluster.kubeconfig,
        CloudConfig {
            join_delay: Duration::from_millis(join_ms),
            pod_termination: Duration::from_millis(drain_ms),
            ..CloudConfig::default()
        },
    )
    .await?;
    futures::stream::iter(0..n)
        .map(|i| {
            let sim = sim.clone();
            let pool = pool.clone();
            async move {
                sim.adopt(&MachineRequest {
                    name: format!("bench-v1-{i:03}"),
                    pool,
                    image: V1.into(),
                    kubernetes_version: K8S.into(),
                    control_plane: false,
                })
                .await
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    let follower = sim.follow_pending_nodes();
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), "bench");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "web" },
                "spec": { "replicas": n,
                    "selector": { "matchLabels": { "app": "web" } },
                    "template": { "metadata": { "labels": { "app": "web" } },
                        "spec": { "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10" }] } } }
            }))?,
        )
        .await?;
    eventually("workload running", Duration::from_secs(300), || async {
        Ok((ready_pods(&client, "bench").await? >= n).then_some(()))
    })
    .await?;
    let surge_nodes = match &surge {
        IntOrString::Int(k) => *k as usize,
        IntOrString::String(p) => {
            let pct: usize = p.trim_end_matches('%').parse()?;
            (n * pct).div_ceil(100)
        }
    }
    .max(1);
    Api::<NodeVersion>::all(client.clone())
        .create(
            &PostParams::default(),
            &NodeVersion::new(
                &pool,
                NodeVersionSpec {
                    image: V1.into(),
                    kubernetes_version: K8S.into(),
                    replicas: i32::try_from(n)?,
                    control_plane: false,
                    strategy: RolloutStrategy {
                        max_surge: Some(surge.clone()),
                        ..Default::default()
                    },
                },
            ),
        )
        .await?;
    let controller = ControllerProcess::start(
        &cluster.kubeconfig,
        &[
            "--provider=record-only".into(),
            "--busy-requeue-ms=500".into(),
        ],
    )?;
    eventually("pool settled at v1", Duration::from_secs(120), || async {
        Ok(rolled(&client, &pool, n, V1).await?.then_some(()))
    })
    .await?;
    let cpu_before = controller.sample().map_or(0.0, |s| s.2);
    let started = Instant::now();
    Api::<NodeVersion>::all(client.clone())
        .patch(
            &pool,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "image": V2 } })),
        )
        .await?;
    let mut peak_rss = 0u64;
    loop {
        if let Some((rss, _, _)) = controller.sample() {
            peak_rss = peak_rss.max(rss);
        }
        if rolled(&client, &pool, n, V2).await? {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            anyhow::bail!("rollout of {n} nodes did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let (_, hwm, cpu_after) = controller.sample().unwrap_or_default();
    controller.stop().await;
    follower.abort();
    drop(sim);
    let waves = n.div_ceil(surge_nodes);
    let minimum = waves as f64 * (join_ms + drain_ms) as f64 / 1000.0;
    let surge_text = match &surge {
        IntOrString::Int(k) => k.to_string(),
        IntOrString::String(s) => s.clone(),
    };
    let result = json!({
        "nodes": n, "maxSurge": surge_text, "surgeNodes": surge_nodes,
        "joinDelaySeconds": join_ms as f64 / 1000.0, "drainDelaySeconds": drain_ms as f64 / 1000.0,
        "wallSeconds": wall, "theoreticalMinimumSeconds": minimum, "ratioToMinimum": wall / minimum,
        "controllerCpuSeconds": cpu_after - cpu_before,
        "controllerPeakRssMiB": peak_rss.max(hwm) as f64 / 1024.0,
    });
    eprintln!("{result}");
    drop(cluster);
    Ok(result)
}

async fn memory_at_scale(count: usize) -> Result<Value> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let client = client_from_kubeconfig(&cluster.kubeconfig).await?;
    create_namespace(&client, confidential_api::keys::NAMESPACE).await?;
    let pool = "big";
    let now = jiff::Timestamp::now();
    let label = image_label(V1);
    futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let label = label.clone();
            async move {
                let name = format!("big-{i:04}");
                let node: Node = serde_json::from_value(json!({
                    "metadata": { "name": name, "labels": { LABEL_NODE_POOL: pool, LABEL_NODE_IMAGE: label } }
                }))?;
                Api::<Node>::all(client.clone())
                    .create(&PostParams::default(), &node)
                    .await?;
                let attestation = NodeAttestation::new(
                    &name,
                    NodeAttestationSpec {
                        node_name: name.clone(),
                        evidence_kind: EvidenceKind::Tpm,
                        image: V1.into(),
                        pool: Some(pool.into()),
                        measurements: (0..8).map(|p| (p.to_string(), "ab".repeat(32))).collect(),
                        ak_fingerprint: "cd".repeat(32),
                        disk_uuid: None,
                        attestation_endpoint: None,
                        attested_at: Time(now),
                        expires_at: Time(now + jiff::SignedDuration::from_hours(24)),
                        verdict: Verdict::Trusted,
                        warnings: vec![],
                    },
                );
                Api::<NodeAttestation>::all(client.clone())
                    .create(&PostParams::default(), &attestation)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    Api::<NodeVersion>::all(client.clone())
        .create(
            &PostParams::default(),
            &NodeVersion::new(
                pool,
                NodeVersionSpec {
                    image: V1.into(),
                    kubernetes_version: K8S.into(),
                    replicas: i32::try_from(count)?,
                    control_plane: false,
                    strategy: RolloutStrategy::default(),
                },
            ),
        )
        .await?;
    let controller =
        ControllerProcess::start(&cluster.kubeconfig, &["--provider=record-only".into()])?;
    // The nodes never report Ready (no kubelet): the pool's status lists
    // them; wait until it was written, then let the watches settle.
    eventually(
        "status of the big pool",
        Duration::from_secs(120),
        || async {
            let nv = Api::<NodeVersion>::all(client.clone()).get(pool).await?;
            Ok(nv
                .status
                .filter(|s| s.observed_generation.is_some())
                .map(|_| ()))
        },
    )
    .await?;
    let mut peak = 0u64;
    let mut last = (0, 0, 0.0);
    for _ in 0..20 {
        if let Some(s) = controller.sample() {
            peak = peak.max(s.0);
            last = s;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    controller.stop().await;
    let result = json!({
        "nodes": count, "nodeAttestations": count,
        "controllerRssMiB": last.0 as f64 / 1024.0,
        "controllerPeakRssMiB": peak.max(last.1) as f64 / 1024.0,
        "controllerCpuSeconds": last.2,
    });
    eprintln!("{result}");
    drop(cluster);
    Ok(result)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let sizes: Vec<usize> = std::env::var("ROLLOUT_BENCH_SIZES")
        .unwrap_or_else(|_| "20,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let join_ms = env_u64("ROLLOUT_BENCH_JOIN_MS", 1000);
    let drain_ms = env_u64("ROLLOUT_BENCH_DRAIN_MS", 500);
    let memory_nodes = env_u64("ROLLOUT_BENCH_MEMORY_NODES", 1000) as usize;
    let out = std::env::var("ROLLOUT_BENCH_OUT").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/rollout-bench.json"),
        PathBuf::from,
    );
    let surges: Vec<IntOrString> = std::env::var("ROLLOUT_BENCH_SURGES")
        .unwrap_or_else(|_| "1,10%".into())
        .split(',')
        .map(|s| match s.trim().parse::<i32>() {
            Ok(n) => IntOrString::Int(n),
            Err(_) => IntOrString::String(s.trim().to_owned()),
        })
        .collect();
    let mut rollouts = Vec::new();
    for &n in &sizes {
        for surge in surges.iter().cloned() {
            rollouts.push(rollout(n, surge, join_ms, drain_ms).await?);
        }
    }
    let memory = if memory_nodes > 0 {
        Some(memory_at_scale(memory_nodes).await?)
    } else {
        None
    };
    let report = json!({
        "benchmark": "rollout",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "rollouts": rollouts,
        "memoryAtScale": memory,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("written to {}", out.display());
    Ok(())
}
