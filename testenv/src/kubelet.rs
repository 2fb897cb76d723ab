//! The one kubelet stand-in of the test environment. A real kubelet needs a
//! container runtime; this one does what the control plane sees of a kubelet,
//! with the node's own credentials only:
//!
//! - TLS bootstrap: submits the kubelet client CSR with the bootstrap token,
//!   waits for kube-controller-manager to sign it once approved, and from
//!   then on acts as `system:node:<name>` (so the Node authorizer and
//!   NodeRestriction judge everything it does);
//! - registers its Node (labels, capacity, kubelet version, provider id) and
//!   keeps its Lease and Ready condition fresh;
//! - runs the pods bound to it to Running/Ready, and finalizes a deleted pod
//!   after a termination delay, as a kubelet does once its containers stop.
//!
//! So drains in every suite (process nodes, the simulated cloud, the
//! playground) evict pods that exist and disappear only when the kubelet
//! lets them go.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::{client_from_kubeconfig, eventually};

/// What the kubelet stand-in registers and how it behaves.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// `--node-labels` (the node pool and image labels, for example).
    pub labels: BTreeMap<String, String>,
    /// Reported `status.nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
    /// `spec.providerID` of the Node, if any.
    pub provider_id: Option<String>,
    /// Reported `InternalIP` in `status.addresses` (where the gate and
    /// `kubectl confidential verify` find the node's attestation endpoint).
    pub internal_ip: Option<std::net::IpAddr>,
    /// Interval of the Lease and Ready heartbeats.
    pub heartbeat: Duration,
    /// From a pod's deletion to the kubelet finalizing it (its containers
    /// stopping).
    pub pod_termination: Duration,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            labels: BTreeMap::new(),
            kubelet_version: format!("v{}", crate::binaries::KUBERNETES_VERSION),
            provider_id: None,
            internal_ip: None,
            heartbeat: Duration::from_secs(10),
            pod_termination: Duration::from_millis(200),
        }
    }
}

/// A running kubelet stand-in; it stops (heartbeats and pods) when dropped.
pub struct Kubelet {
    /// Client with the node's signed identity (`system:node:<name>`).
    pub client: Client,
    pub cert_pem: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Kubelet {
    /// TLS bootstrap with the token in `bootstrap_kubeconfig` (submits the
    /// kubelet client CSR; `approve` is called with its name, as a CSR
    /// approver would act), then registers the Node `name`, keeps its Lease
    /// and Ready condition fresh and runs its pods. Writes the kubelet's own
    /// kubeconfig into `dir`.
    pub async fn start<F, Fut>(
        name: &str,
        bootstrap_kubeconfig: &Path,
        dir: &Path,
        options: &KubeletOptions,
        approve: F,
    ) -> Result<Self>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let bootstrap = client_from_kubeconfig(bootstrap_kubeconfig).await?;
        let (csr_name, key_pem) = submit_kubelet_csr(&bootstrap, name).await?;
        approve(csr_name.clone()).await?;
        let cert_pem = signed_certificate(&bootstrap, &csr_name).await?;
        let kubeconfig_text = std::fs::read_to_string(bootstrap_kubeconfig)
            .with_context(|| format!("reading {}", bootstrap_kubeconfig.display()))?;
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
        let path = dir.join("kubelet.kubeconfig");
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
        register_node(&client, name, options).await?;
        heartbeat_once(&client, name).await?;
        let tasks = vec![
            tokio::spawn(heartbeats(
                client.clone(),
                name.to_owned(),
                options.heartbeat,
            )),
            tokio::spawn(run_pods(
                client.clone(),
                name.to_owned(),
                options.pod_termination,
            )),
        ];
        Ok(Self {
            client,
            cert_pem,
            tasks,
        })
    }
}

/// Waits until the controller-manager signed the CSR `name`; returns the PEM.
pub async fn signed_certificate(client: &Client, name: &str) -> Result<String> {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let cert = eventually(
        &format!("the certificate of CSR {name}"),
        Duration::from_secs(120),
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

async fn register_node(client: &Client, name: &str, options: &KubeletOptions) -> Result<()> {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut labels = options.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), name.to_owned());
    labels.insert("kubernetes.io/os".into(), "linux".to_owned());
    let mut spec = json!({});
    if let Some(id) = &options.provider_id {
        spec["providerID"] = json!(id);
    }
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": spec,
    }))?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("registering Node {name} with its own credentials"))?;
    let resources = json!({ "cpu": "8", "memory": "32Gi", "pods": "110" });
    let mut addresses = vec![json!({ "type": "Hostname", "address": name })];
    if let Some(ip) = options.internal_ip {
        addresses.push(json!({ "type": "InternalIP", "address": ip.to_string() }));
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "capacity": resources, "allocatable": resources,
                "conditions": [ready_condition(&now)],
                "addresses": addresses,
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

async fn heartbeats(client: Client, name: String, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = heartbeat_once(&client, &name).await {
            tracing::warn!(node = %name, error = %e, "heartbeat failed");
        }
    }
}

/// Runs the pods bound to `node` (watched with the node's own credentials,
/// as the Node authorizer allows): a pod not yet Running becomes Running and
/// Ready; a deleted pod is finalized after `termination`.
async fn run_pods(client: Client, node: String, termination: Duration) {
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let finalizing = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let mut events = watcher(pods, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(pod) => pod,
            Err(err) => {
                tracing::debug!(%node, %err, "watching pods");
                continue;
            }
        };
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        if pod.metadata.deletion_timestamp.is_some() {
            let key = format!("{ns}/{name}");
            let first = finalizing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.clone());
            if first {
                tokio::spawn(finalize(api, name, termination, finalizing.clone(), key));
            }
            continue;
        }
        let running = pod
            .status
            .as_ref()
            .is_some_and(|s| s.phase.as_deref() == Some("Running"));
        if !running && let Err(err) = start_pod(&api, &name).await {
            tracing::debug!(%node, pod = %name, %err, "starting pod");
        }
    }
}

async fn start_pod(api: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
    let now = jiff::Timestamp::now().to_string();
    let patch = json!({ "status": { "phase": "Running", "podIP": "10.0.0.1",
        "startTime": now, "conditions": [
        { "type": "Ready", "status": "True", "lastTransitionTime": now },
        { "type": "ContainersReady", "status": "True", "lastTransitionTime": now },
        { "type": "PodScheduled", "status": "True", "lastTransitionTime": now }] } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(drop)
}

/// The containers stopped: remove the pod object, as the kubelet does.
async fn finalize(
    api: Api<Pod>,
    name: String,
    termination: Duration,
    finalizing: Arc<Mutex<BTreeSet<String>>>,
    key: String,
) {
    tokio::time::sleep(termination).await;
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(err) => tracing::debug!(pod = %name, %err, "finalizing pod"),
    }
    finalizing
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&key);
}
