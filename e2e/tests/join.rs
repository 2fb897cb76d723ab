//! End-to-end attested join on real components: a real control plane, real
//! swtpm TPMs with EK certificates from a local CA, the real bootstrapper
//! binary and the gate's join endpoint (in-process, on its own aTLS port).
//!
//! One positive path, then every refusal on its own, each asserting the
//! refusal reason and that nothing was created (no NodeAttestation written or
//! changed, no bootstrap token Secret). The gaps an attacker review found
//! (name ownership, disk keys, stale caches, unauthenticated callers) have
//! their own suite, `join_gaps.rs`.

mod join_env;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::NodeAttestation;
use confidential_api::keys::ANNOTATION_TOKEN_NODE_NAME;
use confidential_attestation::atls::{self, AtlsClient, AtlsPeer, PURPOSE_JOIN};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{JoinRequest, PATH_JOIN};
use confidential_attestation::tpm::issuer::{TpmIssuer, read_pcrs_blocking};
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::node::{IMAGE_PCR, NodeImage, SimulatedNode};
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::{eventually, unique_name};
use join_env::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_node_joins_and_its_kubelet_gets_a_signed_certificate() -> Result<()> {
    let env = Env::start().await?;
    // kubeadm init publishes cluster-info; kubeadm join's token discovery
    // trusts it only with the bootstrap signer's JWS for the join token.
    publish_cluster_info(&env).await?;
    let name = unique_name("node");
    let node = env.boot(&name)?;
    // The node pins the gate by the pin `confidential-webhook gate-pin`
    // prints for the cluster's master secret.
    let pin = gate_pin_of(&env)?;
    let out = env.run(&node, &["--gate-pin", &pin]).await?;
    assert!(out.success, "bootstrapper failed:\n{}", out.log);

    let att = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    assert_eq!(att.spec.image, env.image.name);
    assert_eq!(att.spec.pool.as_deref(), Some(env.pool.as_str()));
    assert_eq!(
        att.spec.measurements.get(&IMAGE_PCR.to_string()),
        Some(&hex::encode(env.image.expected_pcr()))
    );
    assert_eq!(att.spec.ak_fingerprint.len(), 64);
    let (tokens, _) = env.snapshot().await?;
    assert_eq!(tokens.len(), 1);
    let token = Api::<Secret>::namespaced(env.client(), "kube-system")
        .get(&tokens[0])
        .await?;
    assert_eq!(
        token
            .metadata
            .annotations
            .unwrap_or_default()
            .get(ANNOTATION_TOKEN_NODE_NAME),
        Some(&name)
    );
    // Exactly the usages kubeadm join needs: authentication (TLS bootstrap)
    // and signing (token discovery of cluster-info).
    let usages: Vec<String> = token
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("usage-"))
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(&v.0)))
        .collect();
    assert_eq!(
        usages,
        [
            "usage-bootstrap-authentication=true",
            "usage-bootstrap-signing=true"
        ]
    );
    let token_id = tokens[0]
        .strip_prefix("bootstrap-token-")
        .context("token Secret name")?
        .to_owned();
    let config_maps = Api::<ConfigMap>::namespaced(env.client(), "kube-public");
    eventually(
        "the bootstrap signer to sign cluster-info for the join token",
        Duration::from_secs(90),
        || {
            let config_maps = config_maps.clone();
            let key = format!("jws-kubeconfig-{token_id}");
            async move {
                let info = config_maps.get("cluster-info").await?;
                Ok(info
                    .data
                    .unwrap_or_default()
                    .contains_key(&key)
                    .then_some(()))
            }
        },
    )
    .await?;
    // The state disk key is the HKDF derivation for this machine's identity
    // and the disk UUID recorded at its join.
    let disk = att.spec.disk_uuid.clone().context("disk UUID recorded")?;
    let expected_key = env
        .master
        .derive(&format!("disk-{}/{disk}", att.spec.ak_fingerprint), 32)?;
    assert_eq!(std::fs::read(node.disk_key_file())?, expected_key);
    // The node extended PCR 15 with the cluster ID.
    let tcti = node.swtpm.tcti();
    let pcrs = tokio::task::spawn_blocking(move || read_pcrs_blocking(&tcti, &[15])).await??;
    let expected =
        confidential_attestation::measurements::extend(&[0; 32], &env.master.cluster_id());
    assert_eq!(pcrs.get(&15), Some(&expected));

    let admin = env.client();
    let kubelet = node
        .start_kubelet(|csr| async move { approve(&admin, &csr).await })
        .await?;
    let cn = confidential_testenv::node::common_name(&kubelet.cert_pem)?;
    assert_eq!(cn, Some(format!("system:node:{name}")));
    let n = Api::<Node>::all(env.client()).get(&name).await?;
    let ready = n.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    Api::<Lease>::namespaced(env.client(), "kube-node-lease")
        .get(&name)
        .await?;
    assert_eq!(env.gate.metrics.refused("pcr-mismatch"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pcr_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let node = SimulatedNode::boot(
        &env.ca,
        &unique_name("node"),
        &NodeImage::new("tampered-image"),
        env.gate_pin()?,
    )?;
    env.refused(&node, &[], "pcr-mismatch").await?;
    assert_eq!(env.gate.metrics.refused("pcr-mismatch"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quote_replayed_from_another_connection_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let before = env.snapshot().await?;
    let node = env.boot(&unique_name("node"))?;
    let issuer = TpmIssuer::open(&node.swtpm.tcti()).await?;
    // A genuine quote, bound to connection 1 ...
    let first = AtlsClient::connect(&env.addr, atls::client_config(None)?).await?;
    let evidence = issuer
        .quote(first.nonce(PURPOSE_JOIN), vec![IMAGE_PCR])
        .await?;
    // ... presented on connection 2.
    let mut second = AtlsClient::connect(&env.addr, atls::client_config(None)?).await?;
    let (status, body) = second
        .post(
            PATH_JOIN,
            serde_json::to_vec(&join_request(&node.name, evidence))?,
        )
        .await?;
    assert_refused(status.as_u16(), &body, "nonce-mismatch");
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

/// The attestation endpoint a node announces is recorded for every later
/// reader (re-attestation, `verify`): anything but one canonical `host:port`
/// is a bad request, refused before the evidence is even looked at, and
/// nothing is written. The quotes here are genuine and bound to their
/// connection, so only the endpoint is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_attestation_endpoint_is_refused_and_changes_nothing() -> Result<()> {
    let env = Env::start().await?;
    let before = env.snapshot().await?;
    let node = env.boot(&unique_name("node"))?;
    let issuer = TpmIssuer::open(&node.swtpm.tcti()).await?;
    for endpoint in [
        "10.0.0.1",
        "user@10.0.0.1:9444",
        "10.0.0.1:9444,10.0.0.2:9444",
        "0x7f000001:9444",
        "node.example:9444/v1/attest",
    ] {
        let mut client = AtlsClient::connect(&env.addr, atls::client_config(None)?).await?;
        let evidence = issuer
            .quote(client.nonce(PURPOSE_JOIN), vec![IMAGE_PCR])
            .await?;
        let mut request = join_request(&node.name, evidence);
        request.attestation_endpoint = Some(endpoint.to_owned());
        let (status, body) = client
            .post(PATH_JOIN, serde_json::to_vec(&request)?)
            .await?;
        expect_refusal(status.as_u16(), &body, 400, "bad-attestation-endpoint")
            .with_context(|| endpoint.to_owned())?;
    }
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_relayed_through_a_man_in_the_middle_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let before = env.snapshot().await?;
    // The MITM terminates the node's aTLS and relays requests verbatim over
    // its own aTLS connection to the gate. A node pinning the real gate
    // never talks to it (e2e/tests/bootstrapper.rs); this node's launch
    // configuration pins the MITM's key, so the gate's channel binding is
    // the last defence and must hold on its own.
    let mitm_identity =
        atls::GateIdentity::derive(&MasterSecret::new(vec![0x66; 32], b"mitm".to_vec())?)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mitm_addr = listener.local_addr()?.to_string();
    let gate_addr = env.addr.clone();
    let mitm = tokio::spawn(atls::serve(
        listener,
        mitm_identity.server_config()?,
        move |_peer: AtlsPeer| {
            let gate_addr = gate_addr.clone();
            let upstream = Arc::new(tokio::sync::Mutex::new(None::<AtlsClient>));
            atls::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let gate_addr = gate_addr.clone();
                let upstream = upstream.clone();
                async move {
                    use http_body_util::BodyExt;
                    let path = req.uri().path().to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().to_vec())
                        .unwrap_or_default();
                    let mut slot = upstream.lock().await;
                    if slot.is_none() {
                        *slot = AtlsClient::connect(
                            &gate_addr,
                            atls::client_config(None).expect("config"),
                        )
                        .await
                        .ok();
                    }
                    let (status, answer) = match slot.as_mut() {
                        Some(c) => c
                            .post(&path, body)
                            .await
                            .unwrap_or((hyper::StatusCode::BAD_GATEWAY, Default::default())),
                        None => (hyper::StatusCode::BAD_GATEWAY, Default::default()),
                    };
                    let mut resp = hyper::Response::new(http_body_util::Full::new(answer));
                    *resp.status_mut() = status;
                    Ok(resp)
                }
            })
        },
    ));
    let node = SimulatedNode::boot(
        &env.ca,
        &unique_name("node"),
        &env.image,
        mitm_identity.pin(),
    )?;
    let out = node.run_bootstrapper(&[mitm_addr], &[]).await?;
    mitm.abort();
    assert!(!out.success, "a relayed join succeeded:\n{}", out.log);
    assert!(out.log.contains("nonce-mismatch"), "{}", out.log);
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ek_not_certified_by_a_trusted_ca_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let rogue_ca = SwtpmCa::new()?;
    let node = SimulatedNode::boot(&rogue_ca, &unique_name("node"), &env.image, env.gate_pin()?)?;
    env.refused(&node, &[], "ek-untrusted").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ak_not_in_the_tpm_of_the_certified_ek_fails_activation() -> Result<()> {
    let env = Env::start().await?;
    let before = env.snapshot().await?;
    let honest = env.boot(&unique_name("node"))?;
    let honest_issuer = TpmIssuer::open(&honest.swtpm.tcti()).await?;
    let ek_cert = honest_issuer.ek_certificate_blocking()?;
    // An attacker with its own TPM (correct PCRs) borrows the honest
    // machine's public EK certificate.
    let attacker = env.boot(&unique_name("node"))?;
    let issuer = TpmIssuer::open(&attacker.swtpm.tcti()).await?;
    let (status, body) = lib_join(&env.addr, &issuer, &attacker.name, |ev| {
        ev.ek_certificate = ek_cert
    })
    .await?;
    assert_refused(status, &body, "activation-failed");
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_quote_bytes_are_refused() -> Result<()> {
    let env = Env::start().await?;
    let before = env.snapshot().await?;
    let node = env.boot(&unique_name("node"))?;
    let issuer = TpmIssuer::open(&node.swtpm.tcti()).await?;
    let (status, body) = lib_join(&env.addr, &issuer, &node.name, |ev| {
        // firmwareVersion sits right before the PCR selection; any flipped
        // bit of the signed bytes must break the signature.
        let i = ev.attest.len() / 2;
        ev.attest[i] ^= 0x01;
    })
    .await?;
    assert_refused(status, &body, "quote-signature");
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_claiming_an_attested_name_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("node");
    let first = env.joined(&name).await?;
    let admin = env.client();
    let _kubelet = first
        .start_kubelet(|csr| async move { approve(&admin, &csr).await })
        .await?;
    // Refused, and the attestation still names the first AK.
    let impostor = env.boot(&name)?;
    env.refused(&impostor, &[], "name-taken").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_token_is_single_use() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("node");
    let node = env.joined(&name).await?;
    // The real CSR approver: it approves the kubelet CSR of the node the
    // token was issued to and then deletes the token.
    let admin = env.client();
    let approver = tokio::spawn(confidential_controllers::csr::run(
        admin.clone(),
        confidential_controllers::metrics::Metrics::new(),
    ));
    let _kubelet = node.start_kubelet(|_csr| async { Ok(()) }).await?;
    let token_gone = eventually(
        "the approver to delete the used token",
        Duration::from_secs(60),
        || {
            let secrets = Api::<Secret>::namespaced(admin.clone(), "kube-system");
            let name = name.clone();
            async move {
                let tokens = secrets.list(&Default::default()).await?;
                let left = tokens.items.iter().any(|secret| {
                    secret
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION_TOKEN_NODE_NAME))
                        .is_some_and(|bound| bound == &name)
                });
                Ok((!left).then_some(()))
            }
        },
    )
    .await;
    approver.abort();
    token_gone?;
    // Reusing the token: the API server no longer accepts it.
    let reuse = confidential_testenv::client_from_kubeconfig(&node.bootstrap_kubeconfig()).await?;
    let err = eventually(
        "the used token to be refused",
        Duration::from_secs(30),
        || {
            let reuse = reuse.clone();
            async move {
                match confidential_testenv::node::submit_kubelet_csr(&reuse, "another-node").await {
                    Err(e) => Ok(Some(e)),
                    Ok(_) => Ok(None),
                }
            }
        },
    )
    .await?;
    let status = err.downcast_ref::<kube::Error>().and_then(|e| match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    });
    assert_eq!(status, Some(401), "{err:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measurement_file_with_a_bad_signature_is_refused() -> Result<()> {
    let rogue = Publisher::random("rogue");
    let env = Env::start_with(|spec| {
        // A signature by a key that is not the listed publisher's.
        let file = fixtures::measurement_file("x", &[]);
        spec["images"][0]["signature"] = json!(rogue.sign(&file));
    })
    .await?;
    let node = env.boot(&unique_name("node"))?;
    env.refused(&node, &[], "measurements-signature").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_node_attests_over_atls_and_rejoins_with_the_same_disk_key() -> Result<()> {
    use confidential_attestation::atls::PURPOSE_NODE_ATTEST;
    use confidential_attestation::protocol::{AttestResponse, PATH_ATTEST};
    use confidential_attestation::tpm::{parse_certificates, verify_quote};

    let env = Env::start().await?;
    let name = unique_name("node");
    let node = env.boot(&name)?;
    let attest_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let attest_addr = format!("127.0.0.1:{attest_port}");
    let joined_file = node.dir().join("joined");
    let mut serving = node.spawn_bootstrapper(
        std::slice::from_ref(&env.addr),
        &[
            "--pcrs",
            "4,15",
            "--attest-listen",
            &attest_addr,
            // Announced at join: where the cluster reaches this endpoint.
            "--attest-advertise",
            &format!("localhost:{attest_port}"),
            "--joined-file",
            &joined_file.display().to_string(),
        ],
    )?;
    // Server-attests mode: the node answers with evidence bound to *our*
    // connection.
    let answer = eventually("the node's /v1/attest", Duration::from_secs(60), || {
        let attest_addr = attest_addr.clone();
        let ok = serving.check_running();
        async move {
            ok?;
            let Ok(mut client) =
                AtlsClient::connect(&attest_addr, atls::client_config(None)?).await
            else {
                return Ok(None);
            };
            let (status, body) = client.post(PATH_ATTEST, Vec::new()).await?;
            if !status.is_success() {
                bail!("attest answered {status}");
            }
            let resp: AttestResponse = serde_json::from_slice(&body)?;
            Ok(Some((resp, client.nonce(PURPOSE_NODE_ATTEST))))
        }
    })
    .await?;
    let (resp, nonce) = answer;
    assert_eq!(resp.node_name, name);
    // The joined file was written before serving, and the announced
    // endpoint is recorded for re-attestation and `verify`.
    let joined: serde_json::Value = serde_json::from_slice(&std::fs::read(&joined_file)?)?;
    assert_eq!(joined["joined"], name.as_str());
    let recorded = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    assert_eq!(
        recorded.spec.attestation_endpoint,
        Some(format!("localhost:{attest_port}"))
    );
    let Evidence::Tpm(ev) = resp.evidence.evidence else {
        bail!("expected TPM evidence");
    };
    let cas = parse_certificates(&env.ca.issuer_pem()?)?;
    let verified = verify_quote(&ev, &nonce, &cas)?;
    assert_eq!(
        verified.pcrs.get(&IMAGE_PCR),
        Some(&env.image.expected_pcr())
    );
    let cluster_pcr =
        confidential_attestation::measurements::extend(&[0; 32], &env.master.cluster_id());
    assert_eq!(
        verified.pcrs.get(&15),
        Some(&cluster_pcr),
        "the node is in this cluster"
    );
    // Evidence from that answer does not verify for another connection.
    assert!(verify_quote(&ev, &[0; 32], &cas).is_err());
    let att = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    assert_eq!(att.spec.ak_fingerprint, verified.ak_fingerprint);
    serving.stop(Duration::from_secs(5));

    // Reboot: the still-attested machine gets the same disk key back and no
    // new token.
    let disk_key = std::fs::read(node.disk_key_file())?;
    std::fs::remove_file(node.disk_key_file())?;
    env.wait_cached(&name).await?;
    let before = env.snapshot().await?;
    let out = env.run(&node, &["--rejoin"]).await?;
    assert!(out.success, "{}", out.log);
    assert_eq!(std::fs::read(node.disk_key_file())?, disk_key);
    assert_eq!(env.snapshot().await?.0, before.0, "rejoin issues no token");

    // Another machine cannot rejoin under that name.
    let other = env.boot(&name)?;
    env.refused(&other, &["--rejoin"], "name-taken").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snp_report_with_bad_signature_or_low_tcb_is_refused() -> Result<()> {
    use confidential_attestation::evidence::SnpEvidence;
    // AMD-signed Milan sample data (sev crate, Apache-2.0): no SNP hardware here.
    let sample = || -> Result<SnpEvidence> {
        Ok(SnpEvidence {
            report: hex::decode(
                include_str!("../../attestation/testdata/snp/report_milan.hex").trim(),
            )?,
            vcek: include_bytes!("../../attestation/testdata/snp/vcek_milan.der").to_vec(),
        })
    };
    let env = Env::start_with(|spec| {
        spec["evidenceKinds"] = json!(["Tpm", "SevSnp"]);
        spec["snp"] = json!({
            "arkCertificate": include_str!("../../attestation/testdata/snp/ark_milan.pem"),
            "askCertificate": include_str!("../../attestation/testdata/snp/ask_milan.pem"),
            "minimumTcb": { "bootloader": 0, "tee": 0, "snp": 255, "microcode": 0 },
        });
        // The report is checked before measurements, so the image's PCR
        // expectations do not matter for these refusals.
    })
    .await?;
    let before = env.snapshot().await?;
    let post = |evidence: SnpEvidence| {
        let addr = env.addr.clone();
        async move {
            let mut client = AtlsClient::connect(&addr, atls::client_config(None)?).await?;
            let request = JoinRequest {
                node_name: unique_name("snp-node"),
                disk_uuid: "5e1f0000-0000-4000-8000-000000000002".into(),
                pool: None,
                attestation_endpoint: None,
                evidence: EvidenceEnvelope::new(Evidence::SevSnp(evidence)),
            };
            let (status, body) = client
                .post(PATH_JOIN, serde_json::to_vec(&request)?)
                .await?;
            anyhow::Ok((status.as_u16(), body.to_vec()))
        }
    };
    let mut tampered = sample()?;
    tampered.report[0x90] ^= 1;
    let (status, body) = post(tampered).await?;
    assert_refused(status, &body, "snp-signature");
    let (status, body) = post(sample()?).await?;
    assert_refused(status, &body, "snp-tcb-too-low");
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_stays_with_its_attested_machine_without_a_node_until_its_attestation_is_deleted()
-> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("node");
    env.joined(&name).await?;
    let first = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    env.wait_cached(&name).await?;
    // The old machine never registered a Node: the name is still its own.
    assert!(
        Api::<Node>::all(env.client())
            .get_opt(&name)
            .await?
            .is_none()
    );
    // A second machine cannot take the attested name: nothing written, no
    // token.
    let new = env.boot(&name)?;
    env.refused(&new, &[], "name-taken").await?;

    // Releasing the name is the operator's or the admin's act: deleting the
    // NodeAttestation. Then the replacement may join, and the name moves.
    Api::<NodeAttestation>::all(env.client())
        .delete(&name, &DeleteParams::default())
        .await?;
    env.wait_cached(&name).await?;
    let out = env.run(&new, &[]).await?;
    assert!(out.success, "{}", out.log);
    let second = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    assert_ne!(first.spec.ak_fingerprint, second.spec.ak_fingerprint);
    Ok(())
}

/// What `kubeadm init` publishes for token discovery: kube-public/cluster-info
/// with a kubeconfig naming the API server and the cluster CA.
async fn publish_cluster_info(env: &Env) -> Result<()> {
    use base64::Engine as _;
    let cp = env
        .cluster
        .control_plane
        .as_ref()
        .context("needs a private control plane")?;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    certificate-authority-data: {}\n    server: {}\ncontexts: []\nusers: []\n",
        base64::engine::general_purpose::STANDARD.encode(&cp.ca_pem),
        cp.server
    );
    let info: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "cluster-info", "namespace": "kube-public" },
        "data": { "kubeconfig": kubeconfig },
    }))?;
    Api::<ConfigMap>::namespaced(env.client(), "kube-public")
        .create(&PostParams::default(), &info)
        .await?;
    Ok(())
}

