//! Side by side in one run: our gate and Kyverno, doing the same job
//! (container, init container and ephemeral container images must be
//! pinned by digest and allowed by digest or repository, in Pods and in
//! workload templates), as processes against the same real API server, on
//! the same machine, measured by the same load generator.
//!
//! 1. Decisions: every review of the decision mix
//!    ([`support::reviews::decision_cases`]) goes to both; each answer is
//!    compared with the other and with what our ImagePolicy's documentation
//!    promises, so a disagreement names whose bug it is.
//! 2. Direct load, alternating rounds ours / Kyverno: TLS keep-alive
//!    connections post the admissible workload mix (2 Pod CREATEs, 1
//!    Deployment CREATE) to the path the API server would call; throughput,
//!    client-observed p50/p99/p99.9 over every sample, RSS idle and under
//!    load, CPU seconds per 10,000 reviews (from `/proc/<pid>/stat`).
//! 3. Pod creation through the API server, alternating rounds in three
//!    namespaces: one no webhook sees, one only ours sees, one only Kyverno
//!    sees (namespace selectors), so all three share the same API server.
//!
//! Ratios are peer / ours. Run:
//! `cargo bench -p confidential-webhook --bench peers -- [--rounds N]
//! [--seconds N] [--connections N] [--pods N] [--out FILE]`
//! (the first run builds Kyverno from its Go module, see
//! `confidential_testenv::peers`).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_testenv::peers::{KYVERNO_VERSION, Kyverno, kyverno_validate_url};
use confidential_testenv::{TestCluster, eventually, install_crypto_provider};
use hyper::body::Bytes;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use support::client::{
    allowed, cpu_seconds, create_pods, drive, message, namespace, request, rss_kib, summary_us,
    tls_trusting,
};
use support::options::Options;
use support::ours::{install_policies, register_gate, start_gate, wait_enforced};
use support::reviews::{DIGEST, decision_cases, review};

/// The namespace label that routes a namespace's Pods to one admission
/// controller in the end-to-end part.
const ROUTE: &str = "bench.confidential.dev/admission";

fn options() -> Result<Options> {
    Options::parse(Options {
        rounds: 3,
        seconds: 5,
        connections: 8,
        pods: 100,
        out: PathBuf::from("target/peers.json"),
    })
}

/// Kyverno policies doing our ImagePolicy's job. Pod rules are autogen'd by
/// Kyverno for the workload controllers; the `pods/ephemeralcontainers`
/// subresource needs a policy of its own (a rule matching a subresource
/// turns autogen off for its whole policy).
fn kyverno_policies() -> Vec<Value> {
    // Pinned (a full sha256 digest) and allowed: the digest anywhere, or any
    // digest from a repository under ghcr.io/acme/ after Docker Hub
    // normalisation (`acme/web` is docker.io/acme/web).
    let allowed = format!(
        "{{{{ regex_match('^[^@]+@sha256:[0-9a-f]{{64}}$', element.image) && (contains(['{DIGEST}'], split(element.image, '@')[1]) || starts_with(image_normalize(element.image), 'ghcr.io/acme/')) }}}}"
    );
    let rule = |name: &str, kinds: Value| {
        json!({
            "name": name,
            "match": {"any": [{"resources": {"kinds": kinds}}]},
            "exclude": {"any": [{"resources": {"namespaces": ["kube-system"]}}]},
            "validate": {
                "failureAction": "Enforce",
                "message": format!("every container, init container and ephemeral container image must be pinned by digest and allowed ({DIGEST}, or a repository under ghcr.io/acme/)"),
                "foreach": [{
                    "list": "request.object.spec.[ephemeralContainers, initContainers, containers][]",
                    "deny": {"conditions": {"any": [{"key": allowed, "operator": "Equals", "value": false}]}}
                }]
            }
        })
    };
    let policy = |name: &str, annotations: Value, rule: Value| {
        json!({
            "apiVersion": "kyverno.io/v1", "kind": "ClusterPolicy",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"background": false, "rules": [rule]}
        })
    };
    vec![
        policy(
            "measured-images",
            json!({"pod-policies.kyverno.io/autogen-controllers": "DaemonSet,Deployment,Job,StatefulSet,ReplicaSet,ReplicationController,CronJob"}),
            rule("images-pinned-and-allowed", json!(["Pod"])),
        ),
        policy(
            "measured-images-debug",
            json!({}),
            rule(
                "debug-images-pinned-and-allowed",
                json!(["Pod/ephemeralcontainers"]),
            ),
        ),
    ]
}

