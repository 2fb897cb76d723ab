//! Load generator for the admission webhook.
//!
//! Starts a real control plane, runs the built `confidential-webhook` binary
//! as its own process (so its RSS is its own) against it, and then:
//!
//! 1. drives `POST /validate` directly over TLS keep-alive connections with a
//!    realistic mix of AdmissionReviews (Node heartbeat UPDATEs with the old
//!    object, Pod CREATEs, Deployment CREATEs) for a fixed time, and reports
//!    throughput, client-observed p50/p99/p99.9, the server-side latency
//!    histogram's p50/p99/p99.9 (from `/metrics`, bucket resolution), and the
//!    server's RSS (current and peak);
//! 2. creates Pods through the API server without and then with the webhook
//!    registered and reports both latency distributions and their ratio.
//!
//! Run: `cargo bench -p confidential-webhook --bench loadgen -- [--seconds N]
//! [--connections N] [--pods N] [--out FILE]`. Writes JSON to `--out`
//! (default `target/loadgen.json`) and prints it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, EvidenceKind, ImagePolicy, ImagePolicySpec,
    MeasuredImage, Measurement, NodeAttestation, NodeAttestationSpec, PolicyMode, PublisherKey,
    Verdict,
};
use confidential_testenv::pki::CertificateAuthority;
use confidential_testenv::{TestCluster, eventually, install_crds, install_crypto_provider};
use confidential_webhook::validate::node::image_label_value;
use confidential_webhook::verify::measurement_file;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};

const IMAGE: &str = "ghcr.io/acme/node-image:v1.2.0";
const PCR4: &str = "4444444444444444444444444444444444444444444444444444444444444444";
const DIGEST: &str = "sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31";
const NODES: usize = 200;

struct Options {
    seconds: u64,
    connections: usize,
    pods: usize,
    out: PathBuf,
}

fn options() -> Result<Options> {
    let mut o = Options {
        seconds: 10,
        connections: 8,
        pods: 300,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/loadgen.json"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => o.seconds = value()?.parse()?,
            "--connections" => o.connections = value()?.parse()?,
            "--pods" => o.pods = value()?.parse()?,
            "--out" => o.out = value()?.into(),
            _ => {} // `cargo bench` passes `--bench`.
        }
    }
    Ok(o)
}

fn policy() -> Result<AttestationPolicy> {
    let key = p256::ecdsa::SigningKey::from_bytes(&[1u8; 32].into())?;
    let mut entry = MeasuredImage {
        image: IMAGE.into(),
        measurements: [(
            "4".to_owned(),
            Measurement {
                expected: PCR4.into(),
                warn_only: false,
            },
        )]
        .into(),
        snp: None,
        publisher: "acme".into(),
        signature: String::new(),
    };
    entry.signature = measurement_file(&entry)
        .map_err(anyhow::Error::msg)?
        .sign(&key);
    Ok(AttestationPolicy::new(
        "default",
        AttestationPolicySpec {
            evidence_kinds: vec![EvidenceKind::Tpm],
            publishers: vec![PublisherKey {
                name: "acme".into(),
                public_key: key.verifying_key().to_public_key_pem(LineEnding::LF)?,
            }],
            images: vec![entry],
            ..Default::default()
        },
    ))
}

fn node_json(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": "6f0c8a0e-2f9e-4d55-9a53-0d1e5e5f1a11", "resourceVersion": "123456",
            "labels": {
                "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "n2d-standard-4", "topology.kubernetes.io/zone": "europe-west3-a",
                "confidential.dev/node-image": image_label_value(IMAGE), "confidential.dev/node-pool": "workers"
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"}
        },
        "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"], "providerID": format!("gce://acme/europe-west3-a/{name}")},
        "status": {
            "capacity": {"cpu": "4", "ephemeral-storage": "101430960Ki", "memory": "16393232Ki", "pods": "110"},
            "allocatable": {"cpu": "3920m", "ephemeral-storage": "93478772582", "memory": "13640720Ki", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available"},
                {"type": "DiskPressure", "status": "False", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure"},
                {"type": "PIDPressure", "status": "False", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletHasSufficientPID", "message": "kubelet has sufficient PID available"},
                {"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletReady", "message": "kubelet is posting ready status"}
            ],
            "addresses": [{"type": "InternalIP", "address": "10.156.0.7"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "3c6f", "systemUUID": "3c6f", "bootID": "b1", "kernelVersion": "6.12.0", "osImage": "Confidential Node Image v1.2.0", "containerRuntimeVersion": "containerd://2.1.0", "kubeletVersion": "v1.35.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "images": [
                {"names": [format!("registry.k8s.io/pause@{DIGEST}"), "registry.k8s.io/pause:3.10"], "sizeBytes": 320368},
                {"names": [format!("nginx@{DIGEST}")], "sizeBytes": 72000000}
            ]
        }
    })
}

