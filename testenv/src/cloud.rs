//! The simulated cloud of the operator's suites and benchmarks: a
//! [`Provider`] whose machines are kubelet stand-ins ([`crate::kubelet`]) on a
//! real control plane. Booting a machine plays the gate's part with the admin
//! client (it writes the machine's NodeAttestation and mints a join token
//! bound to the node name, as `POST /v1/join` would after checking real
//! evidence), then the machine's kubelet does TLS bootstrap with that token:
//! its client CSR is approved by the operator's approver (or, for the fleet
//! that existed before the operator, by [`SimulatedCloud::adopt`]), signed by
//! kube-controller-manager, and from then on the machine acts only with its
//! own `system:node:<name>` credentials: it registers its Node, heartbeats
//! and runs its pods, so drains evict pods that exist.
//!
//! The suites that check attestation itself use the real gate and the real
//! bootstrapper on swtpm (`crate::node`, the playground); this cloud is for
//! what the operator does with machines. It lives here, never in a shipped
//! binary.
//!
//! Two ways to drive it: in-process, as the operator's `Provider`; or, for a
//! separately running operator binary with `--provider record-only`,
//! [`SimulatedCloud::follow_pending_nodes`] creates and deletes machines from
//! the PendingNodes and Nodes the operator writes, as a Cluster API bridge
//! would. Faults: machines that never attest, a slower join.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::keys::{
    ANNOTATION_TOKEN_NODE_NAME, BOOTSTRAP_TOKEN_GROUP, LABEL_NODE_IMAGE, LABEL_NODE_POOL,
    image_label_value,
};
use confidential_api::{
    EvidenceKind, NodeAttestation, NodeAttestationSpec, NodeVersion, PendingGoal, PendingNode,
    PendingState, Verdict,
};
use confidential_controllers::provider::{
    Leave, LeaveRequest, Machine, MachineRequest, Provider, ProviderError,
};
use futures::future::BoxFuture;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use crate::kubelet::{Kubelet, KubeletOptions};

/// Knobs of the simulated cloud.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// From create to the machine's join (attestation, token, kubelet).
    pub join_delay: Duration,
    /// From a pod's deletion to its kubelet finalizing it.
    pub pod_termination: Duration,
    /// Lifetime of the NodeAttestations the simulated gate writes.
    pub attestation_ttl: Duration,
    /// Interval of the kubelets' Lease and Ready heartbeats.
    pub heartbeat: Duration,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            join_delay: Duration::from_secs(1),
            pod_termination: Duration::from_millis(200),
            attestation_ttl: Duration::from_secs(24 * 3600),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// Where machines reach the API server (from the admin kubeconfig).
#[derive(Clone, Debug)]
struct Endpoint {
    server: String,
    ca_pem: String,
}

impl Endpoint {
    fn from_kubeconfig(path: &Path) -> Result<Self> {
        use base64::Engine;
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let cluster = kubeconfig
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .context("kubeconfig without a cluster")?;
        let server = cluster.server.clone().context("cluster without server")?;
        let ca_b64 = cluster
            .certificate_authority_data
            .as_deref()
            .context("the simulated cloud needs certificate-authority-data in the kubeconfig")?;
        let ca_pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(ca_b64)?)?;
        Ok(Self { server, ca_pem })
    }
}

/// A machine and, once it joined, its running kubelet.
struct Slot {
    machine: Machine,
    boot: Option<JoinHandle<()>>,
    kubelet: Arc<Mutex<Option<Kubelet>>>,
}

#[derive(Default)]
struct State {
    machines: BTreeMap<String, Slot>,
    never_attest: bool,
    join_delay: Option<Duration>,
    created: u64,
}

/// The simulated cloud. Cheap to clone (shared state).
#[derive(Clone)]
pub struct SimulatedCloud {
    client: Client,
    endpoint: Endpoint,
    config: CloudConfig,
    state: Arc<Mutex<State>>,
    dir: Arc<TempDir>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How machines' CSRs get approved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Approval {
    /// The operator's approver decides (machines the operator creates).
    Operator,
    /// Approved with the admin client (the fleet from before the operator).
    Admin,
}

impl SimulatedCloud {
    /// A cloud on the cluster of `kubeconfig` (admin). Installs the
    /// bootstrap RBAC the join tokens need (`manifests/base/node-bootstrap.yaml`).
    pub async fn new(client: Client, kubeconfig: &Path, config: CloudConfig) -> Result<Self> {
        crate::allow_node_bootstrap(&client).await?;
        Ok(Self {
            client,
            endpoint: Endpoint::from_kubeconfig(kubeconfig)?,
            config,
            state: Arc::default(),
            dir: Arc::new(tempfile::Builder::new().prefix("cloud-").tempdir()?),
        })
    }

