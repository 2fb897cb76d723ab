//! `kubectl confidential recover` on real components: a swtpm machine joins
//! through the gate with the real bootstrapper (its state disk set up by the
//! recorded `cryptsetup` stand-in: this kernel has no device-mapper), reboots
//! (TPM power-cycled, PCRs reset), finds no gate and serves recovery; the
//! real plugin binary verifies it against the admin's local files and sends
//! its keys. The disk key the node unlocks with after recovery is the one the
//! gate gave at first join.
//!
//! Refusals, each on its own, and what reached the node before the verdict:
//! another cluster's master secret (cluster-ID PCR), a cluster file of
//! another cluster (refused before any contact), a signed measurement file
//! of another image, a relay that terminates TLS (recording every request it
//! receives), and machines with a real TPM that record every request: one
//! booted an unmeasured image, one whose TPM does not hold the quoting AK
//! (activation fails). None of them receives more than the empty first
//! request (or the credential challenge), never a key.

mod support;

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use confidential_attestation::atls::{self, AtlsClient, AtlsPeer, PURPOSE_NODE_RECOVER};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{
    ActivateRequest, AttestResponse, JoinChallenge, PATH_RECOVER, PATH_RECOVER_ACTIVATE,
    PATH_RECOVER_KEYS, RecoveryKeys, RecoveryOffer,
};
use confidential_attestation::tpm::issuer::TpmIssuer;
use confidential_testenv::node::{IMAGE_PCR, NodeImage, SimulatedNode};
use confidential_testenv::standin::Standin;
use confidential_testenv::swtpm::Swtpm;
use confidential_testenv::{eventually, unique_name};
use http_body_util::{BodyExt, Full};
use support::{VerifyEnv, measurement_file, text};

/// Every request a recording server received: path and body.
type Recorded = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn recorded(log: &Recorded) -> Vec<(String, Vec<u8>)> {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Runs the real plugin (no cluster needed: recover talks to the node only).
async fn recover(args: Vec<String>) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"));
    cmd.arg("recover").args(args).kill_on_drop(true);
    Ok(tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .context("recover timed out")??)
}

fn free_endpoint() -> Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// The admin's trust arguments with `master` as the master secret file.
fn trust_args(env: &VerifyEnv, endpoint: &str, master: &Path) -> Vec<String> {
    let p = |n: &str| env.path(n).display().to_string();
    [
        "--endpoint",
        endpoint,
        "--master-secret",
        &master.display().to_string(),
        "--measurements",
        &p("measurements.json"),
        "--publisher-key",
        &p("publisher.pub"),
        "--ek-ca",
        &p("ek-ca.pem"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A booted bootstrapper waiting for recovery, stopped by pid on drop.
struct Recovering {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Recovering {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts the node's bootstrapper after a reboot: the gate is unreachable,
/// so after its one attempt it serves recovery on `listen`.
async fn start_recovering(
    node: &SimulatedNode,
    device: &str,
    listen: &str,
    cryptsetup: &Standin,
) -> Result<Recovering> {
    let log = node
        .dir()
        .join(format!("recovery-{}.log", unique_name("run")));
    let out = std::fs::File::create(&log)?;
    let mut cmd = tokio::process::Command::from(node.bootstrapper_command(
        &["127.0.0.1:1".to_owned()],
        &[
            "--pcrs",
            "4,15",
            "--rejoin",
            "--state-device",
            device,
            "--recovery-listen",
            listen,
        ],
    )?);
    // NO_COLOR: the log is read as plain text below.
    cmd.env("PATH", cryptsetup.path_env())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let mut recovering = Recovering {
        child: cmd.spawn()?,
        log,
    };
    eventually(
        "the node's recovery endpoint",
        Duration::from_secs(120),
        || {
            let exited = recovering.child.try_wait();
            let log = recovering.log();
            let listen = listen.to_owned();
            async move {
                if let Some(status) = exited? {
                    anyhow::bail!("the bootstrapper exited with {status}:\n{log}");
                }
                Ok(tokio::net::TcpStream::connect(&listen).await.ok().map(drop))
            }
        },
    )
    .await?;
    Ok(recovering)
}

/// A relay that terminates the admin's TLS itself and forwards each request
/// to the node on a connection of its own, recording what it receives.
async fn start_relay(node_endpoint: String, log: Recorded) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(atls::serve(
        listener,
        atls::server_config()?,
        move |_peer: AtlsPeer| {
            let (node_endpoint, log) = (node_endpoint.clone(), log.clone());
            atls::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (node_endpoint, log) = (node_endpoint.clone(), log.clone());
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().to_vec())
                        .unwrap_or_default();
                    if let Ok(mut l) = log.lock() {
                        l.push((path.clone(), body.clone()));
                    }
                    let answer = async {
                        let mut client =
                            AtlsClient::connect(&node_endpoint, atls::client_config(None)?).await?;
                        let (_, answer) = client.post(&path, body).await?;
                        anyhow::Ok(answer)
                    }
                    .await
                    .unwrap_or_else(|e| Bytes::from(e.to_string()));
                    Ok(hyper::Response::new(Full::new(answer)))
                }
            })
        },
    ));
    Ok(addr)
}

