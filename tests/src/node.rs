//! A simulated confidential node: its own swtpm (real TPM 2.0 simulator with
//! an EK certificate from a local CA), a "firmware" step that extends a PCR
//! with the digests of the node image it boots (as measured boot would), the
//! real `confidential-bootstrapper` binary joining through the gate, and a
//! kubelet stand-in that does the kubelet's TLS bootstrap with the token it
//! received, registers the Node and keeps its Lease and Ready condition.
//!
//! Rust API (what other suites use):
//! ```ignore
//! let ca = SwtpmCa::new()?;
//! let image = NodeImage::new("node-image:v1");
//! let gate_pin = GateIdentity::derive(&master)?.pin(); // the gate it trusts
//! let mut node = SimulatedNode::boot(&ca, "node-a", &image, gate_pin)?;
//! let out = node.run_bootstrapper(&[gate_addr], &["--pool", "pool"]).await?;
//! assert!(out.success);
//! let kubelet = node.start_kubelet(|csr| approve(csr)).await?; // Node + heartbeats
//! ```
//! Pods are not run by this stand-in (see the node-operator issue).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::swtpm::{Swtpm, SwtpmCa};
use crate::{ManagedProcess, client_from_kubeconfig, eventually};

/// PCR the simulated firmware measures the node image into.
pub const IMAGE_PCR: u32 = 4;

/// A node image as the firmware measures it: component digests, in order.
#[derive(Debug, Clone)]
pub struct NodeImage {
    pub name: String,
    pub components: Vec<[u8; 32]>,
}

impl NodeImage {
    /// An image whose components are derived from its name (kernel, initrd,
    /// command line), so different names measure differently.
    pub fn new(name: &str) -> Self {
        let components = ["kernel", "initrd", "cmdline"]
            .iter()
            .map(|part| Sha256::digest(format!("{part} of {name}")).into())
            .collect();
        Self {
            name: name.to_owned(),
            components,
        }
    }

    /// The PCR value measured boot of this image produces (replay from zero).
    pub fn expected_pcr(&self) -> [u8; 32] {
        confidential_attestation::measurements::replay(&self.components)
    }
}

/// Outcome of one bootstrapper run.
#[derive(Debug)]
pub struct BootstrapOutcome {
    pub success: bool,
    pub log: String,
}

/// A simulated confidential machine.
pub struct SimulatedNode {
    pub name: String,
    pub swtpm: Swtpm,
    /// The gate key this machine's launch configuration pins
    /// (`GateIdentity::pin`): its bootstrapper talks to no other server.
    pub gate_pin: [u8; 32],
    dir: TempDir,
}

/// Path of the `confidential-bootstrapper` binary: `$CONFIDENTIAL_BOOTSTRAPPER_BIN`,
/// or the one beside this test binary's target directory (built with
/// `cargo build -p confidential-bootstrapper` when missing).
pub fn bootstrapper_binary() -> Result<PathBuf> {
    crate::workspace_binary(
        "confidential-bootstrapper",
        "confidential-bootstrapper",
        "CONFIDENTIAL_BOOTSTRAPPER_BIN",
    )
}