    /// From now on, machines boot but never attest (or stop doing so).
    pub fn set_never_attest(&self, never: bool) {
        lock(&self.state).never_attest = never;
    }

    /// Overrides the join delay of machines created from now on.
    pub fn set_join_delay(&self, delay: Duration) {
        lock(&self.state).join_delay = Some(delay);
    }

    /// Machines created so far through [`Provider::create_machine`]
    /// (including deleted ones; adopted machines do not count).
    pub fn machines_created(&self) -> u64 {
        lock(&self.state).created
    }

    /// Names of the machines that exist now.
    pub fn machines(&self) -> Vec<String> {
        lock(&self.state).machines.keys().cloned().collect()
    }

    /// Boots a machine at once, its CSR approved with the admin client: the
    /// fleet that existed before the operator was installed.
    pub async fn adopt(&self, request: &MachineRequest) -> Result<()> {
        let running = self.boot(request, Approval::Admin).await?;
        lock(&self.state).machines.insert(
            request.name.clone(),
            Slot {
                machine: machine_of(request),
                boot: None,
                kubelet: Arc::new(Mutex::new(Some(running))),
            },
        );
        Ok(())
    }

    /// Joins one machine: the simulated gate's attestation and token, then
    /// the kubelet's TLS bootstrap.
    async fn boot(&self, request: &MachineRequest, approval: Approval) -> Result<Kubelet> {
        let name = &request.name;
        attest(&self.client, request, self.config.attestation_ttl).await?;
        let token = mint_join_token(&self.client, name).await?;
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let bootstrap = dir.join("bootstrap-kubelet.kubeconfig");
        std::fs::write(
            &bootstrap,
            crate::token_kubeconfig(
                &self.endpoint.server,
                &self.endpoint.ca_pem,
                "bootstrap",
                &token,
            ),
        )?;
        let options = KubeletOptions {
            labels: BTreeMap::from([
                (LABEL_NODE_POOL.to_owned(), request.pool.clone()),
                (
                    LABEL_NODE_IMAGE.to_owned(),
                    image_label_value(&request.image),
                ),
            ]),
            kubelet_version: request.kubernetes_version.clone(),
            provider_id: Some(machine_of(request).provider_id),
            internal_ip: None,
            heartbeat: self.config.heartbeat,
            pod_termination: self.config.pod_termination,
        };
        let admin = self.client.clone();
        Kubelet::start(name, &bootstrap, &dir, &options, |csr| async move {
            match approval {
                Approval::Operator => Ok(()),
                Approval::Admin => approve_csr(&admin, &csr).await,
            }
        })
        .await
        .with_context(|| format!("kubelet of machine {name}"))
    }

