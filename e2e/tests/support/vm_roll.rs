//! A pool of VM nodes rolled by the operator through the QEMU provider,
//! shared by the suite (`tests/vm_roll.rs`) and the benchmark
//! (`benches/vm_roll.rs`): the playground in VM mode, and a watcher that
//! samples the cluster and the provider's machines during the roll and
//! records every violation of "no node and no machine goes before its heir
//! is Ready and attested" and of the PodDisruptionBudget, with the times at
//! which heirs were attested and donors went.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_api::keys::{ANNOTATION_HEIR_OF, LABEL_NODE_POOL};
use confidential_api::{NodeAttestation, Verdict};
use confidential_playground::host::HostProvider;
use confidential_playground::vm_provider::{MachineFiles, MachineState, QemuProvider};
use confidential_playground::{DEFAULT, Machines, Options, Playground};
use confidential_testenv::vm::Accel;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tokio::task::JoinHandle;

/// How long VM machines may take to boot and join (TCG is slow).
pub fn join_timeout(accel: Accel) -> Duration {
    match accel {
        Accel::Kvm => Duration::from_secs(600),
        Accel::Tcg => Duration::from_secs(2400),
    }
}

/// The playground with `nodes` VM machines at v1, `init` run.
pub async fn vm_playground(nodes: i32, accel: Accel) -> Result<Playground> {
    Playground::start(Options {
        nodes,
        max_surge: 1,
        machines: Machines::Vm { accel },
        ..Options::default()
    })
    .await
}

