//! The webhook registered with a real kube-apiserver, which calls it over TLS:
//! every assertion here goes through ordinary API calls, and every refusal
//! checks that nothing was created or changed.

mod support;
#[path = "admission/workloads.rs"]
mod workloads;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL};
use confidential_api::{
    AttestationPolicy, EvidenceKind, ImagePolicy, ImagePolicySpec, NodeAttestation,
    NodeAttestationSpec, NodeVersion, NodeVersionSpec, PolicyMode, Verdict,
};
use confidential_testenv::node::{heartbeat_once, signed_certificate, submit_kubelet_csr};
use confidential_testenv::pki::CertifiedKey;
use confidential_testenv::{client_kubeconfig, eventually, unique_name};
use confidential_webhook::validate::node::image_label_value;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use support::*;

fn attestation(node: &str, expires_in: jiff::SignedDuration) -> NodeAttestation {
    let now = jiff::Timestamp::now();
    NodeAttestation::new(
        node,
        NodeAttestationSpec {
            node_name: node.to_owned(),
            evidence_kind: EvidenceKind::Tpm,
            image: TRUSTED_IMAGE.to_owned(),
            pool: Some("workers".to_owned()),
            measurements: [("4".to_owned(), PCR4.to_owned())].into(),
            ak_fingerprint: "ab".repeat(32),
            disk_uuid: None,
            attestation_endpoint: None,
            attested_at: Time(now),
            expires_at: Time(now + expires_in),
            verdict: Verdict::Trusted,
            warnings: vec![],
        },
    )
}

/// A Node labelled with `image_label` (the label-safe form of its image) and
/// pool `workers`.
fn node_labelled(name: &str, image_label: &str) -> Node {
    let mut node = Node::default();
    node.metadata.name = Some(name.to_owned());
    node.metadata.labels = Some(BTreeMap::from([
        (LABEL_NODE_IMAGE.to_owned(), image_label.to_owned()),
        (LABEL_NODE_POOL.to_owned(), "workers".to_owned()),
    ]));
    node
}

/// A Node whose identity labels match its attestation.
fn attested_node(name: &str) -> Node {
    node_labelled(name, &image_label_value(TRUSTED_IMAGE))
}

async fn create_attestation(env: &Env, att: &NodeAttestation) -> Result<()> {
    let api: Api<NodeAttestation> = Api::all(env.client.clone());
    let created = api.create(&PostParams::default(), att).await?;
    let (name, rv) = (
        created.meta().name.clone(),
        created.meta().resource_version.clone(),
    );
    env.wait_cached("NodeAttestation cached", |w| {
        w.stores
            .attestations
            .state()
            .iter()
            .any(|a| a.meta().name == name && a.meta().resource_version == rv)
    })
    .await
}

async fn namespace_with_policy(env: &Env, mode: PolicyMode) -> Result<String> {
    let ns = unique_name("apps");
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;
    let mut spec = ImagePolicySpec {
        mode,
        allowed_digests: vec![NGINX_DIGEST.to_owned()],
        allowed_repositories: vec!["ghcr.io/acme/*".to_owned()],
        namespaces: vec![ns.clone()],
        exempt_namespaces: vec!["kube-system".to_owned()],
        ..Default::default()
    };
    spec.tag_digests
        .insert("nginx:latest".to_owned(), NGINX_DIGEST.to_owned());
    let policies: Api<ImagePolicy> = Api::all(env.client.clone());
    let created = policies
        .create(&PostParams::default(), &ImagePolicy::new(&ns, spec))
        .await?;
    let rv = created.meta().resource_version.clone();
    env.wait_cached("ImagePolicy cached", |w| {
        w.stores
            .image_policies
            .state()
            .iter()
            .any(|p| p.meta().resource_version == rv)
    })
    .await?;
    Ok(ns)
}

fn deployment(name: &str, image: &str) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": image}]}
            }
        }
    }))?)
}

