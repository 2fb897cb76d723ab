//! The install manifests (`kubectl apply -k manifests/`) against a real API
//! server: everything applies, the RBAC grants what the components need and
//! not more (pods are never deleted, only evicted), and the registered webhook
//! fails closed while the control plane's own namespace stays admissible.

use std::process::Command;

use anyhow::{Context, Result, bail};
use confidential_testenv::TestCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(confidential_testenv::binaries::kubectl()?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running the test environment's kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the API server's authorizer lets `user` in `groups` do what
/// `attributes` name.
async fn authorized(
    client: &kube::Client,
    user: &str,
    groups: &[&str],
    attributes: ResourceAttributes,
) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
            resource_attributes: Some(attributes),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// What a service account of the install may do in `default`.
async fn allowed(
    client: &kube::Client,
    account: &str,
    verb: &str,
    resource: &str,
    sub: Option<&str>,
) -> Result<bool> {
    let user = format!("system:serviceaccount:confidential-system:{account}");
    let attributes = ResourceAttributes {
        verb: Some(verb.into()),
        resource: Some(resource.into()),
        subresource: sub.map(Into::into),
        namespace: Some("default".into()),
        ..Default::default()
    };
    authorized(client, &user, &["system:serviceaccounts"], attributes).await
}

/// What a join token the gate issued may do: the groups the API server gives
/// a bootstrap token with our auth-extra-groups. `resource` is `plural` or
/// `plural.group`.
async fn join_token_allowed(
    client: &kube::Client,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> Result<bool> {
    authorized(
        client,
        "system:bootstrap:abcdef",
        &[
            "system:bootstrappers",
            "system:bootstrappers:confidential:attested-node",
            "system:authenticated",
        ],
        ResourceAttributes {
            verb: Some(verb.into()),
            resource: Some(
                resource
                    .split_once('.')
                    .map_or(resource, |(plural, _)| plural)
                    .into(),
            ),
            group: resource.split_once('.').map(|(_, group)| group.into()),
            namespace: Some(namespace.into()),
            name: name.map(Into::into),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_manifests_apply_with_least_privilege_and_fail_closed() -> Result<()> {
    if std::env::var_os(confidential_testenv::EXISTING_CLUSTER_ENV).is_some() {
        eprintln!("skipped against an existing cluster: it installs a fail-closed webhook");
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let client = &cluster.client;
    let manifests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    kubectl(
        &cluster.kubeconfig,
        &[
            "apply",
            "--server-side",
            "-k",
            manifests.to_str().context("path")?,
        ],
    )?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "confidential-system");
    for name in ["confidential-webhook", "confidential-controllers"] {
        let d = deployments.get(name).await?;
        let image = d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers.first().and_then(|c| c.image.clone()))
            .unwrap_or_default();
        assert!(
            image.starts_with("ghcr.io/kubectl-confidential/"),
            "{name}: {image}"
        );
    }

    // The operator drains through evictions only.
    assert!(
        allowed(
            client,
            "confidential-controllers",
            "create",
            "pods",
            Some("eviction")
        )
        .await?
    );
    assert!(!allowed(client, "confidential-controllers", "delete", "pods", None).await?);
    assert!(allowed(client, "confidential-controllers", "patch", "nodes", None).await?);
    // The gate reads nodes but never changes them.
    assert!(!allowed(client, "confidential-webhook", "update", "nodes", None).await?);
    assert!(!allowed(client, "confidential-webhook", "delete", "pods", Some("")).await?);

    // A join token submits its CSR and makes exactly kubeadm join's reads:
    // two ConfigMaps by name and Nodes; nothing else.
    assert!(
        join_token_allowed(
            client,
            "create",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            None
        )
        .await?
    );
    for config in ["kubeadm-config", "kubelet-config"] {
        assert!(
            join_token_allowed(client, "get", "configmaps", "kube-system", Some(config)).await?,
            "{config}"
        );
    }
    assert!(join_token_allowed(client, "get", "nodes", "", Some("any-node")).await?);
    for (verb, resource, namespace, name) in [
        ("get", "configmaps", "kube-system", Some("coredns")),
        ("list", "configmaps", "kube-system", None),
        ("get", "configmaps", "default", Some("kubeadm-config")),
        (
            "update",
            "configmaps",
            "kube-system",
            Some("kubeadm-config"),
        ),
        ("get", "secrets", "kube-system", None),
        ("list", "nodes", "", None),
        ("update", "nodes", "", Some("any-node")),
        ("create", "nodes", "", None),
        (
            "update",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            None,
        ),
        ("create", "nodeattestations.confidential.dev", "", None),
    ] {
        assert!(
            !join_token_allowed(client, verb, resource, namespace, name).await?,
            "a join token may {verb} {resource} {namespace}/{name:?}"
        );
    }

    // No gate is running: covered objects are refused (fail closed) ...
    let pod = |ns: &str| -> Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": { "name": "probe", "namespace": ns },
            "spec": { "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10" }] }
        }))?)
    };
    let err = Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod("default")?)
        .await
        .expect_err("an unreachable gate must refuse covered pods");
    assert!(err.to_string().contains("confidential.dev"), "{err}");
    assert!(
        Api::<Pod>::namespaced(client.clone(), "default")
            .get_opt("probe")
            .await?
            .is_none(),
        "a refused pod was stored"
    );
    // ... while kube-system stays admissible.
    Api::<Pod>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &pod("kube-system")?)
        .await?;
    Ok(())
}
