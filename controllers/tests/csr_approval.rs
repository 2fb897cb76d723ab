//! The kubelet CSR approver on the real control plane: CSRs are submitted
//! with real bootstrap tokens (the API server records `system:bootstrap:<id>`
//! as the requester), the approver decides, and the kube-controller-manager
//! signs what was approved.

use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::keys::ANNOTATION_TOKEN_NODE_NAME;
use confidential_api::{EvidenceKind, NodeAttestation, NodeAttestationSpec, Verdict};
use confidential_controllers::metrics::Metrics;
use confidential_testenv::{
    TestCluster, client_from_kubeconfig, eventually, install_crds, token_kubeconfig,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

async fn bootstrap_client(
    cluster: &TestCluster,
    dir: &std::path::Path,
    token_id: &str,
    attested_name: Option<&str>,
) -> Result<Client> {
    let secret_part = "0123456789abcdef";
    let mut secret = json!({
        "metadata": { "name": format!("bootstrap-token-{token_id}") },
        "type": "bootstrap.kubernetes.io/token",
        "stringData": { "token-id": token_id, "token-secret": secret_part,
            "usage-bootstrap-authentication": "true",
            "auth-extra-groups": "system:bootstrappers:confidential:attested-node" }
    });
    if let Some(name) = attested_name {
        secret["metadata"]["annotations"] = json!({ ANNOTATION_TOKEN_NODE_NAME: name });
    }
    Api::<Secret>::namespaced(cluster.client.clone(), "kube-system")
        .create(&PostParams::default(), &serde_json::from_value(secret)?)
        .await?;
    let cp = cluster
        .control_plane
        .as_ref()
        .context("private control plane")?;
    let path = dir.join(format!("{token_id}.kubeconfig"));
    std::fs::write(
        &path,
        token_kubeconfig(
            &cp.server,
            &cp.ca_pem,
            "bootstrap",
            &format!("{token_id}.{secret_part}"),
        ),
    )?;
    client_from_kubeconfig(&path).await
}

async fn submit(client: &Client, name: &str, node: &str) -> Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(params.serialize_request(&key)?.pem()?.into_bytes()),
            signer_name: "kubernetes.io/kube-apiserver-client-kubelet".into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    Api::<CertificateSigningRequest>::all(client.clone())
        .create(&PostParams::default(), &csr)
        .await?;
    Ok(())
}

/// Waits for a decision; returns (type, message, signed).
async fn decision(client: &Client, name: &str, signed: bool) -> Result<(String, String)> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    eventually(
        &format!("decision on {name}"),
        Duration::from_secs(60),
        || async {
            let csr = api.get(name).await?;
            let status = csr.status.unwrap_or_default();
            let found = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Approved" || c.type_ == "Denied");
            let done =
                found.filter(|c| !signed || c.type_ != "Approved" || status.certificate.is_some());
            Ok(done.map(|c| (c.type_, c.message.unwrap_or_default())))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_csrs_are_approved_only_for_the_node_attested_for_the_token() -> Result<()> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let admin = client_from_kubeconfig(&cluster.kubeconfig).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "confidential-test-bootstrappers" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node-bootstrapper" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:bootstrappers" }]
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let now = jiff::Timestamp::now();
    for (name, verdict) in [
        ("attested-node", Verdict::Trusted),
        ("untrusted-node", Verdict::Untrusted),
    ] {
        Api::<NodeAttestation>::all(admin.clone())
            .create(
                &PostParams::default(),
                &NodeAttestation::new(
                    name,
                    NodeAttestationSpec {
                        node_name: name.into(),
                        evidence_kind: EvidenceKind::Tpm,
                        image: "node:v1".into(),
                        pool: None,
                        measurements: Default::default(),
                        ak_fingerprint: "ab".repeat(32),
                        disk_uuid: None,
                        attestation_endpoint: None,
                        attested_at: Time(now),
                        expires_at: Time(now + jiff::SignedDuration::from_hours(1)),
                        verdict,
                        warnings: vec![],
                    },
                ),
            )
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let issued = bootstrap_client(&cluster, dir.path(), "aaaaaa", Some("attested-node")).await?;
    let foreign = bootstrap_client(&cluster, dir.path(), "bbbbbb", None).await?;
    let untrusted =
        bootstrap_client(&cluster, dir.path(), "cccccc", Some("untrusted-node")).await?;
    let approver = tokio::spawn(confidential_controllers::csr::run(
        admin.clone(),
        Metrics::new(),
    ));

    // A CSR for another name with the issued token is denied; the token
    // stays valid for its own node.
    submit(&issued, "stolen-name", "someone-else").await?;
    submit(&foreign, "unissued-token", "attested-node").await?;
    submit(&untrusted, "untrusted", "untrusted-node").await?;
    let (kind, message) = decision(&admin, "stolen-name", false).await?;
    assert_eq!(kind, "Denied");
    assert!(
        message.contains("issued to attested-node, not someone-else"),
        "{message}"
    );

    submit(&issued, "good", "attested-node").await?;
    let (kind, message) = decision(&admin, "good", true).await?;
    assert_eq!(kind, "Approved", "{message}");
    // The token bought its one certificate: it is deleted and no longer
    // authenticates.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), "kube-system");
    eventually(
        "the used token to be deleted",
        Duration::from_secs(30),
        || {
            let secrets = secrets.clone();
            async move {
                Ok(secrets
                    .get_opt("bootstrap-token-aaaaaa")
                    .await?
                    .is_none()
                    .then_some(()))
            }
        },
    )
    .await?;
    let mut attempt = 0;
    let reused = eventually(
        "the used token to stop authenticating",
        Duration::from_secs(30),
        || {
            attempt += 1;
            let (issued, name) = (issued.clone(), format!("reused-{attempt}"));
            async move {
                match submit(&issued, &name, "attested-node").await {
                    Ok(()) => Ok(None),
                    Err(err) => Ok(Some(err.to_string())),
                }
            }
        },
    )
    .await?;
    assert!(
        reused.contains("Unauthorized") || reused.contains("401"),
        "{reused}"
    );
    let (kind, message) = decision(&admin, "unissued-token", false).await?;
    assert_eq!(kind, "Denied");
    assert!(
        message.contains("not issued to an attested node"),
        "{message}"
    );
    let (kind, message) = decision(&admin, "untrusted", false).await?;
    assert_eq!(kind, "Denied");
    assert!(message.contains("no valid attestation"), "{message}");
    // Denied requests get no certificate.
    let csr = Api::<CertificateSigningRequest>::all(admin.clone())
        .get("stolen-name")
        .await?;
    assert!(csr.status.and_then(|s| s.certificate).is_none());
    approver.abort();
    Ok(())
}
