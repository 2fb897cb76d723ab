//! The gate and the operator move into the cluster they guard, onto an
//! attested VM node, and from there admit the next node: the admin's
//! in-cluster install (`kubectl confidential init --images`) on nodes that
//! really run our pods.
//!
//! A confidential cluster's first node cannot be admitted by a gate that
//! runs on a node, so the test does what an admin does: `init --gate-url`
//! runs the gate outside the cluster (a process on this host), the first
//! VM node attests to it and joins; then `init --images dist/images.json
//! --host-network` installs the gate and the operator as Deployments. Their
//! images are the ones `cargo xtask images` builds, baked into the node
//! image (measured with it) and pinned by digest; `init` registers the
//! webhooks only once a gate pod is ready, and completes the move of the
//! serving certificate. Then the process gate is stopped, and the gate pod
//! on node 1 must do all of the gate's work: the in-cluster operator
//! records the pool's missing machine, the test boots it (as a machine
//! bridge watching PendingNodes would), it attests to the gate pod at node
//! 1's address and joins; the operator pod approves its kubelet's
//! certificate; the second replicas start on it, and their logs are read
//! through the API server; a pod there reaches the API server through its
//! Service (kube-proxy); an unattested Node is refused; `verify
//! --all-nodes` passes from outside.
//!
//! The VMs and this host share a bridge ([`VmNetwork`]): the gate pod must
//! re-attest nodes at the addresses they announce, and the API server must
//! call it, which QEMU user networking's per-port forwards cannot carry.
//! The node image has no Service proxy, so the pods run in the nodes'
//! network and reach the API server at its address (`--host-network`).

mod vm_node_env;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL, image_label_value};
use confidential_api::{NodeAttestation, PendingNode};
use confidential_attestation::predict::predict_uki_boot;
use confidential_testenv::fixtures::{Publisher, measurement_file};
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::vm::{Accel, Vm, VmDisk, VmNetwork, VmOptions};
use confidential_testenv::{
    ControlPlaneOptions, ManagedProcess, TestCluster, eventually, workspace_binary,
};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use vm_node_env::{
    NodeEnv, build_node_image_with, disk_uuid, patience, wait_node_ready, wait_reattested,
};
use xtask::images::{ImageMeta, image, image_files, workspace_meta};
use xtask::node_image::runtime::{BakedImage, system_demo_image};

const IMAGE: &str = "vm-node:v1";
const POOL: &str = "default";
const NAMESPACE: &str = "confidential-system";
/// The gate's join port on the nodes' network (`manifests/webhook/deployment.yaml`).
const JOIN_PORT: u16 = 9443;

/// The gate's and the operator's images as `cargo xtask images` builds
/// them (from the dev binaries, debug info stripped so the node image
/// stays small), baked into the node image by tag and digest, and the
/// `images.json` `init --images` reads.
struct Components {
    uki: PathBuf,
    images_json: PathBuf,
    digests: Vec<(String, String)>,
}

