//! Benchmark: one re-attestation sweep over N swtpm nodes (default 100) by
//! the real gate binary on a real control plane: per node an aTLS handshake,
//! a TPM2_Quote by the node's swtpm bound to that channel, verification
//! against the policy (EK chain, quote signature, PCRs against the signed
//! measurements, recorded AK) and the two writes renewing the
//! NodeAttestation. Reports the sweep's wall time (the gate's own
//! measurement, logged per sweep) and the gate process's CPU seconds for it
//! (from `/proc/<pid>/stat`, so the nodes' swtpm and bootstrapper CPU is not
//! counted), and writes `e2e/benches/results/reattest-sweep.json`.
//!
//! Setup, not measured: N machines join through the real bootstrapper and
//! keep serving `/v1/attest`, each on its own loopback address; their Node
//! objects (with that address as InternalIP) are created by the admin, as
//! the kubelets would register them. Then the gate restarts with a short
//! period and the bench records `CONFIDENTIAL_BENCH_SWEEPS` (default 3)
//! sweeps.
//!
//! `cargo bench -p confidential-e2e --bench reattest_sweep`
//! (`CONFIDENTIAL_BENCH_NODES=N`, `CONFIDENTIAL_BENCH_CONCURRENCY=C`, default 16).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_api::NodeAttestation;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::reattest::{Env, JoinedNode, Timing, node_ip};

fn env_number(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

/// `(verified, elapsed_ms)` of every "sweep finished" line in the gate log.
fn sweeps_logged(log: &str) -> Vec<(u64, u64)> {
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    log.lines()
        .filter(|l| l.contains("re-attestation sweep finished"))
        .map(strip_ansi)
        .filter_map(|l| Some((field(&l, "verified=")?, field(&l, "elapsed_ms=")?)))
        .collect()
}

/// The line without terminal colour sequences (`ESC [ ... m`), which the
/// gate's text logs carry.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Registers the Node of `name` with `ip` as InternalIP, as its kubelet would.
async fn register_node(nodes: &Api<Node>, name: &str, ip: std::net::Ipv4Addr) -> Result<()> {
    let node: Node = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
    nodes.create(&PostParams::default(), &node).await?;
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "addresses": [
                { "type": "InternalIP", "address": ip.to_string() }
            ] } })),
        )
        .await?;
    Ok(())
}

async fn bench() -> Result<serde_json::Value> {
    let count = env_number("CONFIDENTIAL_BENCH_NODES", 100)?;
    let concurrency = env_number("CONFIDENTIAL_BENCH_CONCURRENCY", 16)?;
    let sweeps = env_number("CONFIDENTIAL_BENCH_SWEEPS", 3)?.max(1);
    // No sweep while the nodes join: the first one runs on an empty cluster.
    let mut env = Env::start(Timing {
        period: "1h",
        grace: "1h",
        concurrency,
    })
    .await?;
    eprintln!("joining {count} swtpm nodes ...");
    let started = Instant::now();
    let nodes_api: Api<Node> = Api::all(env.client());
    let names: Vec<String> = (0..count).map(|i| format!("bench-node-{i}")).collect();
    let env_ref = &env;
    let joined: Vec<Result<JoinedNode>> = futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let nodes_api = nodes_api.clone();
            async move {
                let ip = node_ip(u32::try_from(i)?);
                let joined = env_ref.join(name, ip, false).await?;
                register_node(&nodes_api, name, ip).await?;
                Ok::<JoinedNode, anyhow::Error>(joined)
            }
        })
        .buffer_unordered(6)
        .collect()
        .await;
    let joined: Vec<JoinedNode> = joined.into_iter().collect::<Result<_>>()?;
    eprintln!("{} nodes joined in {:.1?}", joined.len(), started.elapsed());

    // A fresh gate sweeps within seconds of starting, then every 30 s.
    env.restart_gate("30s", "gate-bench.log").await?;
    let cpu_at_start = env.gate_cpu_seconds()?;
    let log_path = env.gate.log_path().to_owned();
    let mut results = Vec::new();
    let mut cpu_before = cpu_at_start;
    let deadline = Instant::now() + Duration::from_secs(60 * 10);
    while results.len() < sweeps {
        if Instant::now() > deadline {
            bail!(
                "sweeps did not finish; gate log:\n{}",
                env.gate.log_tail(40)
            );
        }
        env.gate.check_running()?;
        let log = std::fs::read_to_string(&log_path)?;
        let logged = sweeps_logged(&log);
        if logged.len() > results.len() {
            let cpu = env.gate_cpu_seconds()?;
            let (verified, elapsed_ms) = logged[results.len()];
            eprintln!(
                "sweep {}: {verified}/{count} verified in {elapsed_ms} ms, gate CPU {:.2} s",
                results.len() + 1,
                cpu - cpu_before
            );
            results.push(json!({
                "verified": verified,
                "wall_seconds": elapsed_ms as f64 / 1000.0,
                "gate_cpu_seconds": cpu - cpu_before,
            }));
            cpu_before = cpu;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every node really was renewed by the gate.
    let renewed = Api::<NodeAttestation>::all(env.client())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|a| {
            a.status
                .as_ref()
                .is_some_and(|s| s.last_verified.is_some() && s.consecutive_failures == 0)
        })
        .count();
    if renewed != count {
        bail!("only {renewed} of {count} attestations were renewed");
    }
    drop(joined);
    Ok(json!({
        "benchmark": "reattest_sweep",
        "nodes": count,
        "concurrency": concurrency,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "note": "wall_seconds: the gate's own measurement of one sweep (policy read, list, per-node aTLS + quote + verify + 2 writes); gate_cpu_seconds: user+system CPU of the gate process between two sweep completions",
        "sweeps": results,
    }))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not,
    // and must not start 100 machines.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench())?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("reattest-sweep.json"), text + "\n")?;
    Ok(())
}