/// A machine with a real TPM answering the recovery protocol honestly
/// (evidence bound to the caller's connection) except that, with
/// `break_activation`, it answers the credential challenge with other
/// bytes. Records every request.
async fn start_recording_machine(
    issuer: Arc<TpmIssuer>,
    disk_uuid: String,
    break_activation: bool,
    log: Recorded,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(atls::serve(
        listener,
        atls::server_config()?,
        move |peer: AtlsPeer| {
            let (issuer, disk_uuid, log) = (issuer.clone(), disk_uuid.clone(), log.clone());
            atls::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (issuer, disk_uuid, log) = (issuer.clone(), disk_uuid.clone(), log.clone());
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().to_vec())
                        .unwrap_or_default();
                    if let Ok(mut l) = log.lock() {
                        l.push((path.clone(), body.clone()));
                    }
                    let answer = async {
                        Ok::<_, anyhow::Error>(match path.as_str() {
                            PATH_RECOVER => {
                                let evidence = issuer
                                    .quote(peer.nonce(PURPOSE_NODE_RECOVER), vec![IMAGE_PCR, 15])
                                    .await?;
                                serde_json::to_vec(&RecoveryOffer {
                                    attestation: AttestResponse {
                                        node_name: "recording".into(),
                                        evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence)),
                                    },
                                    disk_uuid,
                                })?
                            }
                            PATH_RECOVER_ACTIVATE => {
                                let challenge: JoinChallenge = serde_json::from_slice(&body)?;
                                let mut credential =
                                    issuer.activate_credential(challenge.challenge).await?;
                                if break_activation {
                                    credential = vec![0x5a; credential.len()];
                                }
                                serde_json::to_vec(&ActivateRequest { credential })?
                            }
                            _ => b"{}".to_vec(),
                        })
                    }
                    .await
                    .unwrap_or_else(|e| e.to_string().into_bytes());
                    Ok(hyper::Response::new(Full::new(Bytes::from(answer))))
                }
            })
        },
    ));
    Ok(addr)
}

