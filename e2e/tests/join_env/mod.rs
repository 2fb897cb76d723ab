//! The environment of the join suites (`join.rs`, `join_gaps.rs`): a real
//! control plane with the CRDs, a policy trusting one measured image, a
//! pool, and the gate's join endpoint in-process on its own aTLS port,
//! reading the same kind of watch caches the binary runs; plus helpers to
//! join through the library with hooks for attacks.

#![allow(dead_code)] // each suite uses its own subset

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::{AttestationPolicy, NodeAttestation, NodeVersion};
use confidential_attestation::atls::{self, AtlsClient, PURPOSE_JOIN};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope, TpmEvidence};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, JoinRequest, PATH_ACTIVATE, PATH_JOIN, Refused,
};
use confidential_attestation::tpm::issuer::TpmIssuer;
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::node::{BootstrapOutcome, IMAGE_PCR, NodeImage, SimulatedNode};
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{TestCluster, crds_dir, eventually, install_crds, unique_name};
use confidential_webhook::join::{AttemptLimit, Gate, GateConfig, serve};
use confidential_webhook::state::{self, Stores};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

/// The disk UUID library joins name unless a test says otherwise.
pub const DISK_UUID: &str = "5e1f0000-0000-4000-8000-000000000001";

/// A cluster with CRDs, a policy trusting one image, a pool, and a gate.
pub struct Env {
    pub cluster: TestCluster,
    pub ca: SwtpmCa,
    pub gate: Arc<Gate>,
    pub stores: Stores,
    pub addr: String,
    pub image: NodeImage,
    pub policy: String,
    pub pool: String,
    pub master: MasterSecret,
    server_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for task in &self.server_tasks {
            task.abort();
        }
    }
}

/// Attempts per source generous enough for any suite but the limit's own.
pub const GENEROUS: AttemptLimit = AttemptLimit {
    burst: 1000,
    per_minute: 6000,
};

impl Env {
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// `tweak` may change the policy spec (JSON) before it is created.
    pub async fn start_with(tweak: impl FnOnce(&mut serde_json::Value)) -> Result<Self> {
        Self::start_full(tweak, GENEROUS).await
    }

    pub async fn start_full(
        tweak: impl FnOnce(&mut serde_json::Value),
        attempts: AttemptLimit,
    ) -> Result<Self> {
        let cluster = TestCluster::start().await?;
        let client = cluster.client.clone();
        install_crds(&client, &crds_dir()).await?;
        confidential_testenv::allow_node_bootstrap(&client).await?;

        // The local EK CA materialises with the first manufactured TPM.
        let ca = SwtpmCa::new()?;
        drop(Swtpm::start(&ca)?);
        let image = NodeImage::new(&unique_name("node-image"));
        let publisher = Publisher::random("test-publisher");
        let policy = unique_name("policy");
        let pool = unique_name("pool");
        let mut spec = serde_json::to_value(fixtures::policy_spec(
            Some(&ca.issuer_pem()?),
            &[&publisher],
            vec![publisher.entry(&fixtures::node_image_file(&image))],
        ))?;
        tweak(&mut spec);
        let policy_obj: AttestationPolicy =
            serde_json::from_value(json!({ "metadata": { "name": policy }, "spec": spec }))?;
        Api::<AttestationPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy_obj)
            .await?;
        let version: NodeVersion = serde_json::from_value(json!({
            "metadata": { "name": pool },
            "spec": { "image": image.name, "kubernetesVersion": "v1.35.0", "replicas": 1 }
        }))?;
        Api::<NodeVersion>::all(client.clone())
            .create(&PostParams::default(), &version)
            .await?;

