//! The whole system on real components: a real control plane, the gate as a
//! process (admission webhook called by the real API server over TLS, aTLS
//! join endpoint), swtpm-backed nodes joining through the real bootstrapper,
//! the node operator rolling the pool from v1 to v2 by create, cordon, drain,
//! replace. Every node that ends up in the cluster proved its image to the gate.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use confidential_api::{EvidenceKind, NodeAttestation, Verdict};
use confidential_playground::{IMAGE_V1, IMAGE_V2, Options, Playground};
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};

async fn attested_nodes(client: &kube::Client, image: &str) -> Result<BTreeSet<String>> {
    let nodes: BTreeSet<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let attestations = Api::<NodeAttestation>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    for node in &nodes {
        let att = attestations
            .iter()
            .find(|a| &a.spec.node_name == node)
            .unwrap_or_else(|| panic!("node {node} has no NodeAttestation"));
        assert_eq!(att.spec.image, image, "node {node}");
        assert_eq!(att.spec.verdict, Verdict::Trusted);
        assert_eq!(att.spec.evidence_kind, EvidenceKind::Tpm);
        assert_ne!(
            att.spec.ak_fingerprint,
            "00".repeat(32),
            "a real AK signed the quote"
        );
    }
    Ok(nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swtpm_nodes_join_through_the_gate_and_roll_from_v1_to_v2() -> Result<()> {
    if let Err(error) = tracing_subscriber::fmt()
        .with_env_filter(
            "warn,kube_client=off,confidential_playground=info,confidential_controllers=info",
        )
        .with_test_writer()
        .try_init()
    {
        eprintln!("tracing was already set up: {error}");
    }
    let playground = Playground::start(Options {
        nodes: 2,
        max_surge: 1,
        ..Options::default()
    })
    .await?;
    let client = playground.client.clone();

    // The registered gate refuses a Node no machine attested for.
    let intruder: Node =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": "intruder" } }))?;
    let err = Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &intruder)
        .await
        .expect_err("the gate must refuse an unattested node");
    assert!(err.to_string().contains("NodeAttestation"), "{err}");

    playground
        .wait_for_pool(IMAGE_V1, Duration::from_secs(240))
        .await?;
    let v1_nodes = attested_nodes(&client, IMAGE_V1).await?;
    assert_eq!(v1_nodes.len(), 2, "{v1_nodes:?}");
    // Each join token bought one kubelet certificate and was then deleted
    // (the approver deletes it right after approving, so allow it a moment).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    confidential_testenv::eventually(
        "used join tokens to be deleted",
        Duration::from_secs(10),
        || {
            let secrets = secrets.clone();
            async move {
                let left = secrets
                    .list(&ListParams::default())
                    .await?
                    .iter()
                    .filter(|s| s.name_any().starts_with("bootstrap-token-"))
                    .count();
                Ok((left == 0).then_some(()))
            }
        },
    )
    .await?;

    playground.upgrade(IMAGE_V2).await?;
    playground
        .wait_for_pool(IMAGE_V2, Duration::from_secs(480))
        .await?;
    // Donors are deleted after their heirs are Ready; give the last delete a moment.
    let v2_nodes =
        confidential_testenv::eventually("donor nodes to be gone", Duration::from_secs(60), || {
            let client = client.clone();
            async move {
                let nodes = attested_nodes(&client, IMAGE_V2).await;
                Ok(nodes.ok().filter(|n| n.len() == 2))
            }
        })
        .await?;
    assert!(
        v2_nodes.is_disjoint(&v1_nodes),
        "nodes are replaced, never patched: {v1_nodes:?} / {v2_nodes:?}"
    );
    Ok(())
}
