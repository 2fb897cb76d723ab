//! A simulated cloud for tests, benchmarks and the playground. Creating a
//! machine "boots" it after an injected join delay: the provider creates its
//! Node (Ready, labelled, with kubelet version and capacity) and its
//! NodeAttestation with the admin client, as the join endpoint and the
//! kubelet would. A kubelet stand-in keeps the Ready heartbeats of its nodes,
//! runs pods bound to them to Running/Ready, and finalizes deleted pods after
//! an injected drain delay, so drains complete on a real API server.
//!
//! Faults: `never_attest` (machines boot but never attest or register).
//!
//! The real simulated confidential node of the test environment (swtpm +
//! `confidential-bootstrapper` + kubelet stand-in) plugs in by implementing
//! [`Provider`] over it: `create_machine` starts a node process whose
//! bootstrapper joins through the gate (which writes the NodeAttestation),
//! `delete_machine` stops it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL, image_label_value};
use confidential_api::{EvidenceKind, NodeAttestation, NodeAttestationSpec, Verdict};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::provider::{Leave, LeaveRequest, Machine, MachineRequest, Provider, ProviderError};

/// Knobs of the simulated cloud.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// From create to a Ready, attested Node.
    pub join_delay: Duration,
    /// From a pod's deletion to the kubelet finalizing it.
    pub drain_delay: Duration,
    /// Lifetime of the NodeAttestations it writes.
    pub attestation_ttl: Duration,
    /// Interval of the Ready heartbeats.
    pub heartbeat: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            join_delay: Duration::from_secs(1),
            drain_delay: Duration::from_millis(200),
            attestation_ttl: Duration::from_secs(24 * 3600),
            heartbeat: Duration::from_secs(10),
        }
    }
}

struct SimMachine {
    machine: Machine,
    kubernetes_version: String,
    boot: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    machines: BTreeMap<String, SimMachine>,
    never_attest: bool,
    join_delay: Option<Duration>,
    finalizing: BTreeSet<String>,
    created: u64,
}

/// The simulated cloud. Cheap to clone (shared state).
#[derive(Clone)]
pub struct SimProvider {
    client: Client,
    config: SimConfig,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimProvider {
    pub fn new(client: Client, config: SimConfig) -> Self {
        Self {
            client,
            config,
            state: Arc::default(),
        }
    }

    /// From now on, machines boot but never attest (or stop doing so).
    pub fn set_never_attest(&self, never: bool) {
        lock(&self.state).never_attest = never;
    }

    /// Overrides the join delay of machines created from now on.
    pub fn set_join_delay(&self, delay: Duration) {
        lock(&self.state).join_delay = Some(delay);
    }

    /// Machines created so far (including deleted ones).
    pub fn machines_created(&self) -> u64 {
        lock(&self.state).created
    }

    /// Registers and boots a machine at once (the initial fleet).
    pub async fn adopt(&self, request: &MachineRequest) -> Result<(), ProviderError> {
        lock(&self.state).machines.insert(
            request.name.clone(),
            SimMachine {
                machine: machine_of(request),
                kubernetes_version: request.kubernetes_version.clone(),
                boot: None,
            },
        );
        boot(&self.client, &self.config, request).await
    }

    /// Runs the kubelet stand-in until the task is dropped: heartbeats, pods
    /// to Running, deleted pods finalized.
    pub fn spawn_kubelets(&self) -> JoinHandle<()> {
        let heartbeat = {
            let this = self.clone();
            tokio::spawn(async move { this.heartbeats().await })
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _guard = AbortOnDrop(heartbeat);
            this.pods().await;
        })
    }

    async fn heartbeats(&self) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        loop {
            tokio::time::sleep(self.config.heartbeat).await;
            let names: Vec<String> = lock(&self.state).machines.keys().cloned().collect();
            let now = jiff::Timestamp::now().to_string();
            for name in names {
                let patch = json!({ "status": { "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "simulated kubelet", "lastHeartbeatTime": now }] } });
                if let Err(err) = nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    tracing::debug!(%name, %err, "heartbeat");
                }
            }
        }
    }

    async fn pods(&self) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut events = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(pod) = event else { continue };
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            if !lock(&self.state).machines.contains_key(&node) {
                continue;
            }
            let ns = pod.namespace().unwrap_or_default();
            let name = pod.name_any();
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            if pod.metadata.deletion_timestamp.is_some() {
                let key = format!("{ns}/{name}");
                if !lock(&self.state).finalizing.insert(key.clone()) {
                    continue;
                }
                let delay = self.config.drain_delay;
                let state = self.state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        ..DeleteParams::default()
                    };
                    if let Err(err) = pods.delete(&name, &params).await {
                        tracing::debug!(%name, %err, "finalizing pod");
                    }
                    lock(&state).finalizing.remove(&key);
                });
                continue;
            }
            let running = pod
                .status
                .as_ref()
                .is_some_and(|s| s.phase.as_deref() == Some("Running"));
            if !running {
                let now = jiff::Timestamp::now().to_string();
                let patch = json!({ "status": { "phase": "Running", "podIP": "10.0.0.1",
                    "startTime": now, "conditions": [
                    { "type": "Ready", "status": "True", "lastTransitionTime": now },
                    { "type": "ContainersReady", "status": "True", "lastTransitionTime": now },
                    { "type": "PodScheduled", "status": "True", "lastTransitionTime": now }] } });
                if let Err(err) = pods
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    tracing::debug!(%name, %err, "running pod");
                }
            }
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn machine_of(request: &MachineRequest) -> Machine {
    Machine {
        name: request.name.clone(),
        pool: request.pool.clone(),
        image: request.image.clone(),
        provider_id: format!("sim://{}", request.name),
    }
}