        // The gate's caches, watched as the binary watches them.
        let (stores, writers) = Stores::new();
        let watch = tokio::spawn(state::watch(client.clone(), writers));
        stores.wait_ready().await;
        let master = MasterSecret::new(vec![0x42; 32], b"test-salt".to_vec())?;
        let mut env = Self {
            gate: Arc::new(Gate::new(gate_config(
                &cluster,
                client.clone(),
                stores.clone(),
                &master,
                &policy,
                &pool,
                attempts,
            )?)?),
            cluster,
            ca,
            stores,
            addr: String::new(),
            image,
            policy,
            pool,
            master,
            server_tasks: vec![watch],
        };
        env.addr = env.serve_gate(env.gate.clone()).await?;
        let (stores, policy, pool) = (env.stores.clone(), env.policy.clone(), env.pool.clone());
        eventually(
            "the gate to see the policy and the pool",
            Duration::from_secs(60),
            || {
                let ready = stores
                    .attestation_policies
                    .get(&ObjectRef::new(&policy))
                    .is_some()
                    && stores.node_versions.get(&ObjectRef::new(&pool)).is_some();
                async move { Ok(ready.then_some(())) }
            },
        )
        .await?;
        Ok(env)
    }

    /// Serves `gate` on a new loopback port for as long as the Env lives.
    pub async fn serve_gate(&mut self, gate: Arc<Gate>) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        self.server_tasks.push(tokio::spawn(async move {
            if let Err(e) = serve(listener, gate).await {
                eprintln!("join server stopped: {e:#}");
            }
        }));
        Ok(addr)
    }

    /// A gate configuration like this Env's, with another client or stores.
    pub fn config(&self, client: Client, stores: Stores) -> Result<GateConfig> {
        gate_config(
            &self.cluster,
            client,
            stores,
            &self.master,
            &self.policy,
            &self.pool,
            GENEROUS,
        )
    }

    pub fn client(&self) -> Client {
        self.cluster.client.clone()
    }

    /// Names of bootstrap token Secrets and NodeAttestations (with their AK).
    pub async fn snapshot(&self) -> Result<(Vec<String>, Vec<(String, String)>)> {
        let secrets = Api::<Secret>::namespaced(self.client(), "kube-system")
            .list(&ListParams::default().fields("type=bootstrap.kubernetes.io/token"))
            .await?
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect();
        let atts = Api::<NodeAttestation>::all(self.client())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|a| (a.spec.node_name, a.spec.ak_fingerprint))
            .collect();
        Ok((secrets, atts))
    }

    /// The key pin of this env's gate, as a node's launch configuration
    /// carries it.
    pub fn gate_pin(&self) -> Result<[u8; 32]> {
        Ok(confidential_attestation::atls::GateIdentity::derive(&self.master)?.pin())
    }

    /// A machine named `name` booted with the pool's image and a TPM whose
    /// EK the environment's CA certified.
    pub fn boot(&self, name: &str) -> Result<SimulatedNode> {
        SimulatedNode::boot(&self.ca, name, &self.image, self.gate_pin()?)
    }

    /// Runs `node`'s real bootstrapper once against this gate.
    pub async fn run(&self, node: &SimulatedNode, extra: &[&str]) -> Result<BootstrapOutcome> {
        node.run_bootstrapper(std::slice::from_ref(&self.addr), extra)
            .await
    }

    /// Boots machine `name` and runs its bootstrapper against this gate:
    /// the boot-run step of the join suites; the outcome is the caller's to
    /// assert.
    pub async fn join(&self, name: &str) -> Result<(SimulatedNode, BootstrapOutcome)> {
        let node = self.boot(name)?;
        let outcome = self.run(&node, &[]).await?;
        Ok((node, outcome))
    }

    /// [`Env::join`], which must succeed.
    pub async fn joined(&self, name: &str) -> Result<SimulatedNode> {
        let (node, outcome) = self.join(name).await?;
        if !outcome.success {
            bail!("{name} did not join:\n{}", outcome.log);
        }
        Ok(node)
    }

    /// Runs `node`'s bootstrapper (with `extra`) against this gate and
    /// checks the gate refused it for `reason` and wrote nothing: no
    /// NodeAttestation written or changed, no bootstrap token.
    pub async fn refused(&self, node: &SimulatedNode, extra: &[&str], reason: &str) -> Result<()> {
        let before = self.snapshot().await?;
        let outcome = self.run(node, extra).await?;
        if outcome.success {
            bail!(
                "{} joined; expected a {reason} refusal:\n{}",
                node.name,
                outcome.log
            );
        }
        if !outcome.log.contains(reason) {
            bail!(
                "{} was refused, but not for {reason}:\n{}",
                node.name,
                outcome.log
            );
        }
        let after = self.snapshot().await?;
        if after != before {
            bail!("a refused join changed the cluster: {before:?} -> {after:?}");
        }
        Ok(())
    }

    /// Waits until the gate's cache holds what the API server holds for the
    /// NodeAttestation `name` (the same resourceVersion, or absence).
    pub async fn wait_cached(&self, name: &str) -> Result<()> {
        let api = Api::<NodeAttestation>::all(self.client());
        let stores = self.stores.clone();
        let name = name.to_owned();
        eventually(
            "the gate's cache to catch up",
            Duration::from_secs(60),
            || {
                let api = api.clone();
                let stores = stores.clone();
                let name = name.clone();
                async move {
                    let live = api
                        .get_opt(&name)
                        .await?
                        .and_then(|a| a.metadata.resource_version);
                    let cached = stores
                        .attestations
                        .get(&ObjectRef::new(&name))
                        .and_then(|a| a.metadata.resource_version.clone());
                    Ok((live == cached).then_some(()))
                }
            },
        )
        .await
    }
}