fn pod_spec(image: &str) -> Value {
    json!({
        "containers": [{
            "name": "web", "image": image,
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
            "securityContext": {"runAsNonRoot": true, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false}
        }],
        "initContainers": [{"name": "migrate", "image": format!("ghcr.io/acme/migrate@{DIGEST}"), "args": ["--up"]}],
        "serviceAccountName": "web", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
    })
}

fn review(uid: usize, kind: &str) -> Vec<u8> {
    let request = match kind {
        "Node" => {
            let name = format!("node-{}", uid % NODES);
            json!({
                "uid": format!("00000000-0000-0000-0000-{uid:012}"),
                "kind": {"group": "", "version": "v1", "kind": "Node"},
                "resource": {"group": "", "version": "v1", "resource": "nodes"},
                "subResource": "status", "requestKind": {"group": "", "version": "v1", "kind": "Node"},
                "name": name, "operation": "UPDATE",
                "userInfo": {"username": format!("system:node:{name}"), "groups": ["system:nodes", "system:authenticated"]},
                "object": node_json(&name), "oldObject": node_json(&name), "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}
            })
        }
        "Pod" => json!({
            "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": format!("web-7d4b9c-{uid}"), "namespace": "apps", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("web-7d4b9c-{uid}"), "namespace": "apps", "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c", "uid": "a1", "controller": true}]},
                "spec": pod_spec(&format!("nginx@{DIGEST}"))},
            "oldObject": null, "dryRun": false
        }),
        _ => json!({
            "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "web", "namespace": "apps", "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "apps", "labels": {"app": "web"}},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                    "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec(&format!("nginx@{DIGEST}"))}}},
            "oldObject": null, "dryRun": false
        }),
    };
    serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}))
        .unwrap_or_default()
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// Sums the latency histogram buckets over all kinds: `le` -> count.
fn histogram(metrics: &str) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        if !line.starts_with("confidential_webhook_admission_review_duration_seconds_bucket") {
            continue;
        }
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        // Key in nanoseconds; +Inf sorts last.
        let key = le.parse::<f64>().map_or(u64::MAX, |s| (s * 1e9) as u64);
        *out.entry(key).or_insert(0.0) += count;
    }
    out
}

/// The bucket upper bound (µs) holding quantile `q` of the difference.
fn histogram_quantile(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>, q: f64) -> Value {
    let total = after.get(&u64::MAX).copied().unwrap_or(0.0)
        - before.get(&u64::MAX).copied().unwrap_or(0.0);
    for (le, count) in after {
        let diff = count - before.get(le).copied().unwrap_or(0.0);
        if diff >= q * total {
            return if *le == u64::MAX {
                json!("+Inf")
            } else {
                json!(*le as f64 / 1000.0)
            };
        }
    }
    Value::Null
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn connect(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    path: &str,
) -> Result<(u16, String)> {
    let mut sender = connect(addr, tls).await?;
    let req = hyper::Request::get(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

struct Load {
    latencies_ns: Vec<u64>,
    errors: u64,
    allowed: u64,
}

async fn drive(
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    bodies: Arc<Vec<Bytes>>,
    offset: usize,
    stop: Arc<AtomicBool>,
) -> Result<Load> {
    let mut sender = connect(addr, &tls).await?;
    let mut load = Load {
        latencies_ns: Vec::with_capacity(200_000),
        errors: 0,
        allowed: 0,
    };
    let mut i = offset;
    while !stop.load(Ordering::Relaxed) {
        let body = bodies[i % bodies.len()].clone();
        i += 1;
        let req = hyper::Request::post("/validate")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let started = Instant::now();
        sender.ready().await?;
        match sender.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let body = resp.into_body().collect().await?.to_bytes();
                load.latencies_ns.push(started.elapsed().as_nanos() as u64);
                if !ok {
                    load.errors += 1;
                } else if memchr_allowed(&body) {
                    load.allowed += 1;
                }
            }
            Err(_) => {
                load.errors += 1;
                sender = connect(addr, &tls).await?;
            }
        }
    }
    Ok(load)
}

fn memchr_allowed(body: &[u8]) -> bool {
    body.windows(14).any(|w| w == b"\"allowed\":true")
}

fn summary_us(mut ns: Vec<u64>) -> Value {
    ns.sort_unstable();
    let mean = ns.iter().sum::<u64>() as f64 / ns.len().max(1) as f64;
    json!({
        "count": ns.len(),
        "mean_us": mean / 1000.0,
        "p50_us": percentile(&ns, 0.50) / 1000.0,
        "p99_us": percentile(&ns, 0.99) / 1000.0,
        "p999_us": percentile(&ns, 0.999) / 1000.0,
        "max_us": ns.last().copied().unwrap_or(0) as f64 / 1000.0,
    })
}

async fn create_pods(client: &kube::Client, ns: &str, count: usize) -> Result<Vec<u64>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "e2e-", "labels": {"app": "e2e"}},
        "spec": pod_spec(&format!("nginx@{DIGEST}")),
    }))?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        pods.create(&PostParams::default(), &pod).await?;
        out.push(started.elapsed().as_nanos() as u64);
    }
    Ok(out)
}