async fn install_kyverno_policies(client: &kube::Client) -> Result<()> {
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("kyverno.io", "v1", "ClusterPolicy"));
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    for policy in kyverno_policies() {
        let name = policy["metadata"]["name"]
            .as_str()
            .context("policy without name")?
            .to_owned();
        // Kyverno's own policy webhook answers with a TLS error until its
        // certificate controller has issued its serving certificate: retry
        // the apply until it goes through.
        eventually(
            &format!("ClusterPolicy {name} accepted"),
            Duration::from_secs(180),
            || {
                let (api, name, policy) = (api.clone(), name.clone(), policy.clone());
                async move {
                    match api
                        .patch(
                            &name,
                            &PatchParams::apply("bench").force(),
                            &Patch::Apply(&policy),
                        )
                        .await
                    {
                        Ok(_) => Ok(Some(())),
                        Err(kube::Error::Api(status)) if status.code == 500 => Ok(None),
                        Err(e) => {
                            Err(anyhow::Error::new(e)
                                .context(format!("applying ClusterPolicy {name}")))
                        }
                    }
                }
            },
        )
        .await?;
        eventually(
            &format!("ClusterPolicy {name} Ready"),
            Duration::from_secs(120),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let policy = api.get(&name).await?;
                    let ready = policy.data["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True");
                    Ok(ready.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// One admission controller as the load generator sees it.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    path: String,
    tls: tokio_rustls::TlsConnector,
    pid: u32,
}

/// One load round against one server.
struct Round {
    latencies_ns: Vec<u64>,
    errors: u64,
    not_allowed: u64,
    seconds: f64,
    cpu_seconds: f64,
    max_rss_kib: u64,
}

async fn load_round(
    server: &Server,
    bodies: &Arc<Vec<Bytes>>,
    connections: usize,
    seconds: u64,
) -> Result<Round> {
    // Warm-up: open the connections' caches and the server's paths.
    let run = |secs: f64, offset: usize| {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                tokio::spawn(drive(
                    server.addr,
                    server.path.clone(),
                    server.tls.clone(),
                    bodies.clone(),
                    c * offset,
                    stop.clone(),
                ))
            })
            .collect();
        async move {
            let sampling = Arc::new(AtomicBool::new(true));
            let sampler = {
                let sampling = sampling.clone();
                let pid = server.pid;
                tokio::spawn(async move {
                    let mut max = 0;
                    while sampling.load(Ordering::Relaxed) {
                        max = max.max(rss_kib(pid).0);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    max
                })
            };
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            stop.store(true, Ordering::Relaxed);
            let mut loads = Vec::new();
            for t in tasks {
                loads.push(t.await??);
            }
            sampling.store(false, Ordering::Relaxed);
            Ok::<_, anyhow::Error>((loads, sampler.await?))
        }
    };
    run(1.0, 7).await?;
    let cpu_before = cpu_seconds(server.pid)?;
    let started = Instant::now();
    let (loads, max_rss_kib) = run(seconds as f64, 13).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.pid)? - cpu_before;
    let mut round = Round {
        latencies_ns: Vec::new(),
        errors: 0,
        not_allowed: 0,
        seconds: elapsed,
        cpu_seconds: cpu,
        max_rss_kib,
    };
    for load in loads {
        round.errors += load.errors;
        round.not_allowed += load.latencies_ns.len() as u64 - load.errors - load.allowed;
        round.latencies_ns.extend(load.latencies_ns);
    }
    Ok(round)
}

fn ratio(peer: &Value, ours: &Value) -> Value {
    match (peer.as_f64(), ours.as_f64()) {
        (Some(p), Some(o)) if o > 0.0 => json!(p / o),
        _ => Value::Null,
    }
}