/// The playground's QEMU provider (once `init` made the host start the operator).
pub async fn qemu_provider(playground: &Playground) -> Result<Arc<QemuProvider>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match playground.host.provider() {
            Some(HostProvider::Vm(provider)) => return Ok(provider),
            Some(HostProvider::Process(_)) => bail!("the playground runs process machines"),
            None if Instant::now() > deadline => bail!("the operator did not start"),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until `count` machines run the node OS of `version`; returns them
/// with their processes and files.
pub async fn wait_machines_running(
    provider: &QemuProvider,
    version: &str,
    count: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, MachineFiles>> {
    let deadline = Instant::now() + timeout;
    loop {
        let states = provider.states();
        let running: Vec<&String> = states
            .iter()
            .filter(|(_, s)| matches!(s, MachineState::Running { version: v } if v == version))
            .map(|(n, _)| n)
            .collect();
        if let Some((name, state)) = states.iter().find(|(_, s)| {
            matches!(
                s,
                MachineState::Exited { .. } | MachineState::StartFailed(_)
            )
        }) {
            bail!("machine {name}: {state:?}");
        }
        if running.len() >= count {
            return running
                .into_iter()
                .map(|name| {
                    provider
                        .files(name)
                        .map(|f| (name.clone(), f))
                        .context("a running machine has files")
                })
                .collect();
        }
        if Instant::now() > deadline {
            bail!("{count} machines did not run {version} within {timeout:?}: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Pods of `namespace` that are Running and Ready.
async fn healthy_pods(client: &kube::Client, namespace: &str) -> Result<usize> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .list(&ListParams::default())
        .await?
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().is_some_and(|s| {
                    s.phase.as_deref() == Some("Running")
                        && s.conditions.as_ref().is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
        })
        .count())
}

/// What the watcher saw.
#[derive(Debug, Default)]
pub struct RollRecord {
    /// Every broken invariant, with when and what.
    pub violations: Vec<String>,
    /// Seconds since the watch started at which each node was first seen
    /// Ready and attested for the target image.
    pub heir_ready: BTreeMap<String, f64>,
    /// Seconds since the watch started at which each node disappeared.
    pub node_gone: BTreeMap<String, f64>,
    /// Seconds since the watch started at which each machine disappeared
    /// from the provider.
    pub machine_gone: BTreeMap<String, f64>,
    /// Seconds since the watch started at which each machine was first seen
    /// in the provider (machines there when the watch started: 0).
    pub machine_new: BTreeMap<String, f64>,
    pub samples: u32,
}

/// Samples nodes, attestations, the provider's machines and (optionally)
/// the PDB-covered pods until finished.
pub struct RollWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<RollRecord>>,
}

/// What the watcher holds to.
pub struct WatchSpec {
    /// The image heirs must be attested for.
    pub image: String,
    /// Namespace of the PDB-covered pods and their `minAvailable`.
    pub pods: Option<(String, usize)>,
}

impl RollRecord {
    /// Seconds from each machine's creation to its node being Ready and
    /// attested (machines that got there during the watch).
    pub fn boot_to_ready(&self) -> BTreeMap<String, f64> {
        self.machine_new
            .iter()
            .filter_map(|(name, new)| Some((name.clone(), self.heir_ready.get(name)? - new)))
            .collect()
    }
}

impl RollWatch {
    pub fn start(client: kube::Client, provider: Arc<QemuProvider>, spec: WatchSpec) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut record = RollRecord::default();
            let nodes: Api<Node> = Api::all(client.clone());
            let attestations: Api<NodeAttestation> = Api::all(client.clone());
            let mut seen_nodes: BTreeSet<String> = BTreeSet::new();
            let mut seen_machines: BTreeSet<String> = BTreeSet::new();
            let pool = format!("{LABEL_NODE_POOL}={DEFAULT}");
            loop {
                // Read before the sample: after `finish` one more sample
                // is taken, so the last changes are seen too.
                let last = flag.load(Ordering::Relaxed);
                record.samples += 1;
                let at = started.elapsed().as_secs_f64();
                // Machines first: a machine gone in this sample must find its
                // heir in the node list read after it.
                let machines: BTreeSet<String> = provider.states().into_keys().collect();
                let list = nodes.list(&ListParams::default().labels(&pool)).await?;
                let atts = attestations.list(&ListParams::default()).await?;
                let attested = |n: &str| {
                    atts.iter().any(|a| {
                        a.spec.node_name == n
                            && a.spec.image == spec.image
                            && a.spec.verdict == Verdict::Trusted
                    })
                };
                for node in &list {
                    let name = node.name_any();
                    if ready(node) && attested(&name) && !record.heir_ready.contains_key(&name) {
                        record.heir_ready.insert(name, at);
                    }
                }
                let heir_of = |gone: &str| {
                    list.iter().any(|n| {
                        n.annotations().get(ANNOTATION_HEIR_OF).map(String::as_str) == Some(gone)
                            && ready(n)
                            && attested(&n.name_any())
                    })
                };
                let names: BTreeSet<String> = list.iter().map(ResourceExt::name_any).collect();
                for gone in seen_nodes.difference(&names) {
                    record.node_gone.insert(gone.clone(), at);
                    if !heir_of(gone) {
                        record.violations.push(format!(
                            "{at:.1}s: node {gone} left without a Ready, attested heir"
                        ));
                    }
                }
                for new in machines.difference(&seen_machines) {
                    record.machine_new.entry(new.clone()).or_insert(at);
                }
                for gone in seen_machines.difference(&machines) {
                    record.machine_gone.insert(gone.clone(), at);
                    if !heir_of(gone) {
                        record.violations.push(format!(
                            "{at:.1}s: machine {gone} was deleted without a Ready, attested heir"
                        ));
                    }
                }
                if let Some((namespace, min)) = &spec.pods {
                    let healthy = healthy_pods(&client, namespace).await?;
                    if healthy < *min {
                        record.violations.push(format!(
                            "{at:.1}s: {healthy} healthy pods (PDB minAvailable {min})"
                        ));
                    }
                }
                seen_nodes = names;
                seen_machines = machines;
                if last {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if record.samples < 3 {
                record
                    .violations
                    .push(format!("only {} samples taken", record.samples));
            }
            Ok(record)
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Result<RollRecord> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Nodes of the pool, each attested (Trusted, TPM evidence) for `image`.
pub async fn attested_pool_nodes(client: &kube::Client, image: &str) -> Result<BTreeSet<String>> {
    let nodes: BTreeSet<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={DEFAULT}")))
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let attestations = Api::<NodeAttestation>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    for node in &nodes {
        let att = attestations
            .iter()
            .find(|a| &a.spec.node_name == node)
            .with_context(|| format!("node {node} has no NodeAttestation"))?;
        if att.spec.image != image || att.spec.verdict != Verdict::Trusted {
            bail!(
                "node {node} is attested for {} ({:?}), not {image}",
                att.spec.image,
                att.spec.verdict
            );
        }
    }
    Ok(nodes)
}

/// Namespace of the demo workload.
pub const DEMO_NAMESPACE: &str = "demo";

/// The demo image as the node images bake it (its digest computed by the
/// node-image code from this machine's busybox).
pub fn demo_image() -> Result<xtask::node_image::runtime::BakedImage> {
    confidential_playground::node_images::demo_image()
}

/// A Deployment of 2 replicas of the demo image baked into the node image,
/// referenced by digest (real containers; the default pull policy of a
/// digest reference, `IfNotPresent`, finds it on the node: no registry), a
/// PodDisruptionBudget `minAvailable: 1`, and an `Enforce` ImagePolicy
/// covering the namespace that allows exactly that digest.
pub async fn deploy_demo(client: &kube::Client) -> Result<()> {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    let demo = demo_image()?;
    let objects = [
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE}}),
        serde_json::json!({
            "apiVersion": "confidential.dev/v1alpha1", "kind": "ImagePolicy",
            "metadata": {"name": DEMO_NAMESPACE},
            "spec": {"mode": "Enforce", "namespaces": [DEMO_NAMESPACE], "allowedDigests": [demo.digest]}
        }),
        serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "demo", "namespace": DEMO_NAMESPACE},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "demo"}},
                "template": {
                    "metadata": {"labels": {"app": "demo"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{"name": "demo", "image": demo.digest_reference}]
                    }
                }
            }
        }),
        serde_json::json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "demo", "namespace": DEMO_NAMESPACE},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "demo"}}}
        }),
    ];
    for object in objects {
        let object: DynamicObject = serde_json::from_value(object)?;
        let types = object
            .types
            .clone()
            .context("object without apiVersion/kind")?;
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), types.api_version.clone()),
        };
        let plural = match types.kind.as_str() {
            "PodDisruptionBudget" => "poddisruptionbudgets".to_owned(),
            "ImagePolicy" => "imagepolicies".to_owned(),
            kind => format!("{}s", kind.to_lowercase()),
        };
        let resource = ApiResource {
            group,
            version,
            api_version: types.api_version.clone(),
            kind: types.kind.clone(),
            plural,
        };
        let api: Api<DynamicObject> = match object.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &object.name_any(),
            &PatchParams::apply("vm-roll-test").force(),
            &Patch::Apply(&object),
        )
        .await
        .with_context(|| format!("applying {} {}", types.kind, object.name_any()))?;
    }
    Ok(())
}