    /// Creates and deletes machines from what a `record-only` operator
    /// writes: a machine for every PendingNode (goal Join) that has not
    /// failed; a machine goes when its PendingNode failed, or when its Node
    /// was deleted and no PendingNode keeps it. Runs until aborted.
    pub fn follow_pending_nodes(&self) -> JoinHandle<()> {
        let cloud = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(err) = cloud.follow_once().await {
                    tracing::debug!(error = %format!("{err:#}"), "following PendingNodes");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    }

    async fn follow_once(&self) -> Result<()> {
        let pending = Api::<PendingNode>::all(self.client.clone())
            .list(&ListParams::default())
            .await?;
        let nodes: BTreeSet<String> = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        let mut live = BTreeSet::new();
        for p in pending.iter().filter(|p| p.spec.goal == PendingGoal::Join) {
            let failed = p
                .status
                .as_ref()
                .is_some_and(|s| s.state == PendingState::Failed);
            if failed {
                continue;
            }
            live.insert(p.name_any());
            if lock(&self.state).machines.contains_key(&p.name_any()) {
                continue;
            }
            let version = Api::<NodeVersion>::all(self.client.clone())
                .get(&p.spec.pool)
                .await?;
            let request = MachineRequest {
                name: p.name_any(),
                pool: p.spec.pool.clone(),
                image: p.spec.image.clone(),
                kubernetes_version: version.spec.kubernetes_version,
                control_plane: version.spec.control_plane,
            };
            self.create_machine(&request).await?;
        }
        let gone: Vec<String> = lock(&self.state)
            .machines
            .keys()
            .filter(|name| !live.contains(*name) && !nodes.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.delete_machine(&name).await?;
        }
        Ok(())
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

/// Approves a CSR with the admin client.
async fn approve_csr(client: &Client, name: &str) -> Result<()> {
    let approval = json!({ "status": { "conditions": [{
        "type": "Approved", "status": "True", "reason": "PreexistingFleet",
        "message": "approved by the simulated cloud for a machine from before the operator"
    }]}});
    Api::<CertificateSigningRequest>::all(client.clone())
        .patch_approval(name, &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    Ok(())
}

/// The simulated gate's record: a trusted NodeAttestation of `request.image`.
async fn attest(client: &Client, request: &MachineRequest, ttl: Duration) -> Result<()> {
    let now = jiff::Timestamp::now();
    let expires = now + jiff::SignedDuration::try_from(ttl)?;
    let attestation = NodeAttestation::new(
        &request.name,
        NodeAttestationSpec {
            node_name: request.name.clone(),
            evidence_kind: EvidenceKind::Tpm,
            image: request.image.clone(),
            pool: Some(request.pool.clone()),
            measurements: BTreeMap::new(),
            ak_fingerprint: hex_digest(&request.name),
            disk_uuid: None,
            attestation_endpoint: None,
            attested_at: Time(now),
            expires_at: Time(expires),
            verdict: Verdict::Trusted,
            warnings: vec![],
        },
    );
    Api::<NodeAttestation>::all(client.clone())
        .patch(
            &request.name,
            &PatchParams::apply("confidential-simulated-gate").force(),
            &Patch::Apply(&attestation),
        )
        .await
        .with_context(|| format!("writing the NodeAttestation of {}", request.name))?;
    Ok(())
}

fn hex_digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Mints a bootstrap token bound to `node_name` the way the gate's join
/// endpoint does (our own bootstrap group, the node-name annotation the
/// approver checks, 15 minutes); returns `id.secret`.
pub async fn mint_join_token(client: &Client, node_name: &str) -> Result<String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{node_name}/{}/{}/{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        jiff::Timestamp::now().as_nanosecond()
    );
    let digest = hex_digest(&seed);
    let (id, secret) = (&digest[..6], &digest[6..22]);
    let expiration = jiff::Timestamp::now() + jiff::SignedDuration::from_mins(15);
    let object: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": format!("bootstrap-token-{id}"),
            "namespace": "kube-system",
            "annotations": { ANNOTATION_TOKEN_NODE_NAME: node_name },
        },
        "type": "bootstrap.kubernetes.io/token",
        "stringData": {
            "token-id": id, "token-secret": secret,
            "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "usage-bootstrap-authentication": "true",
            "auth-extra-groups": BOOTSTRAP_TOKEN_GROUP,
            "description": format!("simulated join of node {node_name}"),
        }
    }))?;
    Api::<Secret>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("minting the join token of {node_name}"))?;
    Ok(format!("{id}.{secret}"))
}

impl Provider for SimulatedCloud {
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
            let delay = state.join_delay.unwrap_or(self.config.join_delay);
            let kubelet = Arc::new(Mutex::new(None));
            let boot = (!state.never_attest).then(|| {
                let (cloud, request, kubelet) = (self.clone(), request.clone(), kubelet.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    match cloud.boot(&request, Approval::Operator).await {
                        Ok(running) => *lock(&kubelet) = Some(running),
                        Err(err) => tracing::warn!(
                            node = %request.name, error = %format!("{err:#}"), "machine failed to join"
                        ),
                    }
                })
            });
            let machine = machine_of(request);
            state.machines.insert(
                request.name.clone(),
                Slot {
                    machine: machine.clone(),
                    boot,
                    kubelet,
                },
            );
            Ok(machine)
        })
    }

    fn delete_machine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let slot = lock(&self.state).machines.remove(name);
            if let Some(slot) = slot {
                if let Some(boot) = slot.boot {
                    boot.abort();
                }
                // Dropping the kubelet stops its heartbeats and its pods.
                lock(&slot.kubelet).take();
            }
            Ok(())
        })
    }

    fn control_plane_membership(&self) -> Result<(), String> {
        Err(CLOUD_RUNS_NO_ETCD.to_owned())
    }

    fn leave_control_plane<'a>(
        &'a self,
        _request: &'a LeaveRequest,
    ) -> BoxFuture<'a, Result<Leave, ProviderError>> {
        Box::pin(async { Err(ProviderError::Failed(CLOUD_RUNS_NO_ETCD.to_owned())) })
    }
}

/// The simulated cloud's machines run no etcd, so it refuses control-plane
/// pools (a test that rolls one wraps it with a real etcd per machine).
const CLOUD_RUNS_NO_ETCD: &str =
    "the simulated cloud runs no etcd: its machines cannot be control-plane members";