/// Sends every decision case to both servers and compares.
async fn compare_decisions(servers: &[Server; 2]) -> Result<Value> {
    let mut cases = Vec::new();
    let mut disagreements = Vec::new();
    for case in decision_cases() {
        let mut answers = Vec::new();
        for server in servers {
            let (status, body) = request(
                server.addr,
                &server.tls,
                "POST",
                &server.path,
                Bytes::from(case.body.clone()),
            )
            .await?;
            if status != 200 {
                bail!(
                    "{} answered {status} to {:?}: {}",
                    server.name,
                    case.name,
                    String::from_utf8_lossy(&body)
                );
            }
            answers.push((allowed(&body)?, message(&body)));
        }
        let (ours, peer) = (&answers[0], &answers[1]);
        if ours.0 != peer.0 || ours.0 != case.expected_allowed {
            let wrong: Vec<&str> = servers
                .iter()
                .zip(&answers)
                .filter(|(_, a)| a.0 != case.expected_allowed)
                .map(|(s, _)| s.name)
                .collect();
            disagreements.push(json!({
                "case": case.name, "expected_allowed": case.expected_allowed,
                "ours": ours.0, "kyverno": peer.0, "wrong": wrong,
                "ours_message": ours.1, "kyverno_message": peer.1,
            }));
        }
        cases.push(json!({"case": case.name, "expected_allowed": case.expected_allowed, "ours": ours.0, "kyverno": peer.0}));
    }
    Ok(json!({"cases": cases, "disagreements": disagreements}))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    install_crypto_provider();
    let opts = options()?;
    let cluster = TestCluster::start().await?;
    let client = cluster.client.clone();
    install_policies(&client).await?;
    let gate = start_gate(&cluster.kubeconfig).await?;
    let kyverno = Kyverno::start(
        &client,
        &cluster.kubeconfig,
        json!({"matchLabels": {ROUTE: "kyverno"}}),
    )
    .await?;
    let result = run(&opts, &client, &gate, &kyverno).await;
    let report = match result {
        Ok(report) => report,
        Err(e) => bail!(
            "{e:#}\nour webhook's log tail:\n{}\nKyverno's log tail:\n{}",
            gate.log_tail(20),
            kyverno.log_tail(40)
        ),
    };
    drop(kyverno);
    drop(gate);
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, &text)?;
    println!("{text}");
    println!("written to {}", opts.out.display());
    Ok(())
}