/// Registers the Node and writes its NodeAttestation, as the gate and the
/// kubelet of a machine that booted `request.image` would.
async fn boot(
    client: &Client,
    config: &SimConfig,
    request: &MachineRequest,
) -> Result<(), ProviderError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": request.name, "labels": {
            LABEL_NODE_POOL: request.pool,
            LABEL_NODE_IMAGE: image_label_value(&request.image),
            "kubernetes.io/hostname": request.name,
            "kubernetes.io/os": "linux",
        }},
        "spec": { "providerID": format!("sim://{}", request.name) }
    }))
    .map_err(|e| ProviderError::Failed(e.to_string()))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    let now = jiff::Timestamp::now();
    let resources = json!({ "cpu": "8", "memory": "32Gi", "pods": "110" });
    let status = json!({ "status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "simulated kubelet", "lastHeartbeatTime": now.to_string(),
            "lastTransitionTime": now.to_string() }],
        "nodeInfo": { "machineID": request.name, "systemUUID": request.name, "bootID": "sim",
            "kernelVersion": "6.12", "osImage": request.image, "containerRuntimeVersion": "sim://1",
            "kubeletVersion": request.kubernetes_version, "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64" }
    }});
    nodes
        .patch_status(
            &request.name,
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
    let expires = now
        + jiff::SignedDuration::try_from(config.attestation_ttl)
            .map_err(|e| ProviderError::Failed(e.to_string()))?;
    let attestation = NodeAttestation::new(
        &request.name,
        NodeAttestationSpec {
            node_name: request.name.clone(),
            evidence_kind: EvidenceKind::Tpm,
            image: request.image.clone(),
            pool: Some(request.pool.clone()),
            measurements: BTreeMap::new(),
            ak_fingerprint: "00".repeat(32),
            disk_uuid: None,
            attestation_endpoint: None,
            attested_at: Time(now),
            expires_at: Time(expires),
            verdict: Verdict::Trusted,
            warnings: vec![],
        },
    );
    let attestations: Api<NodeAttestation> = Api::all(client.clone());
    attestations
        .patch(
            &request.name,
            &PatchParams::apply("confidential-sim-gate").force(),
            &Patch::Apply(&attestation),
        )
        .await?;
    Ok(())
}

impl Provider for SimProvider {
    fn create_machine<'a>(
        &'a self,
        request: &'a MachineRequest,
    ) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            let mut state = lock(&self.state);
            if let Some(existing) = state.machines.get(&request.name) {
                return Ok(existing.machine.clone());
            }
            state.created += 1;
            let never = state.never_attest;
            let delay = state.join_delay.unwrap_or(self.config.join_delay);
            let boot_task = (!never).then(|| {
                let client = self.client.clone();
                let config = self.config.clone();
                let request = request.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // Retry transient API errors: a real machine keeps trying.
                    for _ in 0..20 {
                        match boot(&client, &config, &request).await {
                            Ok(()) => return,
                            Err(err) => tracing::warn!(name = %request.name, %err, "sim boot"),
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
            });
            let machine = machine_of(request);
            state.machines.insert(
                request.name.clone(),
                SimMachine {
                    machine: machine.clone(),
                    kubernetes_version: request.kubernetes_version.clone(),
                    boot: boot_task,
                },
            );
            Ok(machine)
        })
    }

    fn delete_machine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            if let Some(machine) = lock(&self.state).machines.remove(name)
                && let Some(task) = machine.boot
            {
                task.abort();
            }
            Ok(())
        })
    }

    fn list_machines<'a>(
        &'a self,
        pool: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Machine>, ProviderError>> {
        Box::pin(async move {
            Ok(lock(&self.state)
                .machines
                .values()
                .filter(|m| m.machine.pool == pool)
                .map(|m| {
                    let _ = &m.kubernetes_version;
                    m.machine.clone()
                })
                .collect())
        })
    }

    fn control_plane_membership(&self) -> Result<(), String> {
        Err(SIM_RUNS_NO_ETCD.to_owned())
    }

    fn leave_control_plane<'a>(
        &'a self,
        _request: &'a LeaveRequest,
    ) -> BoxFuture<'a, Result<Leave, ProviderError>> {
        Box::pin(async { Err(ProviderError::Failed(SIM_RUNS_NO_ETCD.to_owned())) })
    }
}

/// The simulated cloud's machines run no etcd, so it refuses control-plane
/// pools (a test that rolls one wraps it with a real etcd per machine).
const SIM_RUNS_NO_ETCD: &str =
    "the simulated cloud runs no etcd: its machines cannot be control-plane members";