impl SimulatedNode {
    /// Manufactures the machine's TPM (EK certificate from `ca`) and "boots"
    /// `image`: the firmware extends [`IMAGE_PCR`] with its components.
    /// `gate_pin` is the gate key its launch configuration pins
    /// (`GateIdentity::derive(&master).pin()` of the gate it should join).
    pub fn boot(ca: &SwtpmCa, name: &str, image: &NodeImage, gate_pin: [u8; 32]) -> Result<Self> {
        let swtpm = Swtpm::start(ca)?;
        swtpm.measure_boot(IMAGE_PCR, &image.components)?;
        Ok(Self {
            name: name.to_owned(),
            swtpm,
            gate_pin,
            dir: tempfile::Builder::new().prefix("node-").tempdir()?,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the bootstrapper writes the kubelet bootstrap kubeconfig.
    pub fn bootstrap_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("bootstrap-kubelet.kubeconfig")
    }

    /// UUID of this machine's state disk, as its bootstrapper names it.
    pub fn disk_uuid(&self) -> String {
        format!("00000000-0000-4000-8000-{:012x}", std::process::id())
    }

    pub fn disk_key_file(&self) -> PathBuf {
        self.dir.path().join("disk.key")
    }

    /// The bootstrapper command line for this node: the pinned gate key, one
    /// join attempt, the bootstrap kubeconfig for the kubelet stand-in, the
    /// disk key to a file (unless `extra` names a `--state-device`). `extra`
    /// may override `--gate-pin`.
    pub fn bootstrapper_command(&self, endpoints: &[String], extra: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(bootstrapper_binary()?);
        for e in endpoints {
            cmd.arg("--endpoint").arg(e);
        }
        if !extra.iter().any(|a| a.starts_with("--gate-pin")) {
            cmd.arg("--gate-pin").arg(hex::encode(self.gate_pin));
        }
        cmd.arg("--node-name")
            .arg(&self.name)
            .arg("--tcti")
            .arg(self.swtpm.tcti())
            .arg("--disk-uuid")
            .arg(self.disk_uuid())
            .arg("--kubelet-bootstrap-kubeconfig")
            .arg(self.bootstrap_kubeconfig())
            .arg("--ak-state")
            .arg(self.dir.path().join("ak.blob"))
            .arg("--max-attempts")
            .arg("1");
        // A state device replaces the key file (the flags conflict).
        if !extra.contains(&"--state-device") {
            cmd.arg("--disk-key-file").arg(self.disk_key_file());
        }
        if !extra.contains(&"--pcrs") {
            cmd.arg("--pcrs").arg(IMAGE_PCR.to_string());
        }
        cmd.args(extra);
        Ok(cmd)
    }

    /// Runs the real bootstrapper once against `endpoints` and waits for it
    /// to exit. `extra` is appended to its arguments.
    pub async fn run_bootstrapper(
        &self,
        endpoints: &[String],
        extra: &[&str],
    ) -> Result<BootstrapOutcome> {
        let mut cmd = tokio::process::Command::from(self.bootstrapper_command(endpoints, extra)?);
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .context("bootstrapper timed out")??;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.dir.path().join("bootstrapper.log"), &log)?;
        Ok(BootstrapOutcome {
            success: out.status.success(),
            log,
        })
    }

    /// Starts the bootstrapper as a long-running process (e.g. with
    /// `--attest-listen`), stopped by pid when the returned handle drops.
    pub fn spawn_bootstrapper(
        &self,
        endpoints: &[String],
        extra: &[&str],
    ) -> Result<ManagedProcess> {
        ManagedProcess::spawn(
            "confidential-bootstrapper",
            self.bootstrapper_command(endpoints, extra)?,
            &self.dir.path().join("bootstrapper.log"),
        )
    }

    /// The kubelet stand-in: TLS bootstrap with the token (submits the
    /// kubelet client CSR; `approve` is called with its name, as a CSR
    /// approver would act), then registers the Node and keeps its Lease and
    /// Ready condition fresh until the returned [`Kubelet`] is dropped.
    pub async fn start_kubelet<F, Fut>(&self, approve: F) -> Result<Kubelet>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        self.start_kubelet_with(&KubeletOptions::default(), approve)
            .await
    }

    /// [`SimulatedNode::start_kubelet`] with the kubelet's `--node-labels` and
    /// reported version.
    pub async fn start_kubelet_with<F, Fut>(
        &self,
        options: &KubeletOptions,
        approve: F,
    ) -> Result<Kubelet>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let bootstrap = client_from_kubeconfig(&self.bootstrap_kubeconfig()).await?;
        let (csr_name, key_pem) = submit_kubelet_csr(&bootstrap, &self.name).await?;
        approve(csr_name.clone()).await?;
        let cert_pem = signed_certificate(&bootstrap, &csr_name).await?;
        let kubeconfig_text = std::fs::read_to_string(self.bootstrap_kubeconfig())?;
        let server = kubeconfig_text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .context("bootstrap kubeconfig without server")?
            .to_owned();
        let ca_b64 = kubeconfig_text
            .lines()
            .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
            .context("bootstrap kubeconfig without CA")?;
        use base64::Engine;
        let ca_pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(ca_b64)?)?;
        let path = self.dir.path().join("kubelet.kubeconfig");
        std::fs::write(
            &path,
            crate::client_kubeconfig(
                &server,
                &ca_pem,
                "kubelet",
                &crate::pki::CertifiedKey {
                    cert_pem: cert_pem.clone(),
                    key_pem,
                },
            ),
        )?;
        let client = client_from_kubeconfig(&path).await?;
        register_node(&client, &self.name, options).await?;
        heartbeat_once(&client, &self.name).await?;
        let heartbeat = tokio::spawn(heartbeats(client.clone(), self.name.clone()));
        Ok(Kubelet {
            client,
            cert_pem,
            heartbeat,
        })
    }
}