async fn assert_absent<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let found = api.get_opt(name).await?;
    anyhow::ensure!(
        found.is_none(),
        "{name} exists although it was refused: {found:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattested_node_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let name = unique_name("unattested");
    let message = denial(
        nodes
            .create(&PostParams::default(), &attested_node(&name))
            .await,
    );
    assert!(message.contains("nodes.confidential.dev"), "{message}");
    assert!(
        message.contains(&format!("node {name} has no NodeAttestation")),
        "{message}"
    );
    assert_absent(&nodes, &name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_node_is_admitted() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("attested");
    create_attestation(
        &env,
        &attestation(&name, jiff::SignedDuration::from_hours(1)),
    )
    .await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let created = nodes
        .create(&PostParams::default(), &attested_node(&name))
        .await?;
    assert_eq!(created.metadata.name.as_deref(), Some(name.as_str()));
    // A label the attestation contradicts is refused on another node.
    let other = unique_name("attested");
    create_attestation(
        &env,
        &attestation(&other, jiff::SignedDuration::from_hours(1)),
    )
    .await?;
    let wrong = node_labelled(&other, "ghcr.io_evil_node-image_v1");
    let message = denial(nodes.create(&PostParams::default(), &wrong).await);
    assert!(message.contains(LABEL_NODE_IMAGE), "{message}");
    assert_absent(&nodes, &other).await
}

/// A client with a node's own credentials (`system:node:<name>` in
/// `system:nodes`), its certificate signed by kube-controller-manager.
async fn node_credentials(env: &Env, name: &str) -> Result<Client> {
    let (csr, key_pem) = submit_kubelet_csr(&env.client, name).await?;
    Api::<CertificateSigningRequest>::all(env.client.clone())
        .patch_approval(
            &csr,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "Approved", "status": "True", "reason": "ApprovedByTest",
                "message": "the test stands in for the CSR approver"}]}})),
        )
        .await?;
    let cert_pem = signed_certificate(&env.client, &csr).await?;
    let cp = env
        .cluster
        .control_plane
        .as_ref()
        .context("a private control plane")?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kubelet.kubeconfig");
    std::fs::write(
        &path,
        client_kubeconfig(
            &cp.server,
            &cp.ca_pem,
            "kubelet",
            &CertifiedKey { cert_pem, key_pem },
        ),
    )?;
    confidential_testenv::client_from_kubeconfig(&path).await
}

fn ready_status(node: &Node) -> Option<(String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_node_loses_its_heartbeats_goes_not_ready_and_admins_can_cordon_it() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("expiring");
    create_attestation(
        &env,
        &attestation(&name, jiff::SignedDuration::from_hours(1)),
    )
    .await?;
    // The node registers and heartbeats with its own credentials.
    let kubelet = node_credentials(&env, &name).await?;
    let own_nodes: Api<Node> = Api::all(kubelet.clone());
    own_nodes
        .create(&PostParams::default(), &attested_node(&name))
        .await?;
    heartbeat_once(&kubelet, &name).await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "kube-node-lease");
    assert_eq!(
        ready_status(&nodes.get(&name).await?)
            .map(|(s, _)| s)
            .as_deref(),
        Some("True")
    );

    // The attestation expires.
    let atts: Api<NodeAttestation> = Api::all(env.client.clone());
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(5);
    let patched = atts
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"expiresAt": Time(past)}})),
        )
        .await?;
    let rv = patched.metadata.resource_version.clone();
    env.wait_cached("expired attestation cached", |w| {
        w.stores
            .attestations
            .state()
            .iter()
            .any(|a| a.metadata.resource_version == rv)
    })
    .await?;

    // The kubelet's Lease renewal and status update are refused; nothing
    // of them is stored.
    let renewed_before = leases.get(&name).await?.spec.and_then(|s| s.renew_time);
    let refused = heartbeat_once(&kubelet, &name)
        .await
        .expect_err("the expired node's heartbeat went through");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("leases.confidential.dev")
            && refused.contains("expired")
            && refused.contains("NotReady"),
        "{refused}"
    );
    let status = Patch::Merge(
        json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok"}]}}),
    );
    let message = denial(
        own_nodes
            .patch_status(&name, &PatchParams::default(), &status)
            .await,
    );
    assert!(message.contains("expired"), "{message}");
    let message = denial(
        own_nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"team": "kubelet"}}})),
            )
            .await,
    );
    assert!(message.contains("re-attest"), "{message}");
    assert_eq!(
        leases.get(&name).await?.spec.and_then(|s| s.renew_time),
        renewed_before,
        "the refused Lease renewal was stored"
    );

    // An admin cordons and labels it; identity labels stay fixed.
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"unschedulable": true}, "metadata": {"labels": {"team": "a"}}}),
            ),
        )
        .await?;
    let node = nodes.get(&name).await?;
    assert_eq!(node.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
    assert_eq!(node.labels().get("team").map(String::as_str), Some("a"));
    let message = denial(
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {LABEL_NODE_POOL: "control-plane"}}})),
            )
            .await,
    );
    assert!(
        message.contains("fixed by the node's attestation"),
        "{message}"
    );

    // The kubelet keeps trying; kube-controller-manager's node-lifecycle
    // controller marks the node Unknown and taints it unreachable.
    let retrying = tokio::spawn({
        let (kubelet, name) = (kubelet.clone(), name.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if heartbeat_once(&kubelet, &name).await.is_ok() {
                    return;
                }
            }
        }
    });
    let (ready, reason) = eventually(
        "kube-controller-manager marks the node not Ready",
        Duration::from_secs(300),
        || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move { Ok(ready_status(&nodes.get(&name).await?).filter(|(s, _)| s != "True")) }
        },
    )
    .await?;
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("Unknown", "NodeStatusUnknown")
    );
    eventually(
        "kube-controller-manager taints the node unreachable",
        Duration::from_secs(120),
        || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                let node = nodes.get(&name).await?;
                Ok(node
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .iter()
                    .any(|t| t.key == "node.kubernetes.io/unreachable")
                    .then_some(()))
            }
        },
    )
    .await?;
    assert!(
        !retrying.is_finished(),
        "a heartbeat of the expired node went through"
    );
    retrying.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_identity_labels_cannot_change() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("identity");
    create_attestation(
        &env,
        &attestation(&name, jiff::SignedDuration::from_hours(1)),
    )
    .await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    nodes
        .create(&PostParams::default(), &attested_node(&name))
        .await?;
    let patch = Patch::Merge(json!({"metadata": {"labels": {LABEL_NODE_POOL: "control-plane"}}}));
    let message = denial(nodes.patch(&name, &PatchParams::default(), &patch).await);
    assert!(
        message.contains("fixed by the node's attestation"),
        "{message}"
    );
    assert_eq!(
        nodes
            .get(&name)
            .await?
            .labels()
            .get(LABEL_NODE_POOL)
            .map(String::as_str),
        Some("workers")
    );
    Ok(())
}