async fn namespace(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.into());
    api.create(&PostParams::default(), &ns).await?;
    // The service account the pods name.
    let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), name);
    let mut account = k8s_openapi::api::core::v1::ServiceAccount::default();
    account.metadata.name = Some("web".into());
    sa.create(&PostParams::default(), &account).await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    install_crypto_provider();
    let opts = options()?;
    let cluster = TestCluster::start().await?;
    let client = cluster.client.clone();
    install_crds(&client, &confidential_testenv::crds_dir()).await?;
    Api::<AttestationPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy()?)
        .await?;
    let image_policy = ImagePolicy::new(
        "apps",
        ImagePolicySpec {
            mode: PolicyMode::Enforce,
            allowed_digests: vec![DIGEST.into()],
            allowed_repositories: vec!["ghcr.io/acme/*".into()],
            exempt_namespaces: vec!["kube-system".into()],
            ..Default::default()
        },
    );
    Api::<ImagePolicy>::all(client.clone())
        .create(&PostParams::default(), &image_policy)
        .await?;
    let atts: Api<NodeAttestation> = Api::all(client.clone());
    let now = jiff::Timestamp::now();
    for i in 0..NODES {
        let name = format!("node-{i}");
        atts.create(
            &PostParams::default(),
            &NodeAttestation::new(
                &name,
                NodeAttestationSpec {
                    node_name: name.clone(),
                    evidence_kind: EvidenceKind::Tpm,
                    image: IMAGE.into(),
                    pool: Some("workers".into()),
                    measurements: [("4".to_owned(), PCR4.to_owned())].into(),
                    ak_fingerprint: format!("{i:064x}"),
                    disk_uuid: None,
                    attestation_endpoint: None,
                    attested_at: Time(now),
                    expires_at: Time(now + jiff::SignedDuration::from_hours(24)),
                    verdict: Verdict::Trusted,
                    warnings: vec![],
                },
            ),
        )
        .await?;
    }

    // The webhook binary, as its own process.
    let dir = tempfile::tempdir()?;
    let ca = CertificateAuthority::new("loadgen-ca")?;
    let pair = ca.issue_server(
        "confidential-webhook",
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?;
    std::fs::write(dir.path().join("tls.crt"), &pair.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &pair.key_pem)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = std::fs::File::create(dir.path().join("webhook.log"))?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_confidential-webhook"))
        .args(["--listen", &addr.to_string(), "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting confidential-webhook")?;
    let pid = child.id();
    let result = async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert.cert_pem.as_bytes())?)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
        ));
        eventually("webhook ready", Duration::from_secs(30), || {
            let tls = tls.clone();
            async move { Ok(matches!(get(addr, &tls, "/readyz").await, Ok((200, _))).then_some(())) }
        })
        .await?;
        let (idle_rss, _) = rss_kib(pid);

        // 1. Direct load.
        let kinds = ["Node", "Node", "Pod", "Pod", "Deployment"];
        let bodies: Arc<Vec<Bytes>> = Arc::new((0..1000).map(|i| Bytes::from(review(i, kinds[i % kinds.len()]))).collect());
        let sizes: Vec<usize> = kinds.iter().enumerate().map(|(i, _)| bodies[i].len()).collect();
        // Warm-up.
        let stop = Arc::new(AtomicBool::new(false));
        let warm: Vec<_> = (0..opts.connections).map(|c| tokio::spawn(drive(addr, tls.clone(), bodies.clone(), c * 7, stop.clone()))).collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        for w in warm { w.await??; }
        let before = histogram(&get(addr, &tls, "/metrics").await?.1);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks: Vec<_> = (0..opts.connections).map(|c| tokio::spawn(drive(addr, tls.clone(), bodies.clone(), c * 13, stop.clone()))).collect();
        tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        let (mut errors, mut allowed) = (0, 0);
        for t in tasks {
            let load = t.await??;
            latencies.extend(load.latencies_ns);
            errors += load.errors;
            allowed += load.allowed;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (rss, peak) = rss_kib(pid);
        let after = histogram(&get(addr, &tls, "/metrics").await?.1);
        let total = latencies.len();
        if allowed as usize != total {
            bail!("{} of {total} reviews were not allowed; the load is meant to be admissible", total - allowed as usize);
        }
        let direct = json!({
            "connections": opts.connections,
            "seconds": elapsed,
            "reviews": total,
            "errors": errors,
            "throughput_per_s": total as f64 / elapsed,
            "mix": {"Node status UPDATE (with oldObject)": 2, "Pod CREATE": 2, "Deployment CREATE": 1},
            "body_bytes": {"Node": sizes[0], "Pod": sizes[2], "Deployment": sizes[4]},
            "client_observed": summary_us(latencies),
            "server_side_bucket_upper_bound_us": {
                "p50": histogram_quantile(&before, &after, 0.50),
                "p99": histogram_quantile(&before, &after, 0.99),
                "p999": histogram_quantile(&before, &after, 0.999),
            },
            "rss_kib": {"idle": idle_rss, "after_load": rss, "peak": peak},
        });

        // 2. End to end through the API server.
        namespace(&client, "e2e-without").await?;
        namespace(&client, "e2e-with").await?;
        create_pods(&client, "e2e-without", 20).await?; // warm-up
        let without = create_pods(&client, "e2e-without", opts.pods).await?;
        let mut config: ValidatingWebhookConfiguration = serde_saphyr::from_str(&std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/webhook/validatingwebhookconfiguration.yaml"),
        )?)?;
        for w in config.webhooks.iter_mut().flatten() {
            w.client_config.service = None;
            w.client_config.url = Some(format!("https://{addr}/validate"));
            w.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca.cert.cert_pem.clone().into_bytes()));
        }
        Api::<ValidatingWebhookConfiguration>::all(client.clone()).create(&PostParams::default(), &config).await?;
        let probe: Api<Pod> = Api::namespaced(client.clone(), "e2e-with");
        eventually("API server calls the webhook", Duration::from_secs(30), || {
            let probe = probe.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "probe"}, "spec": {"containers": [{"name": "c", "image": "nginx:latest"}]}}))?;
                Ok(matches!(probe.create(&PostParams { dry_run: true, ..Default::default() }, &pod).await, Err(kube::Error::Api(_))).then_some(()))
            }
        })
        .await?;
        create_pods(&client, "e2e-with", 20).await?; // warm-up
        let with = create_pods(&client, "e2e-with", opts.pods).await?;
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let ratio = mean(&with) / mean(&without);
        let mut sorted_with = with.clone();
        sorted_with.sort_unstable();
        let mut sorted_without = without.clone();
        sorted_without.sort_unstable();
        let e2e = json!({
            "pods_each": opts.pods,
            "without_webhook": summary_us(without),
            "with_webhook": summary_us(with),
            "mean_ratio_with_over_without": ratio,
            "p50_ratio": percentile(&sorted_with, 0.5) / percentile(&sorted_without, 0.5),
            "p99_ratio": percentile(&sorted_with, 0.99) / percentile(&sorted_without, 0.99),
        });
        let (_, final_peak) = rss_kib(pid);
        Ok::<_, anyhow::Error>(json!({
            "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
            "note": "client, server and control plane share the same cores",
            "direct": direct,
            "end_to_end_pod_create": e2e,
            "server_peak_rss_kib": final_peak,
        }))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            let log = std::fs::read_to_string(dir.path().join("webhook.log")).unwrap_or_default();
            bail!(
                "{e:#}\nwebhook log tail:\n{}",
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
    };
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, &text)?;
    println!("{text}");
    println!("written to {}", opts.out.display());
    Ok(())
}