/// A running kubelet stand-in.
pub struct Kubelet {
    /// Client with the node's signed identity (`system:node:<name>`).
    pub client: Client,
    pub cert_pem: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Waits until the controller-manager signed the CSR `name`; returns the PEM.
pub async fn signed_certificate(client: &Client, name: &str) -> Result<String> {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let cert = eventually(
        &format!("the certificate of CSR {name}"),
        Duration::from_secs(60),
        || {
            let csrs = csrs.clone();
            async move {
                Ok(csrs
                    .get(name)
                    .await?
                    .status
                    .and_then(|s| s.certificate)
                    .map(|c| c.0))
            }
        },
    )
    .await?;
    Ok(String::from_utf8(cert)?)
}

/// The subject common name of a PEM certificate.
pub fn common_name(cert_pem: &str) -> Result<Option<String>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())?;
    let cert = pem.parse_x509()?;
    Ok(cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(str::to_owned))
}

/// Submits a kubelet client CSR as kubelet TLS bootstrap does; returns its
/// name and the private key PEM.
pub async fn submit_kubelet_csr(bootstrap: &Client, node_name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{node_name}"),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let request = params.serialize_request(&key)?.pem()?;
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("node-csr-{node_name}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: "kubernetes.io/kube-apiserver-client-kubelet".into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let created = Api::<CertificateSigningRequest>::all(bootstrap.clone())
        .create(&PostParams::default(), &csr)
        .await?;
    Ok((
        created.metadata.name.context("CSR without name")?,
        key.serialize_pem(),
    ))
}

fn ready_condition(now: &str) -> serde_json::Value {
    json!({
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "simulated kubelet is posting ready status",
        "lastHeartbeatTime": now, "lastTransitionTime": now
    })
}

/// What the kubelet stand-in registers beyond its name.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// `--node-labels` (the node pool and image labels, for example).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Reported `status.nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
    /// Reported `InternalIP` in `status.addresses` (the kubelet's
    /// `--node-ip`); where the gate reaches the node's attestation endpoint.
    pub internal_ip: Option<std::net::IpAddr>,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            labels: Default::default(),
            kubelet_version: format!("v{}", crate::binaries::KUBERNETES_VERSION),
            internal_ip: None,
        }
    }
}

async fn register_node(client: &Client, name: &str, options: &KubeletOptions) -> Result<()> {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut labels = options.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), name.to_owned());
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {},
    }))?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &node).await?;
    let mut addresses = vec![json!({ "type": "Hostname", "address": name })];
    if let Some(ip) = options.internal_ip {
        addresses.push(json!({ "type": "InternalIP", "address": ip.to_string() }));
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "addresses": addresses,
                "conditions": [ready_condition(&now)],
                "nodeInfo": {
                    "machineID": name, "systemUUID": name, "bootID": "simulated",
                    "kernelVersion": "simulated", "osImage": "simulated confidential node",
                    "containerRuntimeVersion": "simulated://1",
                    "kubeletVersion": options.kubelet_version, "kubeProxyVersion": "",
                    "operatingSystem": "linux", "architecture": "amd64"
                }
            } })),
        )
        .await?;
    Ok(())
}

/// One kubelet heartbeat: renew the node Lease and the Ready condition.
pub async fn heartbeat_once(client: &Client, name: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let now_ts = jiff::Timestamp::now();
    let now = now_ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let micro = now_ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": name, "namespace": "kube-node-lease" },
        "spec": { "holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro }
    });
    leases
        .patch(
            name,
            &PatchParams::apply("simulated-kubelet").force(),
            &Patch::Apply(&lease),
        )
        .await?;
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "status": { "conditions": [ready_condition(&now)] } })),
        )
        .await?;
    Ok(())
}

async fn heartbeats(client: Client, name: String) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Err(e) = heartbeat_once(&client, &name).await {
            tracing::warn!(node = %name, error = %e, "heartbeat failed");
        }
    }
}