fn node_version(name: &str, image: &str) -> NodeVersion {
    NodeVersion::new(
        name,
        NodeVersionSpec {
            image: image.to_owned(),
            kubernetes_version: "v1.35.0".to_owned(),
            replicas: 3,
            control_plane: false,
            strategy: Default::default(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_version_to_unsigned_image_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let versions: Api<NodeVersion> = Api::all(env.client.clone());
    let name = unique_name("pool");
    let unsigned = "ghcr.io/acme/node-image:v6.6.6";
    let message = denial(
        versions
            .create(&PostParams::default(), &node_version(&name, unsigned))
            .await,
    );
    assert!(
        message.contains(unsigned) && message.contains("no measurements"),
        "{message}"
    );
    assert_absent(&versions, &name).await?;
    // Listed, but signed by a key that is not the publisher's.
    let policies: Api<AttestationPolicy> = Api::all(env.client.clone());
    let forged_image = "ghcr.io/acme/node-image:v7.0.0";
    let mut forged = attestation_policy(&unique_name("forged"))?;
    let wrong_key = p256::ecdsa::SigningKey::from_bytes(&[9u8; 32].into())?;
    forged.spec.images = vec![signed_entry(forged_image, &wrong_key)?];
    let created = policies.create(&PostParams::default(), &forged).await?;
    let rv = created.metadata.resource_version.clone();
    env.wait_cached("forged policy cached", |w| {
        w.stores
            .attestation_policies
            .state()
            .iter()
            .any(|p| p.metadata.resource_version == rv)
    })
    .await?;
    let message = denial(
        versions
            .create(&PostParams::default(), &node_version(&name, forged_image))
            .await,
    );
    assert!(
        message.contains("not signed by a trusted publisher"),
        "{message}"
    );
    assert_absent(&versions, &name).await?;
    // The signed image is admitted.
    versions
        .create(&PostParams::default(), &node_version(&name, TRUSTED_IMAGE))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_attestation_policy_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let policies: Api<AttestationPolicy> = Api::all(env.client.clone());
    let name = unique_name("typo");
    let mut policy = attestation_policy(&name)?;
    let m = policy.spec.images[0]
        .measurements
        .remove("4")
        .context("pcr 4")?;
    policy.spec.images[0].measurements.insert("42".into(), m);
    let message = denial(policies.create(&PostParams::default(), &policy).await);
    assert!(message.contains("42"), "{message}");
    assert_absent(&policies, &name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_with_tag_only_image_is_refused_with_pin() -> Result<()> {
    let env = Env::start().await?;
    let ns = namespace_with_policy(&env, PolicyMode::Enforce).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let message = denial(
        deployments
            .create(&PostParams::default(), &deployment("web", "nginx:latest")?)
            .await,
    );
    assert!(
        message.contains(&format!("pin it as nginx@{NGINX_DIGEST}")),
        "{message}"
    );
    assert_absent(&deployments, "web").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pinned_to_allowed_digest_is_admitted() -> Result<()> {
    let env = Env::start().await?;
    let ns = namespace_with_policy(&env, PolicyMode::Enforce).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let image = format!("nginx@{NGINX_DIGEST}");
    deployments
        .create(&PostParams::default(), &deployment("web", &image)?)
        .await?;
    // The controllers' ReplicaSet and Pod pass the webhook too.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    eventually(
        "the Deployment's pod is created",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels("app=web")).await?;
                Ok((!list.items.is_empty()).then_some(()))
            }
        },
    )
    .await?;
    // A pod with an unpinned image in the same namespace is refused.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "loose"},
        "spec": {"containers": [{"name": "c", "image": "ghcr.io/acme/app:v1"}]}
    }))?;
    let message = denial(pods.create(&PostParams::default(), &pod).await);
    assert!(message.contains("not pinned by digest"), "{message}");
    assert_absent(&pods, "loose").await
}

