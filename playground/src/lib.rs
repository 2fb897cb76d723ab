//! The local playground: a confidential cluster on real components on one
//! machine. It starts the test environment's control plane, the gate
//! (`confidential-webhook`: admission webhook registered with the real API
//! server, and the aTLS join endpoint), an `AttestationPolicy` that trusts a
//! local swtpm EK CA and holds publisher-signed measurements of two node
//! images, a `NodeVersion`, and the node operator with a provider whose
//! machines are swtpm-backed simulated confidential nodes. Everything a user
//! does next goes through kubectl and `kubectl confidential`.

pub mod provider;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, EvidenceKind, MeasuredImage, Measurement,
    NodeVersion, NodeVersionSpec, PublisherKey, RolloutStrategy, TpmTrust,
};
use confidential_attestation::measurements::{Expected, MeasurementFile, Measurements};
use confidential_controllers::metrics::Metrics;
use confidential_controllers::reconciler::Settings;
use confidential_testenv::node::{IMAGE_PCR, NodeImage};
use confidential_testenv::pki::CertificateAuthority;
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{
    ControlPlane, ControlPlaneOptions, ManagedProcess, crds_dir, eventually, install_crds,
};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use p256::ecdsa::SigningKey;
use p256::pkcs8::EncodePublicKey;

pub use provider::SwtpmProvider;

/// The node images the playground's policy trusts.
pub const IMAGE_V1: &str = "registry.example/confidential-node:v1";
pub const IMAGE_V2: &str = "registry.example/confidential-node:v2";
/// Kubernetes version of the simulated kubelets.
pub const KUBERNETES_VERSION: &str = "v1.35.4";
/// Name of the policy, pool and publisher the playground creates.
pub const DEFAULT: &str = "default";

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Nodes in the default pool.
    pub nodes: i32,
    /// `maxSurge` of the pool's rollouts.
    pub max_surge: IntOrString,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            max_surge: IntOrString::Int(1),
        }
    }
}

/// A running playground; dropping it stops everything it started.
pub struct Playground {
    pub client: Client,
    pub provider: Arc<SwtpmProvider>,
    operator: tokio::task::JoinHandle<()>,
    _gate: ManagedProcess,
    _ca: Arc<SwtpmCa>,
    _dir: tempfile::TempDir,
    /// Declared last: the control plane stops after everything using it.
    pub control_plane: ControlPlane,
}

