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

async fn allowed(
    client: &kube::Client,
    account: &str,
    verb: &str,
    resource: &str,
    sub: Option<&str>,
) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:confidential-system:{account}"
            )),
            groups: Some(vec!["system:serviceaccounts".into()]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                subresource: sub.map(Into::into),
                namespace: Some("default".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
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