/// No request body holds the disk key, in any encoding the protocol uses.
fn assert_no_key_material(log: &[(String, Vec<u8>)], key: &[u8]) {
    use base64::Engine as _;
    let forms = [
        key.to_vec(),
        hex::encode(key).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(key)
            .into_bytes(),
    ];
    for (path, body) in log {
        assert!(
            !path.contains("keys"),
            "a keys request reached the machine: {path}"
        );
        for form in &forms {
            assert!(
                !body.windows(form.len()).any(|w| w == form.as_slice()),
                "key material in a request to {path}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_unlocks_the_node_with_its_join_key_and_refuses_every_attack() -> Result<()> {
    let env = VerifyEnv::start().await?;
    let master_file = env.path("master-secret.json");
    assert_eq!(
        MasterSecret::from_file_json(&std::fs::read(&master_file)?)?.cluster_id(),
        env.master.cluster_id(),
        "the admin's file is this cluster's master secret"
    );

    // First boot: join through the gate; the stand-in formats and opens the
    // state disk with the gate's key.
    let name = unique_name("node");
    let node = SimulatedNode::boot(
        &env.ca,
        &name,
        &env.image,
        atls::GateIdentity::derive(&env.master)?.pin(),
    )?;
    let device = node.dir().join("vdb");
    std::fs::write(&device, b"")?;
    let device = device.display().to_string();
    let first = Standin::new("cryptsetup", &[("isLuks", 1)])?;
    let mut cmd = tokio::process::Command::from(node.bootstrapper_command(
        std::slice::from_ref(&env.gate_addr),
        &[
            "--pcrs",
            "4,15",
            "--pool",
            &env.pool,
            "--state-device",
            &device,
        ],
    )?);
    cmd.env("PATH", first.path_env()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output()).await??;
    assert!(
        out.status.success(),
        "first join: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let calls = first.calls()?;
    let open = calls
        .iter()
        .find(|c| c.argv.first().map(String::as_str) == Some("open"))
        .context("the state disk was opened at join")?;
    let gate_key = open.stdin.clone();
    assert_eq!(gate_key.len(), 32);
    assert_eq!(
        std::fs::read_to_string(node.dir().join("cluster-id"))?.trim(),
        hex::encode(env.master.cluster_id()),
        "the node keeps the cluster ID it joined"
    );

    // Reboot: PCRs reset, the firmware measures the same image, no gate.
    node.reboot(&env.image)?;
    let listen = free_endpoint()?;
    let second = Standin::new("cryptsetup", &[("isLuks", 0)])?;
    let mut recovering = start_recovering(&node, &device, &listen, &second).await?;
    let good = trust_args(&env, &listen, &master_file);

    // Another cluster's master secret: the cluster-ID PCR does not match.
    let other = env.path("other-master.json");
    std::fs::write(
        &other,
        serde_json::to_vec(&serde_json::json!({
            "secret": hex::encode([0x77u8; 32]), "salt": hex::encode(b"other")
        }))?,
    )?;
    let out = recover(trust_args(&env, &listen, &other)).await?;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("does not hold this cluster's ID") && stderr.contains("nothing was sent"),
        "{stderr}"
    );
    assert!(text(&out.stdout).contains("nothing secret was sent"));

    // A cluster file of another cluster: refused before the node is contacted.
    let mut mismatched = good.clone();
    std::fs::write(
        env.path("other-cluster.json"),
        serde_json::to_vec(&serde_json::json!({ "clusterId": "ab".repeat(32) }))?,
    )?;
    mismatched.extend([
        "--cluster-file".to_owned(),
        env.path("other-cluster.json").display().to_string(),
    ]);
    let before = recovering.log().matches("recovery request").count();
    let out = recover(mismatched).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("belong to different clusters"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        recovering.log().matches("recovery request").count(),
        before,
        "the node was not contacted"
    );

    // A signed measurement file of another image.
    let mut wrong = measurement_file(&NodeImage::new("other-image"))?;
    wrong.image = env.image.name.clone();
    std::fs::write(env.path("wrong.json"), wrong.canonical_bytes())?;
    std::fs::write(env.path("wrong.json.sig"), env.publisher.sign(&wrong))?;
    let mut wrong_args = good.clone();
    wrong_args[5] = env.path("wrong.json").display().to_string();
    wrong_args.extend(["-o".to_owned(), "yaml".to_owned()]);
    let out = recover(wrong_args).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PCR 4 is"),
        "{}",
        text(&out.stderr)
    );
    let yaml = text(&out.stdout);
    assert!(
        yaml.contains("recovered: false")
            && yaml.contains("keysSent: false")
            && yaml.contains("verdict: Untrusted"),
        "{yaml}"
    );

    // A relay terminating TLS: the quote is bound to the relay's connection.
    let relayed: Recorded = Arc::default();
    let relay = start_relay(listen.clone(), relayed.clone()).await?;
    let mut relay_args = good.clone();
    relay_args[1] = relay;
    let out = recover(relay_args).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nonce-mismatch"),
        "{}",
        text(&out.stderr)
    );
    let seen = recorded(&relayed);
    assert_eq!(
        seen,
        vec![(PATH_RECOVER.to_owned(), Vec::new())],
        "the relay received one empty request, nothing else"
    );
    assert_no_key_material(&seen, &gate_key);

    // Keys pushed on a connection where the node did not attest and
    // activate are refused by the node itself, and unlock nothing.
    let mut direct = AtlsClient::connect(&listen, atls::client_config(None)?).await?;
    let forged = serde_json::to_vec(&RecoveryKeys {
        disk_key: vec![1; 32],
        cluster_id: hex::encode(env.master.cluster_id()),
    })?;
    let (status, body) = direct.post(PATH_RECOVER_KEYS, forged).await?;
    assert_eq!(status, hyper::StatusCode::CONFLICT, "{}", text(&body));
    assert!(text(&body).contains("first"), "{}", text(&body));
    drop(direct);

    // So far the node got nothing: no challenge, no keys, no unlock.
    let log = recovering.log();
    assert!(
        log.contains("path=/v1/recover body_bytes=0"),
        "the node logs each request: {log}"
    );
    assert!(!log.contains("path=/v1/recover/activate"), "{log}");
    assert_eq!(
        log.matches("path=/v1/recover/keys").count(),
        1,
        "only the forged keys above: {log}"
    );
    assert_eq!(
        second.calls()?.len(),
        1,
        "only the preflight probe ran: {:?}",
        second.calls()?
    );

    // The admin's real inputs: recovered, with the key of the first join.
    let mut ok = good.clone();
    ok.extend(["-o".to_owned(), "json".to_owned()]);
    let out = recover(ok).await?;
    assert!(
        out.status.success(),
        "{}\n{}\nnode:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        recovering.log()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["recovered"], true, "{report}");
    assert_eq!(report["keysSent"], true);
    assert_eq!(report["activation"], "passed");
    assert_eq!(report["verification"]["verdict"], "Trusted");
    assert_eq!(report["verification"]["clusterIdPcr"]["matches"], true);
    assert_eq!(report["diskUuid"], node.disk_uuid().as_str());
    assert!(
        report["unlocked"]
            .as_str()
            .is_some_and(|u| u.contains("LUKS2")),
        "{report}"
    );
    let stderr = text(&out.stderr);
    for step in [
        "verifying",
        "credential activation",
        "sending the node its keys",
        "unlocked",
    ] {
        assert!(stderr.contains(step), "progress {step:?}: {stderr}");
    }
    let status = tokio::time::timeout(Duration::from_secs(60), recovering.child.wait()).await??;
    let log = recovering.log();
    assert!(status.success(), "{log}");
    assert!(log.contains(&format!("\"recovered\":\"{name}\"")), "{log}");
    let calls = second.calls()?;
    let argv: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.argv.first().map(String::as_str))
        .collect();
    assert_eq!(argv, ["isLuks", "open"], "opened, never formatted");
    assert_eq!(
        calls[1].stdin, gate_key,
        "the recovered key is the one the gate gave at first join"
    );
    Ok(())
}

/// The identity (AK fingerprint) the gate and `recover` derive disk keys for.
fn identity(issuer: &TpmIssuer) -> Result<String> {
    let name = confidential_attestation::tpm::verify::tpm_name(&issuer.ak_public_bytes()?);
    Ok(hex::encode(
        name.get(2..)
            .context("a TPM name has an algorithm prefix")?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_that_fail_verification_or_activation_receive_no_key() -> Result<()> {
    let env = VerifyEnv::start().await?;
    let master_file = env.path("master-secret.json");
    let cluster_pcr = |tpm: &Swtpm| tpm.extend(15, &env.master.cluster_id());
    let disk_uuid = "5e1f0000-0000-4000-8000-0000000000aa".to_owned();

    // A real TPM that booted an unmeasured image but claims the right
    // cluster: its evidence is genuine and bound to the admin's connection.
    let unmeasured = Swtpm::start(&env.ca)?;
    cluster_pcr(&unmeasured)?;
    let issuer = TpmIssuer::open(&unmeasured.tcti()).await?;
    let key = env.master.node_disk_key(&identity(&issuer)?, &disk_uuid);
    let log: Recorded = Arc::default();
    let addr = start_recording_machine(issuer, disk_uuid.clone(), false, log.clone()).await?;
    let out = recover(trust_args(&env, &addr, &master_file)).await?;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("did not boot a trusted image") && stderr.contains("nothing was sent"),
        "{stderr}"
    );
    let seen = recorded(&log);
    assert_eq!(
        seen,
        vec![(PATH_RECOVER.to_owned(), Vec::new())],
        "every byte the machine received before the verdict: one empty request"
    );
    assert_no_key_material(&seen, &key);

    // A TPM measured with the trusted image and the right cluster whose
    // activation answer is wrong (the AK is not proven to live in the
    // certified TPM): challenged, never given keys.
    let measured = Swtpm::start(&env.ca)?;
    measured.measure_boot(IMAGE_PCR, &env.image.components)?;
    cluster_pcr(&measured)?;
    let issuer = TpmIssuer::open(&measured.tcti()).await?;
    let key = env.master.node_disk_key(&identity(&issuer)?, &disk_uuid);
    let log: Recorded = Arc::default();
    let addr =
        start_recording_machine(issuer.clone(), disk_uuid.clone(), true, log.clone()).await?;
    let out = recover(trust_args(&env, &addr, &master_file)).await?;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("credential activation failed") && stderr.contains("no keys were sent"),
        "{stderr}"
    );
    let seen = recorded(&log);
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, [PATH_RECOVER, PATH_RECOVER_ACTIVATE], "{paths:?}");
    assert_no_key_material(&seen, &key);

    // Control: the same machine answering the challenge truthfully gets its
    // keys (so the recorders above could have seen them), keyed to the
    // activated AK by the gate's derivation.
    let log: Recorded = Arc::default();
    let addr =
        start_recording_machine(issuer.clone(), disk_uuid.clone(), false, log.clone()).await?;
    let out = recover(trust_args(&env, &addr, &master_file)).await?;
    // The recorder answers the keys with `{}`, which is not a RecoveryDone.
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("keys were sent"),
        "{}",
        text(&out.stdout)
    );
    let seen = recorded(&log);
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [PATH_RECOVER, PATH_RECOVER_ACTIVATE, PATH_RECOVER_KEYS],
        "{paths:?}"
    );
    let keys: RecoveryKeys = serde_json::from_slice(&seen[2].1)?;
    assert_eq!(keys.disk_key, key.to_vec());
    assert_eq!(keys.cluster_id, hex::encode(env.master.cluster_id()));

    // Several nodes in one call: a node that is gone does not hold back the
    // one that attests, and each gets its own report.
    let log: Recorded = Arc::default();
    let addr = start_recording_machine(issuer, disk_uuid.clone(), false, log.clone()).await?;
    let gone = free_endpoint()?;
    let mut args = trust_args(&env, &addr, &master_file);
    args.extend([
        "--endpoint".into(),
        gone.clone(),
        "-o".into(),
        "json".into(),
    ]);
    let out = recover(args).await?;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("recovered 0 of 2 nodes"), "{stderr}");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let items = reports["items"].as_array().context("items")?;
    assert_eq!(items.len(), 2, "{reports}");
    assert_eq!(items[0]["endpoint"], addr.as_str());
    assert_eq!(items[0]["keysSent"], true, "{reports}");
    assert_eq!(items[0]["activation"], "passed", "{reports}");
    assert_eq!(items[1]["endpoint"], gone.as_str());
    assert_eq!(items[1]["keysSent"], false, "{reports}");
    assert!(
        items[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("is the node serving recovery")),
        "{reports}"
    );
    let paths: Vec<String> = recorded(&log).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        [PATH_RECOVER, PATH_RECOVER_ACTIVATE, PATH_RECOVER_KEYS],
        "{paths:?}"
    );

    // --node names one node: with several endpoints it is refused before
    // any node is contacted (nothing listens there: the error would say so).
    let mut args = trust_args(&env, &gone, &master_file);
    args.extend([
        "--endpoint".into(),
        gone.clone(),
        "--node".into(),
        "node-a".into(),
    ]);
    let out = recover(args).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("give a single --endpoint"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
