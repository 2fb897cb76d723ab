//! A cluster to verify, on real components: a real control plane with our
//! CRDs, the gate's join endpoint (in-process, the webhook crate's real
//! `join::serve`), swtpm machines running the real bootstrapper that join
//! through it and then serve `/v1/attest`, and the admin's local trust files
//! (a publisher-signed measurement file, the publisher key, the cluster
//! file, the EK CA). Shared by `verify.rs` and the `verify` benchmark.
//!
//! The cluster's AttestationPolicy also admits an *unmeasured* image (a
//! machine whose firmware measured nothing) signed by a rogue publisher: the
//! cluster is the party `verify` must not trust, so it can admit machines the
//! admin's measurement file does not describe.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_attestation::atls::{self, AtlsClient};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::measurements::MeasurementFile;
use confidential_attestation::protocol::PATH_ATTEST;
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::node::{NodeImage, SimulatedNode};
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{
    ManagedProcess, TestCluster, crds_dir, eventually, install_crds, unique_name,
};
use confidential_webhook::join::{Gate, GateConfig, serve};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Annotation the plugin reads a node's attestation endpoint from.
pub const ATTEST_ENDPOINT: &str = "confidential.dev/attest-endpoint";

/// The measurement file of a simulated node image (the shared fixture).
pub fn measurement_file(image: &NodeImage) -> Result<MeasurementFile> {
    Ok(fixtures::node_image_file(image))
}

/// A machine serving `/v1/attest` after joining.
pub struct ServingNode {
    pub node: SimulatedNode,
    pub endpoint: String,
    pub process: ManagedProcess,
}

pub struct VerifyEnv {
    pub cluster: TestCluster,
    pub ca: SwtpmCa,
    pub gate_addr: String,
    pub image: NodeImage,
    /// An image whose firmware measured nothing (PCR 4 stays zero).
    pub unmeasured: NodeImage,
    pub pool: String,
    /// The pool whose image is [`VerifyEnv::unmeasured`].
    pub unmeasured_pool: String,
    pub master: MasterSecret,
    pub publisher: Publisher,
    /// The admin's local files.
    pub dir: tempfile::TempDir,
    server_task: tokio::task::JoinHandle<()>,
    watch_task: tokio::task::AbortHandle,
}

impl Drop for VerifyEnv {
    fn drop(&mut self) {
        self.server_task.abort();
        self.watch_task.abort();
    }
}