/// Tries to create a Pod of the demo image by its tag only in the demo
/// namespace; returns the API server's refusal (the gate's admission under
/// the `Enforce` ImagePolicy). Fails if the Pod was admitted.
pub async fn create_tag_only_demo_pod(client: &kube::Client) -> Result<kube::core::Status> {
    use kube::api::PostParams;
    let demo = demo_image()?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "demo-by-tag"},
        "spec": {"containers": [{"name": "demo", "image": demo.reference}]}
    }))?;
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => bail!("a Pod naming {} by tag was admitted", demo.reference),
        Err(kube::Error::Api(refusal)) => {
            if pods.get_opt("demo-by-tag").await?.is_some() {
                bail!("refused ({refusal:?}) yet the Pod exists");
            }
            Ok(*refusal)
        }
        Err(other) => Err(other).context("creating the tag-only Pod"),
    }
}

/// Checks that each Running demo pod's container started from the demo
/// image's manifest (its image ID names the digest) and that the kubelet
/// found that digest reference already present on the node.
pub async fn demo_containers_run_the_pinned_image(client: &kube::Client) -> Result<usize> {
    use k8s_openapi::api::core::v1::Event;
    let demo = demo_image()?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    let events: Api<Event> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    let mut checked = 0;
    for pod in pods.list(&ListParams::default()).await?.items {
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some()
            || pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
        {
            continue;
        }
        let status = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .with_context(|| format!("pod {name} has no container status"))?;
        if status.started != Some(true) || !status.image_id.ends_with(&demo.digest) {
            bail!(
                "pod {name}: container not started from {}: {status:?}",
                demo.digest
            );
        }
        let present = format!("\"{}\" already present on machine", demo.digest_reference);
        let pulled = events
            .list(
                &ListParams::default().fields(&format!("involvedObject.name={name},reason=Pulled")),
            )
            .await?;
        if !pulled
            .items
            .iter()
            .any(|e| e.message.as_deref().is_some_and(|m| m.contains(&present)))
        {
            bail!(
                "pod {name}: no event says {present}: {:?}",
                pulled.items.iter().map(|e| &e.message).collect::<Vec<_>>()
            );
        }
        checked += 1;
    }
    Ok(checked)
}

/// Waits until `count` demo pods are Running and Ready; returns their nodes.
pub async fn wait_demo_pods(
    client: &kube::Client,
    count: usize,
    timeout: Duration,
) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let pods: Api<Pod> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    loop {
        if healthy_pods(client, DEMO_NAMESPACE).await? >= count {
            let list = pods.list(&ListParams::default()).await?;
            return Ok(list
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                .collect());
        }
        if Instant::now() > deadline {
            let phases: Vec<String> = pods
                .list(&ListParams::default())
                .await?
                .iter()
                .map(|p| {
                    format!(
                        "{}: {:?}",
                        p.name_any(),
                        p.status.as_ref().and_then(|s| s.container_statuses.clone())
                    )
                })
                .collect();
            bail!("{count} demo pods did not run within {timeout:?}: {phases:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether every process and file of a deleted machine is gone.
pub fn leftovers(files: &MachineFiles) -> Vec<String> {
    let mut left = Vec::new();
    for pid in &files.pids {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            left.push(format!("process {pid}"));
        }
    }
    for dir in std::iter::once(&files.dir).chain(files.vm_dir.as_ref()) {
        if dir.exists() {
            left.push(dir.display().to_string());
        }
    }
    left
}
