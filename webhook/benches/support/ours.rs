//! Our gate for the admission benchmarks: the policies and attested nodes
//! that make the load mix admissible, the `confidential-webhook` binary as
//! its own process (so its RSS and CPU time are its own), and its webhook
//! configuration registered with the API server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::{
    AttestationPolicy, EvidenceKind, ImagePolicy, NodeAttestation, NodeAttestationSpec, Verdict,
};
use confidential_testenv::pki::CertificateAuthority;
use confidential_testenv::{eventually, install_crds};
use hyper::body::Bytes;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use super::client::{request, tls_trusting};
use super::reviews::{IMAGE, NODES, PCR4, attestation_policy, image_policy};

/// Installs our CRDs, the AttestationPolicy, the ImagePolicy and a valid
/// NodeAttestation for each node the Node reviews name.
pub async fn install_policies(client: &kube::Client) -> Result<()> {
    install_crds(client, &confidential_testenv::crds_dir()).await?;
    Api::<AttestationPolicy>::all(client.clone())
        .create(&PostParams::default(), &attestation_policy()?)
        .await?;
    Api::<ImagePolicy>::all(client.clone())
        .create(&PostParams::default(), &image_policy())
        .await?;
    let atts: Api<NodeAttestation> = Api::all(client.clone());
    let now = jiff::Timestamp::now();
    for i in 0..NODES {
        let name = format!("node-{i}");
        atts.create(
            &PostParams::default(),
            &NodeAttestation::new(
                &name,
                NodeAttestationSpec {
                    node_name: name.clone(),
                    evidence_kind: EvidenceKind::Tpm,
                    image: IMAGE.into(),
                    pool: Some("workers".into()),
                    measurements: [("4".to_owned(), PCR4.to_owned())].into(),
                    ak_fingerprint: format!("{i:064x}"),
                    disk_uuid: None,
                    attestation_endpoint: None,
                    attested_at: Time(now),
                    expires_at: Time(now + jiff::SignedDuration::from_hours(24)),
                    verdict: Verdict::Trusted,
                    warnings: vec![],
                },
            ),
        )
        .await?;
    }
    Ok(())
}

/// The `confidential-webhook` binary running against the cluster.
pub struct Gate {
    child: std::process::Child,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub ca_pem: String,
}

impl Gate {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("webhook.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("stopping confidential-webhook: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("waiting for confidential-webhook: {e}");
        }
    }
}

/// Starts the release-built `confidential-webhook` with a serving
/// certificate for 127.0.0.1 and waits until it is ready.
pub async fn start_gate(kubeconfig: &std::path::Path) -> Result<Gate> {
    let dir = tempfile::tempdir()?;
    let ca = CertificateAuthority::new("loadgen-ca")?;
    let pair = ca.issue_server(
        "confidential-webhook",
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?;
    std::fs::write(dir.path().join("tls.crt"), &pair.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &pair.key_pem)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = std::fs::File::create(dir.path().join("webhook.log"))?;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_confidential-webhook"))
        .args(["--listen", &addr.to_string(), "--kubeconfig"])
        .arg(kubeconfig)
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting confidential-webhook")?;
    let gate = Gate {
        child,
        dir,
        addr,
        ca_pem: ca.cert.cert_pem.clone(),
    };
    let tls = tls_trusting(&gate.ca_pem)?;
    let ready = eventually("webhook ready", Duration::from_secs(60), || {
        let tls = tls.clone();
        async move {
            Ok(matches!(
                request(addr, &tls, "GET", "/readyz", Bytes::new()).await,
                Ok((200, _))
            )
            .then_some(()))
        }
    })
    .await;
    ready.with_context(|| format!("webhook log tail:\n{}", gate.log_tail(20)))?;
    Ok(gate)
}

/// Registers our webhook configuration (`manifests/webhook/`) with its
/// service replaced by the gate's URL; `workload_namespaces`, when given,
/// is an extra namespaceSelector expression that narrows the workloads
/// webhook (to compare with a peer in other namespaces of the same cluster).
pub async fn register_gate(
    client: &kube::Client,
    gate: &Gate,
    workload_namespaces: Option<Value>,
) -> Result<()> {
    let mut config: ValidatingWebhookConfiguration =
        serde_saphyr::from_str(&std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../manifests/webhook/validatingwebhookconfiguration.yaml"),
        )?)?;
    for w in config.webhooks.iter_mut().flatten() {
        w.client_config.service = None;
        w.client_config.url = Some(format!("https://{}/validate", gate.addr));
        w.client_config.ca_bundle = Some(k8s_openapi::ByteString(gate.ca_pem.clone().into_bytes()));
        if let (Some(expression), true) = (&workload_namespaces, w.name.starts_with("workloads.")) {
            let selector = w.namespace_selector.get_or_insert_with(Default::default);
            selector
                .match_expressions
                .get_or_insert_with(Vec::new)
                .push(serde_json::from_value(expression.clone())?);
        }
    }
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await?;
    Ok(())
}

/// Waits until the API server sends `namespace`'s Pods to a webhook that
/// refuses tag-only images (a dry-run create is refused).
pub async fn wait_enforced(client: &kube::Client, namespace: &str) -> Result<()> {
    let probe: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    eventually(
        &format!("the API server calls the webhook for {namespace}"),
        Duration::from_secs(60),
        || {
            let probe = probe.clone();
            async move {
                let pod = serde_json::from_value(json!({"metadata": {"name": "probe"},
                    "spec": {"containers": [{"name": "c", "image": "nginx:latest"}]}}))?;
                let dry = PostParams {
                    dry_run: true,
                    ..Default::default()
                };
                Ok(
                    matches!(probe.create(&dry, &pod).await, Err(kube::Error::Api(_)))
                        .then_some(()),
                )
            }
        },
    )
    .await
}