/// Runs `confidential-webhook gate-pin` for the Env's master secret.
fn gate_pin_of(env: &Env) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("master.json");
    // The Env's master secret: 32 bytes of 0x42, salt "test-salt".
    std::fs::write(
        &file,
        json!({ "secret": "42".repeat(32), "salt": hex::encode(b"test-salt") }).to_string(),
    )?;
    let binary = confidential_testenv::workspace_binary(
        "confidential-webhook",
        "confidential-webhook",
        "CONFIDENTIAL_WEBHOOK_BIN",
    )?;
    let out = std::process::Command::new(binary)
        .arg("gate-pin")
        .arg("--join-master-secret-file")
        .arg(&file)
        .output()?;
    if !out.status.success() {
        bail!("gate-pin failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pin = String::from_utf8(out.stdout)?.trim().to_owned();
    assert_eq!(
        pin,
        hex::encode(env.gate.pin()?),
        "the pin of the identity the gate presents"
    );
    Ok(pin)
}

/// The state disk on a real join: a recorded `cryptsetup` first on the
/// node's `PATH` (this machine's kernel has no device-mapper; real LUKS runs
/// in the VM suite) is formatted once, when `isLuks` says "not LUKS", and
/// opened with the key the gate derived for this disk, which arrives on
/// stdin only; after a reboot the rejoined node opens it with the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_disk_is_formatted_once_and_opened_with_the_gates_disk_key() -> Result<()> {
    use confidential_testenv::standin::Standin;

    let env = Env::start().await?;
    let node = env.boot(&unique_name("node"))?;
    let device = node.dir().join("vdb");
    std::fs::write(&device, b"")?;
    let device_arg = device.display().to_string();
    let run = |cryptsetup: &Standin, extra: &[&str]| -> Result<_> {
        let mut args = vec!["--state-device", device_arg.as_str()];
        args.extend(extra);
        let mut cmd = node.bootstrapper_command(std::slice::from_ref(&env.addr), &args)?;
        cmd.env("PATH", cryptsetup.path_env());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        Ok(async move {
            let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
                .await
                .context("bootstrapper timed out")??;
            anyhow::Ok(format!(
                "{}{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    };

    // A stale, world-readable kubeconfig from an earlier boot: the secret
    // that replaces it is 0600 (as is the AK state).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(node.bootstrap_kubeconfig(), b"stale")?;
    std::fs::set_permissions(
        node.bootstrap_kubeconfig(),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let mode = |path: std::path::PathBuf| -> Result<u32> {
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    };

    let blank = Standin::new("cryptsetup", &[("isLuks", 1)])?;
    let log = run(&blank, &[])?.await?;
    assert!(log.starts_with("exit status: 0"), "{log}");
    assert!(std::fs::read_to_string(node.bootstrap_kubeconfig())?.contains("token: "));
    assert_eq!(mode(node.bootstrap_kubeconfig())?, 0o600);
    assert_eq!(mode(node.dir().join("ak.blob"))?, 0o600);
    let calls = blank.calls()?;
    let argv0: Vec<&str> = calls.iter().map(|c| c.argv[0].as_str()).collect();
    assert_eq!(argv0, ["isLuks", "luksFormat", "open"], "{calls:?}");
    // The key the gate derives for this machine's identity and its disk.
    let att = Api::<NodeAttestation>::all(env.client())
        .get(&node.name)
        .await?;
    let key = confidential_webhook::join::record::disk_key(
        &env.master,
        &att.spec.ak_fingerprint,
        &node.disk_uuid(),
    );
    for call in &calls[1..] {
        assert_eq!(call.stdin, key, "the gate's key for this disk, on stdin");
        assert!(call.argv.contains(&device_arg), "{call:?}");
        assert!(
            !call.argv.iter().any(|a| a.contains(&hex::encode(key))),
            "no key on argv: {call:?}"
        );
    }
    assert!(
        !node.disk_key_file().exists(),
        "a state device gets no key file"
    );

    let formatted = Standin::new("cryptsetup", &[("isLuks", 0)])?;
    let log = run(&formatted, &["--rejoin"])?.await?;
    assert!(log.starts_with("exit status: 0"), "{log}");
    let calls = formatted.calls()?;
    let argv0: Vec<&str> = calls.iter().map(|c| c.argv[0].as_str()).collect();
    assert_eq!(
        argv0,
        ["isLuks", "open"],
        "a LUKS disk is never formatted again"
    );
    assert_eq!(
        calls[1].stdin, key,
        "the rejoined node gets the same disk key"
    );
    Ok(())
}