fn gate_config(
    cluster: &TestCluster,
    client: Client,
    stores: Stores,
    master: &MasterSecret,
    policy: &str,
    pool: &str,
    attempts: AttemptLimit,
) -> Result<GateConfig> {
    let cp = cluster
        .control_plane
        .as_ref()
        .context("needs a private control plane")?;
    Ok(GateConfig {
        client,
        stores,
        master: master.clone(),
        api_server: cp.server.clone(),
        ca_pem: cp.ca_pem.clone(),
        policy: policy.to_owned(),
        default_pool: pool.to_owned(),
        token_ttl: Duration::from_secs(600),
        attempts,
    })
}

/// Approves a CSR as the test's stand-in for the controllers' approver.
pub async fn approve(client: &Client, csr: &str) -> Result<()> {
    let approval = json!({ "status": { "conditions": [{
        "type": "Approved", "status": "True", "reason": "TestApproved", "message": "approved by the join test"
    }]}});
    Api::<CertificateSigningRequest>::all(client.clone())
        .patch_approval(csr, &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    Ok(())
}

/// A join through the library stopped after the first answer, so tests can
/// interleave or tamper with the second step.
pub struct Started {
    pub client: AtlsClient,
    pub status: u16,
    pub body: Vec<u8>,
}

impl Started {
    /// Activates the credential challenge with `issuer`'s TPM.
    pub async fn activate(mut self, issuer: &Arc<TpmIssuer>) -> Result<(u16, Vec<u8>)> {
        if self.status != 202 {
            return Ok((self.status, self.body));
        }
        let challenge: JoinChallenge = serde_json::from_slice(&self.body)?;
        let credential = issuer
            .activate_credential(challenge.challenge)
            .await
            .unwrap_or_else(|_| vec![0; 32]);
        let (status, body) = self
            .client
            .post(
                PATH_ACTIVATE,
                serde_json::to_vec(&ActivateRequest { credential })?,
            )
            .await?;
        Ok((status.as_u16(), body.to_vec()))
    }
}

/// Sends the evidence step of a join for `request_of(evidence)` to `path`.
pub async fn start_join(
    addr: &str,
    path: &str,
    issuer: &Arc<TpmIssuer>,
    request_of: impl FnOnce(TpmEvidence) -> JoinRequest,
) -> Result<Started> {
    let mut client = AtlsClient::connect(addr, atls::client_config(None)?).await?;
    let evidence = issuer
        .quote(client.nonce(PURPOSE_JOIN), vec![IMAGE_PCR])
        .await?;
    let (status, body) = client
        .post(path, serde_json::to_vec(&request_of(evidence))?)
        .await?;
    Ok(Started {
        client,
        status: status.as_u16(),
        body: body.to_vec(),
    })
}

/// Joins through the library instead of the binary, with a hook to tamper
/// with the evidence; activates the credential when challenged.
pub async fn lib_join(
    addr: &str,
    issuer: &Arc<TpmIssuer>,
    node_name: &str,
    tamper: impl FnOnce(&mut TpmEvidence),
) -> Result<(u16, Vec<u8>)> {
    start_join(addr, PATH_JOIN, issuer, |mut evidence| {
        tamper(&mut evidence);
        join_request(node_name, evidence)
    })
    .await?
    .activate(issuer)
    .await
}

pub fn join_request(node_name: &str, evidence: TpmEvidence) -> JoinRequest {
    join_request_for_disk(node_name, DISK_UUID, evidence)
}

pub fn join_request_for_disk(node_name: &str, disk: &str, evidence: TpmEvidence) -> JoinRequest {
    JoinRequest {
        node_name: node_name.to_owned(),
        disk_uuid: disk.to_owned(),
        pool: None,
        attestation_endpoint: None,
        evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence)),
    }
}

pub fn reason(body: &[u8]) -> String {
    serde_json::from_slice::<Refused>(body)
        .map(|r| r.reason)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

pub fn assert_refused(status: u16, body: &[u8], expected: &str) {
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(body));
    assert_eq!(reason(body), expected);
}

/// Fails unless `body` is a JSON refusal with `expected` reason and `status`.
pub fn expect_refusal(
    status: u16,
    body: &[u8],
    expected_status: u16,
    expected: &str,
) -> Result<Refused> {
    let refused: Refused = serde_json::from_slice(body)
        .with_context(|| format!("not a refusal: {}", String::from_utf8_lossy(body)))?;
    if status != expected_status || refused.reason != expected {
        bail!("expected {expected_status} {expected}, got {status} {refused:?}");
    }
    Ok(refused)
}