impl VerifyEnv {
    pub async fn start() -> Result<Self> {
        let cluster = TestCluster::start().await?;
        let client = cluster.client.clone();
        install_crds(&client, &crds_dir()).await?;
        confidential_testenv::allow_node_bootstrap(&client).await?;
        let ca = SwtpmCa::new()?;
        drop(Swtpm::start(&ca)?);
        let image = NodeImage::new(&unique_name("node-image"));
        let unmeasured = NodeImage {
            name: unique_name("unmeasured"),
            components: Vec::new(),
        };
        let publisher = Publisher::random("publisher");
        let rogue = Publisher::random("rogue");
        let trusted_file = fixtures::node_image_file(&image);
        let rogue_file = fixtures::node_image_file(&unmeasured);
        let policy = unique_name("policy");
        let pool = unique_name("pool");
        let policy_obj = confidential_api::AttestationPolicy::new(
            &policy,
            fixtures::policy_spec(
                Some(&ca.issuer_pem()?),
                &[&publisher, &rogue],
                vec![publisher.entry(&trusted_file), rogue.entry(&rogue_file)],
            ),
        );
        Api::<confidential_api::AttestationPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy_obj)
            .await?;
        let version: confidential_api::NodeVersion = serde_json::from_value(json!({
            "metadata": { "name": pool },
            "spec": { "image": image.name, "kubernetesVersion": "v1.35.0", "replicas": 50 }
        }))?;
        Api::<confidential_api::NodeVersion>::all(client.clone())
            .create(&PostParams::default(), &version)
            .await?;
        // The gate checks a joining machine against its pool's image, so the
        // unmeasured machine joins a pool of its own that the (untrusted)
        // cluster's policy admits.
        let unmeasured_pool = unique_name("pool-unmeasured");
        let version: confidential_api::NodeVersion = serde_json::from_value(json!({
            "metadata": { "name": unmeasured_pool },
            "spec": { "image": unmeasured.name, "kubernetesVersion": "v1.35.0", "replicas": 50 }
        }))?;
        Api::<confidential_api::NodeVersion>::all(client.clone())
            .create(&PostParams::default(), &version)
            .await?;
        let cp = cluster
            .control_plane
            .as_ref()
            .context("needs a private control plane")?;
        let salt = unique_name("salt");
        let master = MasterSecret::new(vec![0x5a; 32], salt.clone().into_bytes())?;
        // The gate's caches, watched as the binary watches them; the gate
        // answers once they hold the policy and the pool.
        let (stores, writers) = confidential_webhook::state::Stores::new();
        let watch_task = tokio::spawn(confidential_webhook::state::watch(client.clone(), writers));
        stores.wait_ready().await;
        {
            let (stores, policy, pool, unmeasured_pool) = (
                stores.clone(),
                policy.clone(),
                pool.clone(),
                unmeasured_pool.clone(),
            );
            eventually(
                "the gate to see the policy and the pool",
                Duration::from_secs(60),
                || {
                    use kube::runtime::reflector::ObjectRef;
                    let ready = stores
                        .attestation_policies
                        .get(&ObjectRef::new(&policy))
                        .is_some()
                        && stores.node_versions.get(&ObjectRef::new(&pool)).is_some()
                        && stores
                            .node_versions
                            .get(&ObjectRef::new(&unmeasured_pool))
                            .is_some();
                    async move { Ok(ready.then_some(())) }
                },
            )
            .await?;
        }
        let gate = Arc::new(Gate::new(GateConfig {
            client: client.clone(),
            stores,
            attempts: confidential_webhook::join::AttemptLimit {
                burst: 1000,
                per_minute: 6000,
            },
            master: master.clone(),
            api_server: cp.server.clone(),
            ca_pem: cp.ca_pem.clone(),
            policy,
            default_pool: pool.clone(),
            token_ttl: Duration::from_secs(600),
        })?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let gate_addr = listener.local_addr()?.to_string();
        let server_task = tokio::spawn(async move {
            if let Err(e) = serve(listener, gate).await {
                eprintln!("gate stopped: {e:#}");
            }
        });

        let dir = tempfile::tempdir()?;
        let d = dir.path();
        publisher.write_signed(&d.join("measurements.json"), &trusted_file)?;
        publisher.write_public_key(&d.join("publisher.pub"))?;
        std::fs::write(d.join("ek-ca.pem"), ca.issuer_pem()?)?;
        // The admin's master secret file, in the format the gate reads.
        std::fs::write(
            d.join("master-secret.json"),
            serde_json::to_vec(&json!({
                "secret": hex::encode([0x5au8; 32]),
                "salt": hex::encode(salt.as_bytes()),
            }))?,
        )?;
        std::fs::write(
            d.join("cluster.json"),
            serde_json::to_vec(&json!({
                "clusterId": hex::encode(master.cluster_id()),
                "gateEndpoint": gate_addr,
                "gatePin": hex::encode(confidential_attestation::atls::GateIdentity::derive(&master)?.pin()),
            }))?,
        )?;
        Ok(Self {
            cluster,
            ca,
            gate_addr,
            image,
            unmeasured,
            pool,
            unmeasured_pool,
            master,
            publisher,
            dir,
            server_task,
            watch_task: watch_task.abort_handle(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Boots a machine with `image`, joins it through the gate with the real
    /// bootstrapper, waits for its attestation endpoint, and registers its
    /// Node object (with the endpoint annotation) as the kubelet would.
    pub async fn serving_node(&self, name: &str, image: &NodeImage) -> Result<ServingNode> {
        let node = SimulatedNode::boot(
            &self.ca,
            name,
            image,
            confidential_attestation::atls::GateIdentity::derive(&self.master)?.pin(),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let endpoint = format!("127.0.0.1:{port}");
        let mut process = node.spawn_bootstrapper(
            std::slice::from_ref(&self.gate_addr),
            &[
                "--pcrs",
                "4,15",
                "--attest-listen",
                &endpoint,
                "--pool",
                if image.name == self.unmeasured.name {
                    &self.unmeasured_pool
                } else {
                    &self.pool
                },
            ],
        )?;
        eventually(
            &format!("{name}'s /v1/attest"),
            Duration::from_secs(180),
            || {
                let endpoint = endpoint.clone();
                let running = process.check_running();
                async move {
                    running?;
                    let Ok(mut client) =
                        AtlsClient::connect(&endpoint, atls::client_config(None)?).await
                    else {
                        return Ok(None);
                    };
                    Ok(client
                        .post(PATH_ATTEST, Vec::new())
                        .await
                        .ok()
                        .filter(|(status, _)| status.is_success())
                        .map(drop))
                }
            },
        )
        .await?;
        self.register_node(name, &endpoint).await?;
        Ok(ServingNode {
            node,
            endpoint,
            process,
        })
    }

    /// Creates (or points) the Node object `name` at `endpoint`.
    pub async fn register_node(&self, name: &str, endpoint: &str) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.cluster.client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": name, "annotations": { ATTEST_ENDPOINT: endpoint } },
        }))?;
        match nodes.get_opt(name).await? {
            None => {
                nodes.create(&PostParams::default(), &node).await?;
            }
            Some(_) => {
                nodes
                    .patch(
                        name,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(json!({
                            "metadata": { "annotations": { ATTEST_ENDPOINT: endpoint } }
                        })),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// The verify arguments with the admin's local trust files.
    pub fn trust_args(&self) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            "--measurements".into(),
            p("measurements.json"),
            "--publisher-key".into(),
            p("publisher.pub"),
            "--cluster-file".into(),
            p("cluster.json"),
            "--ek-ca".into(),
            p("ek-ca.pem"),
        ]
    }
}

/// Runs the real plugin binary with `--kubeconfig` and `args`.
pub fn plugin(kubeconfig: &Path, args: &[String]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

/// Runs the plugin without blocking the runtime.
pub async fn plugin_async(kubeconfig: &Path, args: Vec<String>) -> Result<Output> {
    let kubeconfig = kubeconfig.to_owned();
    Ok(tokio::task::spawn_blocking(move || plugin(&kubeconfig, &args)).await?)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
