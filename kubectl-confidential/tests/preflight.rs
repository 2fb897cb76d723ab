//! `kubectl confidential status` warns about kube-controller-manager's CSR
//! auto-approval bindings (what `kubeadm init` creates), read from a real
//! API server.

use std::process::Command;

use anyhow::Result;
use confidential_api::keys::KUBEADM_AUTOAPPROVE_GROUP;
use confidential_testenv::{TestCluster, crds_dir, install_crds};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn status(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("status")
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

const BINDING: &str = "kubeadm:node-autoapprove-bootstrap";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_warns_about_kubeadm_csr_autoapproval() -> Result<()> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &crds_dir()).await?;

    // A fresh control plane has no such binding: no warning.
    let out = status(&cluster.kubeconfig, &[]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Warning"), "{stderr}");

    let bindings: Api<ClusterRoleBinding> = Api::all(cluster.client.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": BINDING },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
            "name": "system:certificates.k8s.io:certificatesigningrequests:nodeclient" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
            "name": KUBEADM_AUTOAPPROVE_GROUP }]
    }))?;
    bindings.create(&PostParams::default(), &binding).await?;

    let out = status(&cluster.kubeconfig, &["-o", "json"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = stderr
        .lines()
        .find(|l| l.starts_with(&format!("Warning: ClusterRoleBinding {BINDING} ")))
        .unwrap_or_else(|| panic!("no warning about {BINDING}: {stderr}"));
    assert!(warning.contains("ANY node name"), "{warning}");
    assert!(
        warning.contains(&format!("kubectl delete clusterrolebinding {BINDING}")),
        "{warning}"
    );
    // The warning stays off stdout: JSON output still parses.
    serde_json::from_slice::<serde_json::Value>(&out.stdout)?;

    // After the fix, the warning is gone.
    bindings.delete(BINDING, &DeleteParams::default()).await?;
    let out = status(&cluster.kubeconfig, &[]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(BINDING), "{stderr}");
    Ok(())
}