fn build_components(dir: &Path) -> Result<Components> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let meta = workspace_meta(&repo)?;
    let mut baked = Vec::new();
    let mut listed = Vec::new();
    let mut digests = Vec::new();
    for (name, env) in [
        ("confidential-webhook", "CONFIDENTIAL_WEBHOOK_BIN"),
        ("confidential-controllers", "CONFIDENTIAL_CONTROLLERS_BIN"),
    ] {
        let binary = workspace_binary(name, name, env)?;
        let stripped = dir.join(name);
        let out = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&binary)
            .arg(&stripped)
            .output()
            .context("running objcopy (binutils)")?;
        if !out.status.success() {
            bail!("objcopy: {}", String::from_utf8_lossy(&out.stderr));
        }
        let meta = ImageMeta {
            name: name.to_owned(),
            ..meta.clone()
        };
        let built = image(&meta, &image_files(name, &stripped)?)?;
        listed.push(json!({ "name": meta.repository(), "digest": built.digest() }));
        digests.push((meta.repository(), built.digest().to_owned()));
        baked.push(BakedImage::new(&format!("{name}.tar"), &built)?);
    }
    let images_json = dir.join("images.json");
    std::fs::write(
        &images_json,
        json!({ "version": meta.version, "images": listed }).to_string(),
    )?;
    let uki = build_node_image_with(dir, baked)?;
    Ok(Components {
        uki,
        images_json,
        digests,
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the real plugin; its output is echoed for the test log.
fn plugin(kubeconfig: &Path, dir: &Path, args: &[String]) -> Result<std::process::Output> {
    let bin = workspace_binary(
        "kubectl-confidential",
        "kubectl-confidential",
        "KUBECTL_CONFIDENTIAL_BIN",
    )?;
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()?;
    eprintln!(
        "$ kubectl confidential {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn secret_bytes(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    Some(secret.data.as_ref()?.get(key)?.0.clone())
}

/// The node's launch configuration (its address on the bridge is added by
/// [`Vm::boot_with`]).
fn launch_config(name: &str, gate: &str, pin: &str) -> String {
    format!(
        "CONFIDENTIAL_GATE_ENDPOINTS={gate}\n\
         CONFIDENTIAL_GATE_PIN={pin}\n\
         CONFIDENTIAL_NODE_NAME={name}\n\
         CONFIDENTIAL_DISK_UUID={}\n\
         CONFIDENTIAL_POOL={POOL}\n\
         CONFIDENTIAL_NODE_LABELS={LABEL_NODE_POOL}={POOL},{LABEL_NODE_IMAGE}={}\n\
         CONFIDENTIAL_MAX_ATTEMPTS=30\n",
        disk_uuid(),
        image_label_value(IMAGE)
    )
}

fn boot(
    ca: &SwtpmCa,
    uki: &Path,
    accel: Accel,
    network: &Arc<VmNetwork>,
    dir: &Path,
    config: String,
    prefix: &str,
) -> Result<Vm> {
    let disks = vec![
        VmDisk::blank(&dir.join(format!("{prefix}-state.img")), 1024, "state")?,
        VmDisk::machine(&dir.join(format!("{prefix}-machine.img")))?,
    ];
    Vm::boot_with(
        ca,
        uki,
        accel,
        &VmOptions {
            memory_mib: 1024,
            disks,
            node_config: Some(config),
            network: Some(network.clone()),
            ..VmOptions::default()
        },
    )
}

/// Waits for the node's kubelet to start, then for Node `name` to be Ready.
async fn wait_ready(client: &kube::Client, vm: Vm, name: &str, accel: Accel) -> Result<Vm> {
    let (vm, _) = NodeEnv::console(vm, "node-image: step kubelet", patience(accel, 240)).await?;
    wait_node_ready(client, vm, name, patience(accel, 240)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gate_and_the_operator_move_onto_an_attested_node_and_admit_the_next() -> Result<()> {
    let accel = Accel::from_env()?;
    let dir = tempfile::Builder::new()
        .prefix("vm-in-cluster-")
        .tempdir()?;
    let d = dir.path().to_owned();
    let built = {
        let d = d.clone();
        tokio::task::spawn_blocking(move || build_components(&d)).await??
    };
    let predicted = predict_uki_boot(&std::fs::read(&built.uki)?)?.pcr_values();

    let network = Arc::new(VmNetwork::create()?);
    let host = network.host_address();
    let cluster = TestCluster::start_with(ControlPlaneOptions {
        node_network: Some(host),
        ..ControlPlaneOptions::default()
    })
    .await?;
    let client = cluster.client.clone();
    let cp = cluster.control_plane.as_ref().context("control plane")?;
    let api_port = cp
        .server
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .context("API server port")?;
    let node_api_server = format!("https://{host}:{api_port}");

    // The admin's local trust inputs.
    let ca = SwtpmCa::new()?;
    drop(Swtpm::start(&ca)?);
    let publisher = Publisher::random("in-cluster-publisher");
    let pcrs: Vec<(u8, [u8; 32], bool)> = predicted.iter().map(|(p, v)| (*p, *v, false)).collect();
    let measurements = d.join("measurements.json");
    publisher.write_signed(&measurements, &measurement_file(IMAGE, &pcrs))?;
    let publisher_key = d.join("publisher.pub");
    publisher.write_public_key(&publisher_key)?;
    let ek_ca = d.join("ek-ca.pem");
    std::fs::write(&ek_ca, ca.issuer_pem()?)?;
    let common = |extra: &[String]| -> Vec<String> {
        let mut args = vec![
            "init".to_owned(),
            format!("--measurements={}", measurements.display()),
            format!("--publisher-key={}", publisher_key.display()),
            format!("--ek-ca={}", ek_ca.display()),
            "--replicas=2".to_owned(),
            format!(
                "--kubernetes-version=v{}",
                confidential_testenv::binaries::KUBERNETES_VERSION
            ),
            format!("--node-api-server={node_api_server}"),
            format!("--master-secret-out={}", d.join("master.json").display()),
            format!("--cluster-file={}", d.join("cluster.json").display()),
            "--timeout=10m".to_owned(),
        ];
        args.extend(extra.iter().cloned());
        args
    };

    // 1. The first node is admitted by a gate outside the cluster.
    let gate_port = free_port()?;
    let join_port = free_port()?;
    let first_init = {
        let bin = workspace_binary(
            "kubectl-confidential",
            "kubectl-confidential",
            "KUBECTL_CONFIDENTIAL_BIN",
        )?;
        Command::new(bin)
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .args(common(&[
                format!("--gate-url=https://127.0.0.1:{gate_port}"),
                format!("--join-exposure=external={host}:{join_port}"),
            ]))
            .current_dir(&d)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?
    };
    // As a Secret volume would: the gate's files from what init created.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let (master_json, tls) = eventually(
        "init to create the gate's Secrets",
        Duration::from_secs(120),
        || {
            let secrets = secrets.clone();
            async move {
                let master = secrets.get_opt("confidential-master-secret").await?;
                let tls = secrets.get_opt("confidential-webhook-tls").await?;
                Ok(match (master, tls) {
                    (Some(m), Some(t)) => Some((
                        secret_bytes(&m, "master-secret.json").context("master secret")?,
                        t,
                    )),
                    _ => None,
                })
            }
        },
    )
    .await?;
    let gate_dir = d.join("process-gate");
    std::fs::create_dir_all(&gate_dir)?;
    std::fs::write(gate_dir.join("master-secret.json"), &master_json)?;
    std::fs::write(
        gate_dir.join("tls.crt"),
        secret_bytes(&tls, "tls.crt").context("tls.crt")?,
    )?;
    std::fs::write(
        gate_dir.join("tls.key"),
        secret_bytes(&tls, "tls.key").context("tls.key")?,
    )?;
    std::fs::write(gate_dir.join("cluster-ca.crt"), &cp.ca_pem)?;
    let mut process_gate = {
        let mut cmd = Command::new(workspace_binary(
            "confidential-webhook",
            "confidential-webhook",
            "CONFIDENTIAL_WEBHOOK_BIN",
        )?);
        cmd.env("RUST_LOG", "info")
            .arg(format!("--listen=127.0.0.1:{gate_port}"))
            .arg(format!("--tls-cert={}", gate_dir.join("tls.crt").display()))
            .arg(format!("--tls-key={}", gate_dir.join("tls.key").display()))
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg(format!("--join-listen={host}:{join_port}"))
            .arg(format!(
                "--join-master-secret-file={}",
                gate_dir.join("master-secret.json").display()
            ))
            .arg(format!("--join-api-server={node_api_server}"))
            .arg(format!(
                "--join-ca-file={}",
                gate_dir.join("cluster-ca.crt").display()
            ));
        ManagedProcess::spawn(
            "confidential-webhook (outside)",
            cmd,
            &gate_dir.join("gate.log"),
        )?
    };
    let first = tokio::task::spawn_blocking(move || first_init.wait_with_output()).await??;
    eprintln!(
        "$ kubectl confidential init --gate-url ...\n{}{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(first.status.success(), "the out-of-cluster init failed");
    let cluster_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("cluster.json"))?)?;
    let pin = cluster_file["gatePin"]
        .as_str()
        .context("gatePin")?
        .to_owned();

    // Until the operator runs in the cluster, its approver runs here.
    let approver = tokio::spawn(confidential_controllers::csr::run(
        client.clone(),
        confidential_controllers::metrics::Metrics::new(),
    ));
    let first_name = "in-cluster-first".to_owned();
    let vm1 = boot(
        &ca,
        &built.uki,
        accel,
        &network,
        &d,
        launch_config(&first_name, &format!("{host}:{join_port}"), &pin),
        "first",
    )?;
    let first_ip = vm1.address().context("address")?;
    let vm1 = wait_ready(&client, vm1, &first_name, accel)
        .await
        .with_context(|| {
            format!(
                "outside gate log:\n{}",
                std::fs::read_to_string(gate_dir.join("gate.log")).unwrap_or_default()
            )
        })?;

    // 2. The gate and the operator move in, onto the attested node.
    let moved = plugin(
        &cp.kubeconfig,
        &d,
        &common(&[
            format!("--images={}", built.images_json.display()),
            "--host-network".to_owned(),
            format!("--join-exposure=external={first_ip}:{JOIN_PORT}"),
        ]),
    )?;
    let stderr = String::from_utf8_lossy(&moved.stderr).into_owned();
    assert!(
        moved.status.success(),
        "the in-cluster init failed; console of node 1:\n{}",
        vm1.console()
    );
    assert!(stderr.contains("the gate's pods: 1/2 ready"), "{stderr}");
    assert!(
        stderr.contains("previous CA removed")
            || String::from_utf8_lossy(&moved.stdout).contains("previous CA removed"),
        "the serving certificate moved to the Service's names"
    );
    let webhooks = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get("confidential-gate")
        .await?;
    for webhook in webhooks.webhooks.unwrap_or_default() {
        let service = webhook
            .client_config
            .service
            .context("called through the Service")?;
        assert_eq!(service.name, "confidential-webhook");
        assert!(webhook.client_config.url.is_none());
    }
    // The outside gate goes: from here on only the gate pod can answer.
    process_gate.stop(Duration::from_secs(5));
    approver.abort();

    // 3. The operator pod records the pool's missing machine; the test
    // boots it as a machine bridge would, pointed at the gate pod.
    let pending: Api<PendingNode> = Api::all(client.clone());
    let second_name = eventually(
        "the operator pod to record the pool's second machine",
        patience(accel, 120),
        || {
            let pending = pending.clone();
            async move {
                Ok(pending
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .find(|p| p.spec.pool == POOL)
                    .map(|p| p.spec.node_name))
            }
        },
    )
    .await?;
    let vm2 = boot(
        &ca,
        &built.uki,
        accel,
        &network,
        &d,
        launch_config(&second_name, &format!("{first_ip}:{JOIN_PORT}"), &pin),
        "second",
    )?;
    let second_ip = vm2.address().context("address")?;
    let vm2 = wait_ready(&client, vm2, &second_name, accel)
        .await
        .with_context(|| {
            format!(
                "console of node 1 (the gate pod's node):\n{}",
                vm1.console()
            )
        })?;
    let attestation = Api::<NodeAttestation>::all(client.clone())
        .get(&second_name)
        .await?;
    assert_eq!(
        attestation.spec.attestation_endpoint.as_deref(),
        Some(format!("{second_ip}:9444").as_str()),
        "the node announced its own address on the cluster network"
    );

    // Both components run 2/2, one replica per node, from the baked images.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let running = eventually(
        "the gate's and the operator's second replicas to run on node 2",
        patience(accel, 180),
        || {
            let pods = pods.clone();
            async move {
                let items = pods.list(&ListParams::default()).await?.items;
                let ready = items
                    .iter()
                    .filter(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                Ok((ready == 4).then_some(items))
            }
        },
    )
    .await?;
    for pod in &running {
        let spec = pod.spec.as_ref().context("spec")?;
        assert_eq!(spec.host_network, Some(true));
        let container = &spec.containers[0];
        let image = container.image.clone().unwrap_or_default();
        let (repository, digest) = built
            .digests
            .iter()
            .find(|(r, _)| image.starts_with(r.as_str()))
            .with_context(|| format!("unexpected image {image}"))?;
        assert_eq!(image, format!("{repository}@{digest}"));
        let status = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .context("container status")?;
        assert!(status.image_id.ends_with(digest.as_str()), "{status:?}");
    }
    let on = |name: &str| {
        running
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
            .count()
    };
    assert_eq!((on(&first_name), on(&second_name)), (2, 2));

    // The gate pods re-attest the nodes where they announced themselves:
    // node 2 joined after the outside gate stopped, so only a gate pod can
    // have verified it since (a gate's first sweep runs seconds after it
    // starts and takes every attestation never verified).
    let attestations = Api::<NodeAttestation>::all(client.clone());
    for name in [&first_name, &second_name] {
        let attested_at = attestations.get(name).await?.spec.attested_at;
        let verified = wait_reattested(&client, name, patience(accel, 120)).await?;
        assert!(
            verified.0 > attested_at.0,
            "{name}: verified after its join"
        );
    }

    // `kubectl logs` reaches the kubelet of a VM node: the API server
    // dials its address with a client certificate of the cluster CA, which
    // the node learned at join.
    let gate_on_second = running
        .iter()
        .find(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(second_name.as_str())
                && p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("confidential-webhook-"))
        })
        .and_then(|p| p.metadata.name.clone())
        .context("the gate pod on node 2")?;
    let logs = pods
        .logs(&gate_on_second, &kube::api::LogParams::default())
        .await
        .context("the gate pod's logs through the API server")?;
    assert!(logs.contains("caches synced; ready"), "{logs}");

    // Services work on the nodes: a pod on the pod network reaches the API
    // server through the `kubernetes` Service's ClusterIP (kube-proxy's
    // nftables rules on the node, masqueraded to the node's address).
    let demo = system_demo_image()?;
    let probes: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let probe: Pod = serde_json::from_value(json!({
        "metadata": { "name": "service-probe" },
        "spec": {
            "nodeName": second_name,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "dnsPolicy": "Default",
            "containers": [{
                "name": "probe",
                "image": demo.digest_reference,
                // Plain HTTP to the API server's TLS port: Go's server answers
                // "Client sent an HTTP request to an HTTPS server" and closes,
                // which only that server says.
                "command": ["/bin/busybox", "sh", "-c",
                    "/bin/busybox printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 20 \"$KUBERNETES_SERVICE_HOST\" \"$KUBERNETES_SERVICE_PORT\"; \
                     echo \"via $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT\""],
            }],
        }
    }))?;
    probes.create(&PostParams::default(), &probe).await?;
    let phase = eventually("the Service probe to finish", patience(accel, 120), || {
        let probes = probes.clone();
        async move {
            let phase = probes
                .get("service-probe")
                .await?
                .status
                .and_then(|s| s.phase)
                .filter(|p| p == "Succeeded" || p == "Failed");
            Ok(phase)
        }
    })
    .await?;
    let said = probes
        .logs("service-probe", &kube::api::LogParams::default())
        .await?;
    assert_eq!(phase, "Succeeded", "{said}");
    assert!(
        said.contains("Client sent an HTTP request to an HTTPS server")
            && said.contains("via 10.0.0.1:443"),
        "the pod did not reach the API server through its Service: {said}"
    );

    // `status` says where the gate runs and that it is up.
    let status = plugin(
        &cp.kubeconfig,
        &d,
        &["status".to_owned(), "-o".to_owned(), "json".to_owned()],
    )?;
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(
        status["gate"],
        json!({
            "calledAt": "Service confidential-system/confidential-webhook",
            "podsReady": 2,
            "podsDesired": 2,
        })
    );

    // The API server calls the gate pods: an unattested Node is refused.
    let intruder: Node =
        serde_json::from_value(json!({ "metadata": { "name": "unattested-intruder" } }))?;
    let refused = Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &intruder)
        .await
        .expect_err("the gate pods refuse an unattested node");
    assert!(refused.to_string().contains("NodeAttestation"), "{refused}");

    // From outside, against the local trust inputs: both nodes verified at
    // the addresses they announced.
    let verify = plugin(
        &cp.kubeconfig,
        &d,
        &[
            "verify".to_owned(),
            "--all-nodes".to_owned(),
            "-o".to_owned(),
            "json".to_owned(),
            format!("--measurements={}", measurements.display()),
            format!("--publisher-key={}", publisher_key.display()),
            format!("--ek-ca={}", ek_ca.display()),
            format!("--cluster-file={}", d.join("cluster.json").display()),
            "--node-timeout=120".to_owned(),
        ],
    )?;
    assert!(verify.status.success(), "verify --all-nodes failed");
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout)?;
    let verdicts: Vec<(&str, &str)> = report
        .as_array()
        .context("report")?
        .iter()
        .map(|n| {
            (
                n["endpoint"].as_str().unwrap_or(""),
                n["verdict"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let mut expected = vec![
        (format!("{first_ip}:9444"), "Trusted"),
        (format!("{second_ip}:9444"), "Trusted"),
    ];
    expected.sort();
    let mut got: Vec<(String, &str)> = verdicts
        .iter()
        .map(|(e, v)| ((*e).to_owned(), *v))
        .collect();
    got.sort();
    assert_eq!(got, expected, "{report}");

    vm2.stop();
    vm1.stop();
    Ok(())
}
