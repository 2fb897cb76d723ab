//! `kubectl confidential verify` against real components: a real control
//! plane, swtpm machines joined through the gate by the real bootstrapper,
//! and the real plugin binary verifying them over aTLS with the admin's local
//! trust files. One passing path, then each failure on its own: a wrong
//! measurement file, a measurement file with a bad signature, a wrong
//! cluster ID, a node replaced by an unmeasured machine, a relayed connection.

mod support;

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use confidential_attestation::atls::{self, AtlsClient, AtlsPeer};
use confidential_attestation::protocol::PATH_ATTEST;
use confidential_testenv::unique_name;
use http_body_util::Full;
use support::{VerifyEnv, measurement_file, plugin_async, text};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A relay that terminates the verifier's TLS itself and asks the node on
/// a connection of its own: what a man in the middle would do.
async fn start_relay(node_endpoint: String) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(atls::serve(
        listener,
        atls::server_config()?,
        move |_peer: AtlsPeer| {
            let node_endpoint = node_endpoint.clone();
            atls::service_fn(move |_req| {
                let node_endpoint = node_endpoint.clone();
                async move {
                    let body = async {
                        let mut client =
                            AtlsClient::connect(&node_endpoint, atls::client_config(None)?).await?;
                        let (_, body) = client.post(PATH_ATTEST, Vec::new()).await?;
                        anyhow::Ok(body)
                    }
                    .await
                    .unwrap_or_else(|e| Bytes::from(e.to_string()));
                    Ok(hyper::Response::new(Full::new(body)))
                }
            })
        },
    ));
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_for_attested_nodes_and_fails_each_attack() -> Result<()> {
    let env = VerifyEnv::start().await?;
    let kc = env.cluster.kubeconfig.clone();
    let good = unique_name("node");
    let serving = env.serving_node(&good, &env.image).await?;
    let trust = env.trust_args();
    let with = |extra: &[&str]| {
        let mut all = args(&["verify"]);
        all.extend(args(extra));
        all
    };

    // Passes: table and JSON.
    let mut ok = with(&["--node", &good]);
    ok.extend(trust.clone());
    let out = plugin_async(&kc, ok.clone()).await?;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let table = text(&out.stdout);
    assert!(
        table.contains(&format!("NODE {good}")) && table.contains("TRUSTED"),
        "{table}"
    );
    assert!(
        table.contains("(cluster ID)") && table.contains("enforced"),
        "{table}"
    );
    assert!(
        table.contains("the AK the gate activated at join"),
        "{table}"
    );
    let mut json_args = ok.clone();
    json_args.extend(args(&["-o", "json"]));
    let out = plugin_async(&kc, json_args).await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let report = &reports[0];
    assert_eq!(report["verdict"], "Trusted", "{report}");
    assert_eq!(report["evidenceKind"], "tpm");
    assert_eq!(report["image"], env.image.name.as_str());
    assert_eq!(report["pcrs"][0]["pcr"], 4);
    assert_eq!(
        report["pcrs"][0]["actual"],
        hex::encode(env.image.expected_pcr())
    );
    assert_eq!(report["clusterIdPcr"]["pcr"], 15);
    assert_eq!(report["clusterIdPcr"]["matches"], true);
    let mut yaml_args = ok.clone();
    yaml_args.extend(args(&["-o", "yaml"]));
    let out = plugin_async(&kc, yaml_args).await?;
    assert!(
        text(&out.stdout).contains("verdict: Trusted"),
        "{}",
        text(&out.stdout)
    );

    // A wrong measurement file, properly signed: the node does not match it.
    let mut wrong = measurement_file(&confidential_testenv::node::NodeImage::new("other"))?;
    wrong.image = env.image.name.clone();
    std::fs::write(env.path("wrong.json"), wrong.canonical_bytes())?;
    std::fs::write(env.path("wrong.json.sig"), env.publisher.sign(&wrong))?;
    let mut wrong_args = with(&["--node", &good]);
    wrong_args.extend(trust.clone());
    wrong_args[4] = env.path("wrong.json").display().to_string();
    let out = plugin_async(&kc, wrong_args).await?;
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("UNTRUSTED") && stdout.contains("PCR 4 is"),
        "{stdout}"
    );
    assert!(stdout.contains("MISMATCH"), "{stdout}");
    assert!(
        text(&out.stderr).contains("1 of 1 nodes failed"),
        "{}",
        text(&out.stderr)
    );

    // A measurement file whose signature does not verify: refused before any
    // node is contacted, nothing printed as a verdict.
    let tampered = env.path("measurements.json.tampered.sig");
    let real_sig = std::fs::read_to_string(env.path("measurements.json.sig"))?;
    std::fs::write(&tampered, env.publisher.sign(&wrong))?;
    assert_ne!(real_sig.trim(), std::fs::read_to_string(&tampered)?.trim());
    let mut bad_sig = ok.clone();
    bad_sig.extend(args(&["--signature", &format!("@{}", tampered.display())]));
    let out = plugin_async(&kc, bad_sig).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not signed by the publisher key"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // A wrong cluster ID: the node belongs to another cluster.
    let mut other_cluster = with(&["--node", &good]);
    other_cluster.extend(trust.iter().take(4).cloned());
    other_cluster.extend(trust.iter().skip(6).cloned());
    other_cluster.extend(args(&["--cluster-id", &"ab".repeat(32)]));
    let out = plugin_async(&kc, other_cluster).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("does not hold this cluster's ID"),
        "{}",
        text(&out.stdout)
    );

    // A node replaced by an unmeasured machine: the (untrusted) cluster's
    // policy admitted it, the admin's measurement file does not describe it.
    let replaced = unique_name("replaced");
    let unmeasured = env.serving_node(&replaced, &env.unmeasured).await?;
    let mut replaced_args = with(&["--node", &replaced]);
    replaced_args.extend(trust.clone());
    let out = plugin_async(&kc, replaced_args).await?;
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("did not boot a trusted image"), "{stdout}");
    // And the same machine answering at the good node's address.
    env.register_node(&good, &unmeasured.endpoint).await?;
    let out = plugin_async(&kc, ok.clone()).await?;
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("answered as node") && stdout.contains("another machine"),
        "{stdout}"
    );
    env.register_node(&good, &serving.endpoint).await?;

    // A relay that terminates TLS itself: the quote is bound to the relay's
    // connection to the node, not to ours.
    let relayed = unique_name("relayed");
    let relay = start_relay(serving.endpoint.clone()).await?;
    env.register_node(&relayed, &relay).await?;
    let mut relay_args = with(&["--node", &relayed]);
    relay_args.extend(trust.clone());
    let out = plugin_async(&kc, relay_args).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("nonce-mismatch"),
        "{}",
        text(&out.stdout)
    );

    // --all-nodes: every node, in parallel, with progress; fails because
    // some are untrusted, and the good one still passes.
    let mut all = with(&["--all-nodes", "-o", "json"]);
    all.extend(trust.clone());
    let out = plugin_async(&kc, all).await?;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("[3/3]") && stderr.contains("2 of 3 nodes failed"),
        "{stderr}"
    );
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let verdicts: Vec<(String, String)> = reports
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["node"].as_str().unwrap_or("").to_owned(),
                        r["verdict"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(
        verdicts.contains(&(good.clone(), "Trusted".into())),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&(replaced.clone(), "Untrusted".into())),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&(relayed.clone(), "Untrusted".into())),
        "{verdicts:?}"
    );

    // A node whose endpoint does not answer is a failure, not a hang.
    let gone = unique_name("gone");
    env.register_node(&gone, "127.0.0.1:1").await?;
    let mut gone_args = with(&["--node", &gone, "--node-timeout", "10"]);
    gone_args.extend(trust.clone());
    let out = plugin_async(&kc, gone_args).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("no attestation"),
        "{}",
        text(&out.stdout)
    );

    drop(unmeasured);
    drop(serving);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