async fn run(
    opts: &Options,
    client: &kube::Client,
    gate: &support::ours::Gate,
    kyverno: &Kyverno,
) -> Result<Value> {
    install_kyverno_policies(client).await?;
    let url = eventually(
        "Kyverno registered its webhook for pods",
        Duration::from_secs(120),
        || kyverno_validate_url(client, "pods"),
    )
    .await?;
    let path = url
        .strip_prefix(&format!("https://{}", kyverno.addr))
        .with_context(|| format!("Kyverno's webhook URL {url} is not on {}", kyverno.addr))?
        .to_owned();
    let servers = [
        Server {
            name: "ours",
            addr: gate.addr,
            path: "/validate".into(),
            tls: tls_trusting(&gate.ca_pem)?,
            pid: gate.pid(),
        },
        Server {
            name: "kyverno",
            addr: kyverno.addr,
            path,
            tls: tls_trusting(&kyverno.ca_pem)?,
            pid: kyverno.pid().context("Kyverno has no pid")?,
        },
    ];
    let idle: Vec<u64> = servers.iter().map(|s| rss_kib(s.pid).0).collect();

    // 1. Decisions.
    let decisions = compare_decisions(&servers).await?;

    // 2. Direct load, alternating.
    let kinds = ["Pod", "Pod", "Deployment"];
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..999)
            .map(|i| Bytes::from(review(i, kinds[i % kinds.len()])))
            .collect(),
    );
    let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..opts.rounds {
        for (i, server) in servers.iter().enumerate() {
            rounds[i].push(load_round(server, &bodies, opts.connections, opts.seconds).await?);
        }
    }
    let mut direct = serde_json::Map::new();
    for (server, rounds) in servers.iter().zip(rounds) {
        let reviews: usize = rounds.iter().map(|r| r.latencies_ns.len()).sum();
        let seconds: f64 = rounds.iter().map(|r| r.seconds).sum();
        let cpu: f64 = rounds.iter().map(|r| r.cpu_seconds).sum();
        let errors: u64 = rounds.iter().map(|r| r.errors).sum();
        let not_allowed: u64 = rounds.iter().map(|r| r.not_allowed).sum();
        if errors > 0 || not_allowed > 0 {
            bail!(
                "{}: {errors} errors and {not_allowed} refusals in the admissible load",
                server.name
            );
        }
        let per_round: Vec<f64> = rounds
            .iter()
            .map(|r| r.latencies_ns.len() as f64 / r.seconds)
            .collect();
        let max_rss = rounds.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
        let latencies: Vec<u64> = rounds.into_iter().flat_map(|r| r.latencies_ns).collect();
        direct.insert(
            server.name.to_owned(),
            json!({
                "reviews": reviews,
                "seconds": seconds,
                "throughput_per_s": reviews as f64 / seconds,
                "throughput_per_round": per_round,
                "client_observed": summary_us(latencies),
                "cpu_seconds_per_10k_reviews": cpu / reviews.max(1) as f64 * 10_000.0,
                "rss_kib": {"idle": idle[if server.name == "ours" { 0 } else { 1 }], "max_under_load": max_rss, "peak_since_start": rss_kib(server.pid).1},
            }),
        );
    }
    let pick = |server: &str, pointer: &str| {
        direct[server]
            .pointer(pointer)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let direct_ratios = json!({
        "throughput": ratio(&pick("kyverno", "/throughput_per_s"), &pick("ours", "/throughput_per_s")),
        "p50": ratio(&pick("kyverno", "/client_observed/p50_us"), &pick("ours", "/client_observed/p50_us")),
        "p99": ratio(&pick("kyverno", "/client_observed/p99_us"), &pick("ours", "/client_observed/p99_us")),
        "p999": ratio(&pick("kyverno", "/client_observed/p999_us"), &pick("ours", "/client_observed/p999_us")),
        "rss_idle": ratio(&pick("kyverno", "/rss_kib/idle"), &pick("ours", "/rss_kib/idle")),
        "rss_under_load": ratio(&pick("kyverno", "/rss_kib/max_under_load"), &pick("ours", "/rss_kib/max_under_load")),
        "cpu_per_10k_reviews": ratio(&pick("kyverno", "/cpu_seconds_per_10k_reviews"), &pick("ours", "/cpu_seconds_per_10k_reviews")),
    });

    // 3. Pod creation through the API server, three namespaces, alternating.
    let targets = [
        ("none", "e2e-none"),
        ("ours", "e2e-ours"),
        ("kyverno", "e2e-kyverno"),
    ];
    for (route, ns) in targets {
        namespace(client, ns, json!({ROUTE: route})).await?;
    }
    register_gate(
        client,
        gate,
        Some(json!({"key": ROUTE, "operator": "In", "values": ["ours"]})),
    )
    .await?;
    wait_enforced(client, "e2e-ours").await?;
    wait_enforced(client, "e2e-kyverno").await?;
    for (_, ns) in targets {
        create_pods(client, ns, 20).await?; // warm-up
    }
    let mut samples: [Vec<u64>; 3] = Default::default();
    let per_round = opts.pods.div_ceil(opts.rounds.max(1));
    for _ in 0..opts.rounds {
        for (i, (_, ns)) in targets.iter().enumerate() {
            samples[i].extend(create_pods(client, ns, per_round).await?);
        }
    }
    let [none, ours, peer] = samples.map(summary_us);
    let e2e_ratio = |field: &str| {
        json!({
            "ours_over_none": ratio(&ours[field], &none[field]),
            "kyverno_over_none": ratio(&peer[field], &none[field]),
            "kyverno_over_ours": ratio(&peer[field], &ours[field]),
        })
    };
    let e2e = json!({
        "pods_each": per_round * opts.rounds,
        "no_webhook": none,
        "ours": ours,
        "kyverno": peer,
        "mean_ratios": e2e_ratio("mean_us"),
        "p50_ratios": e2e_ratio("p50_us"),
        "p99_ratios": e2e_ratio("p99_us"),
    });

    Ok(json!({
        "benchmark": "peers",
        "peer": format!("kyverno v{KYVERNO_VERSION}"),
        "profile": if cfg!(debug_assertions) { "dev" } else { "bench (release)" },
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "note": "client, both servers and the control plane share the same cores"},
        "options": {"rounds": opts.rounds, "seconds_per_round": opts.seconds, "connections": opts.connections},
        "decisions": decisions,
        "direct": {
            "mix": {"Pod CREATE": 2, "Deployment CREATE": 1},
            "servers": direct,
            "ratios_kyverno_over_ours": direct_ratios,
        },
        "end_to_end_pod_create": e2e,
    }))
}