async fn create_with_warnings(
    client: &Client,
    ns: &str,
    body: &Deployment,
) -> Result<(u16, Vec<String>)> {
    let request = http::Request::post(format!("/apis/apps/v1/namespaces/{ns}/deployments"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body)?.into())?;
    let response = client.send(request).await?;
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    Ok((response.status().as_u16(), warnings))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_mode_admits_with_a_warning_the_client_sees() -> Result<()> {
    let env = Env::start().await?;
    let ns = namespace_with_policy(&env, PolicyMode::Warn).await?;
    let (status, warnings) =
        create_with_warnings(&env.client, &ns, &deployment("web", "nginx:latest")?).await?;
    assert_eq!(status, 201, "warnings: {warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not pinned by digest") && w.contains(NGINX_DIGEST)),
        "{warnings:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    assert!(deployments.get_opt("web").await?.is_some());
    Ok(())
}

async fn served_certificate(addr: std::net::SocketAddr, ca_pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let (_, session) = tls.get_ref();
    let chain = session.peer_certificates().context("no peer certificate")?;
    Ok(chain.first().context("empty chain")?.to_vec())
}

fn der_of(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_during_a_stream_of_requests_loses_none() -> Result<()> {
    let env = Env::start().await?;
    let ns = namespace_with_policy(&env, PolicyMode::Enforce).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "stream-"},
        "spec": {"containers": [{"name": "c", "image": format!("nginx@{NGINX_DIGEST}")}]}
    }))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut streams = Vec::new();
    for _ in 0..4 {
        let (pods, pod, stop) = (pods.clone(), pod.clone(), stop.clone());
        streams.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match pods
                    .create(
                        &PostParams {
                            dry_run: true,
                            ..Default::default()
                        },
                        &pod,
                    )
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let before = served_certificate(env.running.addr, &env.ca.cert.cert_pem).await?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let pair = serving_pair(&env.ca)?;
        env.volume.write(&pair)?;
        let expected = der_of(&pair.cert_pem)?;
        let addr = env.running.addr;
        let ca = env.ca.cert.cert_pem.clone();
        eventually("new certificate served", Duration::from_secs(10), || {
            let (expected, ca) = (expected.clone(), ca.clone());
            async move { Ok((served_certificate(addr, &ca).await? == expected).then_some(())) }
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for stream in streams {
        let (o, f) = stream.await?;
        ok += o;
        failed.extend(f);
    }
    eprintln!("{ok} requests admitted across 3 certificate rotations");
    let after = served_certificate(env.running.addr, &env.ca.cert.cert_pem).await?;
    assert_ne!(before, after, "the certificate was never rotated");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 20, "only {ok} requests went through");
    // The webhook saw them (dry-run creates are reviewed).
    let metrics = env.webhook.metrics.render();
    assert!(metrics.contains("kind=\"Pod\""), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_endpoint_pins_known_tags_and_validation_admits_them() -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let env = Env::start().await?;
    let ns = namespace_with_policy(&env, PolicyMode::Enforce).await?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/webhook/pin-tags/mutatingwebhookconfiguration.yaml");
    let mut config: MutatingWebhookConfiguration =
        serde_saphyr::from_str(&std::fs::read_to_string(&path)?)?;
    let url = env.url.replace("/validate", "/mutate");
    for w in config.webhooks.iter_mut().flatten() {
        w.client_config.service = None;
        w.client_config.url = Some(url.clone());
        w.client_config.ca_bundle = Some(k8s_openapi::ByteString(
            env.ca.cert.cert_pem.clone().into_bytes(),
        ));
    }
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(&PostParams::default(), &config)
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    // Until the API server uses the new configuration the tag is refused.
    eventually("mutating webhook active", Duration::from_secs(30), || {
        let deployments = deployments.clone();
        async move {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            Ok(deployments
                .create(&dry, &deployment("probe", "nginx:latest")?)
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;
    let created = deployments
        .create(&PostParams::default(), &deployment("web", "nginx:latest")?)
        .await?;
    let image = created
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.image);
    assert_eq!(image, Some(format!("nginx:latest@{NGINX_DIGEST}")));
    // A tag the policy does not map is still refused by the validating webhook.
    let message = denial(
        deployments
            .create(&PostParams::default(), &deployment("other", "nginx:1.27")?)
            .await,
    );
    assert!(message.contains("not pinned by digest"), "{message}");
    assert_absent(&deployments, "other").await
}
