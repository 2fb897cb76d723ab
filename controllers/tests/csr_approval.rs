//! The kubelet CSR approver on the real control plane: CSRs are submitted
//! with real bootstrap tokens (the API server records `system:bootstrap:<id>`
//! as the requester), the approver decides, and the kube-controller-manager
//! signs what was approved.

use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::keys::{
    ANNOTATION_TOKEN_NODE_NAME, BOOTSTRAP_TOKEN_GROUP, KUBEADM_AUTOAPPROVE_GROUP,
};
use confidential_api::{EvidenceKind, NodeAttestation, NodeAttestationSpec, Verdict};
use confidential_controllers::metrics::Metrics;
use confidential_testenv::csr::{NameAttribute, RawRequest, StringType};
use confidential_testenv::node::signed_certificate;
use confidential_testenv::pki::CertifiedKey;
use confidential_testenv::{
    TestCluster, allow_node_bootstrap, client_from_kubeconfig, client_kubeconfig, eventually,
    install_crds, token_kubeconfig,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

async fn bootstrap_client(
    cluster: &TestCluster,
    dir: &std::path::Path,
    token_id: &str,
    attested_name: Option<&str>,
) -> Result<Client> {
    token_client(cluster, dir, token_id, attested_name, BOOTSTRAP_TOKEN_GROUP).await
}

/// A client authenticating with a new bootstrap token in `group`, recorded
/// (as the gate does) as issued to `attested_name`.
async fn token_client(
    cluster: &TestCluster,
    dir: &std::path::Path,
    token_id: &str,
    attested_name: Option<&str>,
    group: &str,
) -> Result<Client> {
    let secret_part = "0123456789abcdef";
    let mut secret = json!({
        "metadata": { "name": format!("bootstrap-token-{token_id}") },
        "type": "bootstrap.kubernetes.io/token",
        "stringData": { "token-id": token_id, "token-secret": secret_part,
            "usage-bootstrap-authentication": "true",
            "auth-extra-groups": group }
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

/// A well-formed kubelet client request for `node`, as the kubelet makes it.
fn kubelet_request(key: &rcgen::KeyPair, node: &str) -> Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    Ok(params.serialize_request(key)?.pem()?)
}

async fn submit(client: &Client, name: &str, node: &str) -> Result<()> {
    let key = rcgen::KeyPair::generate()?;
    submit_request(client, name, &kubelet_request(&key, node)?).await
}

/// Submits `request` (PEM) to the kubelet client signer with the kubelet's usages.
async fn submit_request(client: &Client, name: &str, request: &str) -> Result<()> {
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.as_bytes().to_vec()),
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
    attest(&admin, "attested-node", Verdict::Trusted).await?;
    attest(&admin, "untrusted-node", Verdict::Revoked).await?;
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

/// Records a NodeAttestation for `name` with `verdict`, valid for an hour.
async fn attest(admin: &Client, name: &str, verdict: Verdict) -> Result<()> {
    let now = jiff::Timestamp::now();
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
    Ok(())
}

/// The CSR `name` is denied with `expected` in its message, and a Warning
/// Event on it says so.
async fn assert_denied(admin: &Client, name: &str, expected: &str) -> Result<()> {
    let (kind, message) = decision(admin, name, false).await?;
    anyhow::ensure!(
        kind == "Denied" && message.contains(expected),
        "{name}: {kind}: {message} (expected a denial saying {expected:?})"
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let fields = format!("involvedObject.name={name}");
    eventually(
        &format!("the denial Event on {name}"),
        Duration::from_secs(30),
        || {
            let (events, fields) = (events.clone(), fields.clone());
            async move {
                let list = events.list(&ListParams::default().fields(&fields)).await?;
                Ok(list
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("KubeletCSRDenied")
                            && e.type_.as_deref() == Some("Warning")
                            && e.message.as_deref().is_some_and(|m| m.contains(expected))
                    })
                    .map(drop))
            }
        },
    )
    .await
}

/// After giving kube-controller-manager time to act, none of `names` was
/// approved or signed.
async fn assert_never_signed(admin: &Client, names: &[&str]) -> Result<()> {
    tokio::time::sleep(Duration::from_secs(15)).await;
    let api: Api<CertificateSigningRequest> = Api::all(admin.clone());
    for name in names {
        let status = api.get(name).await?.status.unwrap_or_default();
        anyhow::ensure!(
            status.certificate.is_none(),
            "{name} was signed although it was denied"
        );
        let approved = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Approved");
        anyhow::ensure!(!approved, "{name} carries an Approved condition");
    }
    Ok(())
}

fn cn(value: &str) -> NameAttribute {
    NameAttribute::common_name(value)
}

fn nodes_org() -> NameAttribute {
    NameAttribute::organization("system:nodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrs_naming_another_node_in_any_shape_are_denied_and_never_signed() -> Result<()> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let admin = client_from_kubeconfig(&cluster.kubeconfig).await?;
    allow_node_bootstrap(&admin).await?;
    // The victim is attested too: the only barrier left is reading the
    // subject the way the signer and the API server do.
    attest(&admin, "attested", Verdict::Trusted).await?;
    attest(&admin, "victim", Verdict::Trusted).await?;
    let dir = tempfile::tempdir()?;
    let token = bootstrap_client(&cluster, dir.path(), "aaaaaa", Some("attested")).await?;
    let approver = tokio::spawn(confidential_controllers::csr::run(
        admin.clone(),
        Metrics::new(),
    ));

    let key = rcgen::KeyPair::generate()?;
    let (attested, victim) = ("system:node:attested", "system:node:victim");
    let two_names = RawRequest::subject(vec![cn(attested), nodes_org(), cn(victim)]).pem(&key)?;
    let shapes = [
        // The reported attack: Go and the signer read the last CN.
        ("two-common-names", two_names.clone(), "2 common names"),
        (
            "multi-valued-rdn",
            RawRequest {
                subject: vec![vec![cn(attested), cn(victim)], vec![nodes_org()]],
                ..Default::default()
            }
            .pem(&key)?,
            "2 common names",
        ),
        (
            "bmpstring-second-cn",
            RawRequest::subject(vec![
                cn(attested),
                nodes_org(),
                cn(victim).as_type(StringType::Bmp),
            ])
            .pem(&key)?,
            "2 common names",
        ),
        (
            "bmpstring-only-cn",
            RawRequest::subject(vec![cn(victim).as_type(StringType::Bmp), nodes_org()])
                .pem(&key)?,
            "issued to attested, not victim",
        ),
        (
            "extra-organization",
            RawRequest::subject(vec![
                cn(attested),
                nodes_org(),
                NameAttribute::organization("system:masters"),
            ])
            .pem(&key)?,
            "organizations",
        ),
        (
            "subject-alt-name",
            RawRequest {
                subject: vec![vec![cn(attested)], vec![nodes_org()]],
                dns_names: vec!["victim".into()],
                ..Default::default()
            }
            .pem(&key)?,
            "subject alternative names",
        ),
    ];
    for (name, request, _) in &shapes {
        submit_request(&token, name, request)
            .await
            .with_context(|| format!("submitting {name}"))?;
    }
    for (name, _, expected) in &shapes {
        assert_denied(&admin, name, expected).await?;
    }

    // The renewal path: the attested node gets its certificate honestly,
    // then asks with it for the victim's name.
    let node_key = rcgen::KeyPair::generate()?;
    submit_request(&token, "honest", &kubelet_request(&node_key, "attested")?).await?;
    let (kind, message) = decision(&admin, "honest", true).await?;
    assert_eq!(kind, "Approved", "{message}");
    let cert_pem = signed_certificate(&admin, "honest").await?;
    let cp = cluster
        .control_plane
        .as_ref()
        .context("private control plane")?;
    let path = dir.path().join("node.kubeconfig");
    std::fs::write(
        &path,
        client_kubeconfig(
            &cp.server,
            &cp.ca_pem,
            "kubelet",
            &CertifiedKey {
                cert_pem,
                key_pem: node_key.serialize_pem(),
            },
        ),
    )?;
    let node = client_from_kubeconfig(&path).await?;
    // The API server's NodeRestriction refuses a node's request whose last
    // CN (the one Go reads) is not its own name...
    let renewal_two_names =
        RawRequest::subject(vec![cn(attested), nodes_org(), cn(victim)]).pem(&node_key)?;
    for (name, request) in [
        ("renewal-other-name", kubelet_request(&node_key, "victim")?),
        ("renewal-two-common-names", renewal_two_names),
    ] {
        let refused = submit_request(&node, name, &request)
            .await
            .expect_err("the API server accepted a node's CSR for another name");
        let refused = format!("{refused:#}");
        assert!(
            refused.contains("can only create a node CSR with CN=system:node:attested"),
            "{name}: {refused}"
        );
    }
    // ... so the shapes that reach the approver on renewal carry the node's
    // own name last: still ambiguous, still denied.
    let renewals = [
        (
            "renewal-victim-first",
            RawRequest::subject(vec![cn(victim), nodes_org(), cn(attested)]).pem(&node_key)?,
            "2 common names",
        ),
        (
            "renewal-extra-organization",
            RawRequest::subject(vec![
                cn(attested),
                nodes_org(),
                NameAttribute::organization("system:masters"),
            ])
            .pem(&node_key)?,
            "organizations",
        ),
    ];
    for (name, request, _) in &renewals {
        submit_request(&node, name, request)
            .await
            .with_context(|| format!("submitting {name}"))?;
    }
    for (name, _, expected) in &renewals {
        assert_denied(&admin, name, expected).await?;
    }

    let denied: Vec<&str> = shapes
        .iter()
        .chain(&renewals)
        .map(|(name, _, _)| *name)
        .collect();
    assert_never_signed(&admin, &denied).await?;
    approver.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeadm_autoapproval_does_not_reach_our_tokens() -> Result<()> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let admin = client_from_kubeconfig(&cluster.kubeconfig).await?;
    allow_node_bootstrap(&admin).await?;
    // What `kubeadm init` creates: its tokens may submit CSRs, and
    // kube-controller-manager auto-approves their node client CSRs.
    for (name, role) in [
        ("kubeadm:kubelet-bootstrap", "system:node-bootstrapper"),
        (
            "kubeadm:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
        ),
    ] {
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
            "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": KUBEADM_AUTOAPPROVE_GROUP }]
        }))?;
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await?;
    }
    attest(&admin, "attested", Verdict::Trusted).await?;
    let dir = tempfile::tempdir()?;
    let kubeadm_token = token_client(
        &cluster,
        dir.path(),
        "kkkkkk",
        None,
        KUBEADM_AUTOAPPROVE_GROUP,
    )
    .await?;
    let ours = bootstrap_client(&cluster, dir.path(), "aaaaaa", Some("attested")).await?;

    // The csrapproving controller runs and honours the binding: a kubeadm
    // token gets a certificate for any name, with no approver of ours.
    submit(&kubeadm_token, "kubeadm-token-any-name", "anyone").await?;
    let (kind, message) = decision(&admin, "kubeadm-token-any-name", true).await?;
    assert_eq!(kind, "Approved", "{message}");

    // A token of ours asking for a name it was not issued for: the
    // controller-manager leaves it alone...
    submit(&ours, "our-token-other-name", "victim").await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pending = Api::<CertificateSigningRequest>::all(admin.clone())
        .get("our-token-other-name")
        .await?
        .status
        .unwrap_or_default();
    assert!(
        pending.conditions.unwrap_or_default().is_empty() && pending.certificate.is_none(),
        "kube-controller-manager decided on our token's CSR"
    );
    // ... and our approver denies it.
    let approver = tokio::spawn(confidential_controllers::csr::run(
        admin.clone(),
        Metrics::new(),
    ));
    assert_denied(
        &admin,
        "our-token-other-name",
        "issued to attested, not victim",
    )
    .await?;
    assert_never_signed(&admin, &["our-token-other-name"]).await?;
    approver.abort();
    Ok(())
}
