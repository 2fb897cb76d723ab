//! `kubectl confidential upgrade` against a real control plane: refusals
//! change nothing; an accepted upgrade changes the pool; `--wait` follows the
//! status the operator writes and reports a blocked rollout as a failure.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use anyhow::Result;
use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, EvidenceKind, MeasuredImage, Measurement,
    NodeVersion, NodeVersionSpec,
};
use confidential_testenv::{TestCluster, crds_dir, install_crds, unique_name};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn plugin(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn setup(cluster: &TestCluster) -> Result<(String, String)> {
    install_crds(&cluster.client, &crds_dir()).await?;
    let pool = unique_name("pool");
    let policy = unique_name("policy");
    Api::<NodeVersion>::all(cluster.client.clone())
        .create(
            &PostParams::default(),
            &NodeVersion::new(
                &pool,
                NodeVersionSpec {
                    image: "registry.example/node:v1".into(),
                    kubernetes_version: "v1.35.4".into(),
                    replicas: 3,
                    control_plane: false,
                    strategy: Default::default(),
                },
            ),
        )
        .await?;
    let measured = MeasuredImage {
        image: "registry.example/node:v2".into(),
        measurements: BTreeMap::from([(
            "4".to_owned(),
            Measurement {
                expected: "00".repeat(32),
                warn_only: false,
            },
        )]),
        snp: None,
        publisher: "acme".into(),
        signature: "c2ln".into(),
    };
    Api::<AttestationPolicy>::all(cluster.client.clone())
        .create(
            &PostParams::default(),
            &AttestationPolicy::new(
                &policy,
                AttestationPolicySpec {
                    evidence_kinds: vec![EvidenceKind::Tpm],
                    images: vec![measured],
                    ..Default::default()
                },
            ),
        )
        .await?;
    Ok((pool, policy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refuses_bad_requests_and_changes_nothing() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let (pool, policy) = setup(&cluster).await?;
    let kc = &cluster.kubeconfig;
    let pools: Api<NodeVersion> = Api::all(cluster.client.clone());

    let out = plugin(kc, &["upgrade", "--pool", &pool, "--policy", &policy]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to upgrade"),
        "{}",
        stderr(&out)
    );

    let out = plugin(
        kc,
        &[
            "upgrade",
            "--pool",
            "no-such-pool",
            "--image",
            "registry.example/node:v2",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--pool"), "{}", stderr(&out));

    let out = plugin(
        kc,
        &[
            "upgrade",
            "--pool",
            &pool,
            "--policy",
            &policy,
            "--image",
            "registry.example/node:v3",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no measurements"), "{}", stderr(&out));

    let unchanged = pools.get(&pool).await?;
    assert_eq!(unchanged.spec.image, "registry.example/node:v1");
    assert_eq!(unchanged.metadata.generation, Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_waits_for_the_rollout_and_reports_a_block() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let (pool, policy) = setup(&cluster).await?;
    let pools: Api<NodeVersion> = Api::all(cluster.client.clone());

    // Play the operator: once the new generation appears, report the pool done.
    let operator = {
        let pools = pools.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                let nv = pools.get(&pool).await?;
                if nv.spec.image.ends_with(":v2") {
                    let status = json!({ "status": {
                        "upToDateCount": 3, "outdatedCount": 0, "observedGeneration": nv.metadata.generation,
                        "conditions": [{ "type": "RolloutProgressing", "status": "False", "reason": "Done",
                                          "message": "all nodes up to date", "lastTransitionTime": "2026-01-01T00:00:00Z" }]
                    }});
                    pools
                        .patch_status(&pool, &PatchParams::default(), &Patch::Merge(status))
                        .await?;
                    return anyhow::Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    };
    let kc = cluster.kubeconfig.clone();
    let args = [
        "upgrade",
        "--pool",
        &pool,
        "--policy",
        &policy,
        "--image",
        "registry.example/node:v2",
        "--wait",
    ]
    .map(str::to_owned);
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        plugin(&kc, &args)
    })
    .await?;
    operator.await??;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("3/3 up to date"), "{}", stderr(&out));
    assert_eq!(
        pools.get(&pool).await?.spec.image,
        "registry.example/node:v2"
    );

    // A blocked rollout makes --wait fail with the operator's reason.
    let nv = pools.get(&pool).await?;
    let blocked = json!({ "status": {
        "upToDateCount": 1, "outdatedCount": 2, "observedGeneration": nv.metadata.generation.map(|g| g + 1),
        "conditions": [{ "type": "RolloutBlocked", "status": "True", "reason": "JoinFailures",
                          "message": "3 machines failed to attest", "lastTransitionTime": "2026-01-01T00:00:00Z" }]
    }});
    pools
        .patch_status(&pool, &PatchParams::default(), &Patch::Merge(blocked))
        .await?;
    let out = plugin(
        &cluster.kubeconfig,
        &[
            "upgrade",
            "--pool",
            &pool,
            "--policy",
            &policy,
            "--kubernetes-version",
            "v1.35.5",
            "--wait",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("3 machines failed to attest"),
        "{}",
        stderr(&out)
    );
    Ok(())
}
