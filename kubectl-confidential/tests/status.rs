//! `kubectl confidential status` against a real control plane.

use std::process::Command;

use anyhow::Result;
use confidential_api::{NodeAttestation, NodeVersion, NodeVersionSpec};
use confidential_testenv::{TestCluster, crds_dir, install_crds, unique_name};
use kube::api::{Api, PostParams};

fn plugin(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_pools_as_table_json_and_yaml() -> Result<()> {
    let cluster = TestCluster::start().await?;

    // Without our CRDs the plugin says what to do next and fails.
    let out = plugin(&cluster.kubeconfig, &["status"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kubectl confidential init"), "{stderr}");

    install_crds(&cluster.client, &crds_dir()).await?;
    let name = unique_name("workers");
    let pool = NodeVersion::new(
        &name,
        NodeVersionSpec {
            image: "registry.example/node:v7".into(),
            kubernetes_version: "v1.35.4".into(),
            replicas: 5,
            control_plane: false,
            strategy: Default::default(),
        },
    );
    Api::<NodeVersion>::all(cluster.client.clone())
        .create(&PostParams::default(), &pool)
        .await?;

    let out = plugin(&cluster.kubeconfig, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("managedFields"),
        "managedFields are hidden, as kubectl hides them"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        json["gate"],
        serde_json::json!({}),
        "no webhook configuration: nowhere to call the gate"
    );
    let pools = json["nodeVersions"].as_array().expect("nodeVersions array");
    let ours = pools
        .iter()
        .find(|p| p["metadata"]["name"] == name.as_str())
        .expect("our pool is listed");
    assert_eq!(ours["spec"]["image"], "registry.example/node:v7");

    let out = plugin(
        &cluster.kubeconfig,
        &["status", "-o", "json", "--show-managed-fields"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("managedFields"));

    let out = plugin(&cluster.kubeconfig, &["status", "-o", "yaml"]);
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("registry.example/node:v7"), "{yaml}");

    let out = plugin(&cluster.kubeconfig, &["status"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("not installed (run `kubectl confidential init`)"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&name))
        .expect("table row");
    assert!(
        row.contains("registry.example/node:v7") && row.contains("v1.35.4"),
        "{row}"
    );

    // `kubectl get nodeattestations` shows when an attestation expires (a
    // future time) as a time, not as kubectl's `<invalid>` age.
    let attestation: NodeAttestation = serde_json::from_value(serde_json::json!({
        "metadata": { "name": unique_name("natt") },
        "spec": {
            "nodeName": "node-a", "evidenceKind": "Tpm", "image": "registry.example/node:v7",
            "akFingerprint": "00", "attestedAt": "2026-01-01T00:00:00Z",
            "expiresAt": "2999-01-01T00:00:00Z", "verdict": "Trusted"
        }
    }))?;
    Api::<NodeAttestation>::all(cluster.client.clone())
        .create(&PostParams::default(), &attestation)
        .await?;
    if let Ok(out) = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["get", "nodeattestations"])
        .output()
    {
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            table.contains("EXPIRES") && table.contains("2999-01-01T00:00:00Z"),
            "{table}"
        );
        assert!(!table.contains("<invalid>"), "{table}");
    }

    // A kubeconfig that does not exist is a clear error.
    let out = plugin(std::path::Path::new("/no/such/kubeconfig"), &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kubeconfig"));
    Ok(())
}