impl Drop for Playground {
    fn drop(&mut self) {
        self.operator.abort();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The signed policy entry of a node image as the simulated firmware measures it.
fn measured_image(image: &str, publisher: &SigningKey) -> Result<MeasuredImage> {
    let pcr = NodeImage::new(image).expected_pcr();
    let file = MeasurementFile {
        image: image.to_owned(),
        measurements: Measurements::new(BTreeMap::from([(
            u8::try_from(IMAGE_PCR)?,
            Expected {
                expected: pcr,
                warn_only: false,
            },
        )]))?,
    };
    Ok(MeasuredImage {
        image: image.to_owned(),
        measurements: BTreeMap::from([(
            IMAGE_PCR.to_string(),
            Measurement {
                expected: hex::encode(pcr),
                warn_only: false,
            },
        )]),
        snp: None,
        publisher: DEFAULT.to_owned(),
        signature: file.sign(publisher),
    })
}

impl Playground {
    /// Starts everything and returns once the gate admits requests; nodes
    /// join in the background (see [`Playground::wait_for_pool`]).
    pub async fn start(options: Options) -> Result<Self> {
        let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
        let client = control_plane.client().await?;
        install_crds(&client, &crds_dir()).await?;
        let dir = tempfile::Builder::new()
            .prefix("confidential-playground-")
            .tempdir()?;
        let d = dir.path();

        // The gate: serving certificate, master secret, cluster CA for nodes.
        let gate_ca = CertificateAuthority::new("confidential-playground-gate-ca")?;
        let serving = gate_ca.issue_server(
            "confidential-webhook",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        write(&d.join("tls.crt"), &serving.cert_pem)?;
        write(&d.join("tls.key"), &serving.key_pem)?;
        let secret: [u8; 32] = rand::random();
        let salt: [u8; 16] = rand::random();
        write(
            &d.join("master-secret.json"),
            &serde_json::json!({ "secret": hex::encode(secret), "salt": hex::encode(salt) })
                .to_string(),
        )?;
        // Nodes pin the key the gate derives from this master secret.
        let gate_pin = confidential_attestation::atls::GateIdentity::derive(
            &confidential_attestation::kdf::MasterSecret::new(secret.to_vec(), salt.to_vec())?,
        )?
        .pin();
        write(&d.join("cluster-ca.crt"), &control_plane.ca_pem)?;
        let (webhook_port, join_port) = (free_port()?, free_port()?);
        let mut gate = Command::new(confidential_testenv::workspace_binary(
            "confidential-webhook",
            "confidential-webhook",
            "CONFIDENTIAL_WEBHOOK_BIN",
        )?);
        gate.env("KUBECONFIG", &control_plane.kubeconfig)
            .env("RUST_LOG", "info")
            .arg(format!("--listen=127.0.0.1:{webhook_port}"))
            .arg(format!("--tls-cert={}", d.join("tls.crt").display()))
            .arg(format!("--tls-key={}", d.join("tls.key").display()))
            .arg(format!(
                "--kubeconfig={}",
                control_plane.kubeconfig.display()
            ))
            .arg(format!("--join-listen=127.0.0.1:{join_port}"))
            .arg(format!(
                "--join-master-secret-file={}",
                d.join("master-secret.json").display()
            ))
            .arg(format!("--join-api-server={}", control_plane.server))
            .arg(format!(
                "--join-ca-file={}",
                d.join("cluster-ca.crt").display()
            ))
            .arg(format!("--join-policy={DEFAULT}"))
            .arg(format!("--join-default-pool={DEFAULT}"));
        let gate = ManagedProcess::spawn("confidential-webhook", gate, &d.join("gate.log"))?;
        register_webhook(&client, webhook_port, &gate_ca.cert.cert_pem).await?;
        confidential_testenv::allow_node_bootstrap(&client).await?;

        // Trust: the swtpm EK CA (materialised by setting up one TPM) and a
        // publisher key that signs the measurements of both images.
        let ca = Arc::new(tokio::task::spawn_blocking(SwtpmCa::new).await??);
        {
            let ca = ca.clone();
            tokio::task::spawn_blocking(move || Swtpm::start(&ca).map(drop)).await??;
        }
        let publisher = loop {
            if let Ok(key) = SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
                break key;
            }
        };
        let publisher_pem = publisher
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .context("encoding the publisher key")?;
        let policy = AttestationPolicy::new(
            DEFAULT,
            AttestationPolicySpec {
                evidence_kinds: vec![EvidenceKind::Tpm],
                tpm: Some(TpmTrust {
                    ek_ca_certificates: vec![ca.issuer_pem()?],
                }),
                snp: None,
                publishers: vec![PublisherKey {
                    name: DEFAULT.to_owned(),
                    public_key: publisher_pem,
                }],
                images: vec![
                    measured_image(IMAGE_V1, &publisher)?,
                    measured_image(IMAGE_V2, &publisher)?,
                ],
                reattestation_interval: Some("1h".to_owned()),
            },
        );
        // The first writes also prove the registered gate answers (fail closed until then).
        let policies: Api<AttestationPolicy> = Api::all(client.clone());
        eventually(
            "the gate to admit the AttestationPolicy",
            Duration::from_secs(60),
            || {
                let (policies, policy) = (policies.clone(), policy.clone());
                async move {
                    Ok(policies
                        .create(&PostParams::default(), &policy)
                        .await
                        .ok()
                        .map(drop))
                }
            },
        )
        .await?;
        let pool = NodeVersion::new(
            DEFAULT,
            NodeVersionSpec {
                image: IMAGE_V1.to_owned(),
                kubernetes_version: KUBERNETES_VERSION.to_owned(),
                replicas: options.nodes,
                control_plane: false,
                strategy: RolloutStrategy {
                    max_surge: Some(options.max_surge.clone()),
                    join_deadline_seconds: Some(120),
                    ..Default::default()
                },
            },
        );
        Api::<NodeVersion>::all(client.clone())
            .create(&PostParams::default(), &pool)
            .await
            .context("creating the default NodeVersion")?;

        let provider = Arc::new(SwtpmProvider::new(
            ca.clone(),
            vec![format!("127.0.0.1:{join_port}")],
            gate_pin,
        ));
        let operator = tokio::spawn(confidential_controllers::operator::run(
            client.clone(),
            provider.clone(),
            Metrics::new(),
            Settings::default(),
            None,
        ));
        Ok(Self {
            client,
            provider,
            operator,
            _gate: gate,
            _ca: ca,
            _dir: dir,
            control_plane,
        })
    }

    /// Waits until the default pool reports `replicas` nodes up to date on
    /// `image` and no outdated ones, printing progress.
    pub async fn wait_for_pool(&self, image: &str, timeout: Duration) -> Result<()> {
        let pools: Api<NodeVersion> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let nv = pools.get(DEFAULT).await?;
            let s = nv.status.clone().unwrap_or_default();
            let line = format!(
                "pool {DEFAULT}: {}/{} up to date, {} outdated, {} pending",
                s.up_to_date_count,
                nv.spec.replicas,
                s.outdated_count,
                s.pending.len()
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
            if nv.spec.image == image
                && s.up_to_date_count == nv.spec.replicas
                && s.outdated_count == 0
                && s.observed_generation == nv.metadata.generation
                && !confidential_api::conditions::is_true(
                    &s.conditions,
                    confidential_api::conditions::types::ROLLOUT_PROGRESSING,
                )
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the pool did not reach {image} within {timeout:?} ({last})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Registers the gate's validating webhook from `manifests/webhook/`, pointed
/// at the local gate by URL.
async fn register_webhook(client: &Client, port: u16, ca_pem: &str) -> Result<()> {
    let mut config: ValidatingWebhookConfiguration =
        confidential_testenv::read_manifest("webhook/validatingwebhookconfiguration.yaml")?;
    for webhook in config.webhooks.iter_mut().flatten() {
        let path = webhook
            .client_config
            .service
            .as_ref()
            .and_then(|s| s.path.clone())
            .unwrap_or_else(|| "/validate".to_owned());
        webhook.client_config.service = None;
        webhook.client_config.url = Some(format!("https://127.0.0.1:{port}{path}"));
        webhook.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec()));
    }
    confidential_testenv::apply_cluster_object(client, &config)
        .await
        .context("registering the webhook")?;
    Ok(())
}

/// Sets the default pool's image, as `kubectl confidential upgrade` does.
/// The gate refuses the change while it still sees the previous rollout in
/// progress (its watch may trail the status by a moment), so that refusal is
/// retried for a few seconds; any other refusal fails at once.
pub async fn upgrade(client: &Client, image: &str) -> Result<()> {
    let pools: Api<NodeVersion> = Api::all(client.clone());
    let patch = Patch::Merge(serde_json::json!({ "spec": { "image": image } }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match pools.patch(DEFAULT, &PatchParams::default(), &patch).await {
            Ok(_) => return Ok(()),
            Err(err)
                if err.to_string().contains("in progress")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Err(err).context("updating the default NodeVersion"),
        }
    }
}
