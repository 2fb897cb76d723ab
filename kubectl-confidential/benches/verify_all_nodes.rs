//! Benchmark: `kubectl confidential verify --all-nodes` wall time for N swtpm
//! nodes (default 20, `VERIFY_BENCH_NODES`) joined through the gate by the
//! real bootstrapper, and the plugin's start-up time (`version --client`)
//! beside `kubectl version --client` (the kubectl the test environment builds
//! with the control plane), measured in the same run. Writes `benches/results/verify_all_nodes.json`.
//!
//! Run: `cargo bench -p kubectl-confidential --bench verify_all_nodes`
//! (or `cargo test ... --bench verify_all_nodes` for the debug build; the
//! JSON records which profile was measured).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use confidential_testenv::unique_name;
use serde_json::json;

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn median_ms(mut samples: Vec<f64>) -> Option<f64> {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied()
}

fn startup_ms(program: &std::path::Path, args: &[&str], runs: usize) -> Option<f64> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let out = Command::new(program).args(args).output().ok()?;
        if !out.status.success() {
            return None;
        }
        samples.push(start.elapsed());
    }
    Some(median(samples))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let plugin = env!("CARGO_BIN_EXE_kubectl-confidential");
    let nodes: usize = std::env::var("VERIFY_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let kubectl = confidential_testenv::binaries::kubectl()?;
    // Alternating, so both see the same machine load.
    let (mut plugin_startup, mut kubectl_startup) = (Vec::new(), Vec::new());
    for _ in 0..25 {
        plugin_startup.extend(startup_ms(
            std::path::Path::new(plugin),
            &["version", "--client"],
            1,
        ));
        kubectl_startup.extend(startup_ms(&kubectl, &["version", "--client"], 1));
    }
    let plugin_startup = median_ms(plugin_startup);
    let kubectl_startup = median_ms(kubectl_startup);

    let env = support::VerifyEnv::start().await?;
    let joins = (0..nodes).map(|_| {
        let name = unique_name("bench");
        let env = &env;
        async move { env.serving_node(&name, &env.image).await }
    });
    let started = Instant::now();
    let serving = futures::future::try_join_all(joins).await?;
    let join_s = started.elapsed().as_secs_f64();
    let mut args = vec![
        "verify".to_owned(),
        "--all-nodes".into(),
        "-o".into(),
        "json".into(),
    ];
    args.extend(env.trust_args());
    let mut walls = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let out = support::plugin_async(&env.cluster.kubeconfig, args.clone()).await?;
        walls.push(start.elapsed());
        if !out.status.success() {
            bail!("verify failed: {}", support::text(&out.stderr));
        }
    }
    let results = json!({
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "nodes": nodes,
        "verifyAllNodesWallMs": walls.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "verifyAllNodesMedianMs": median(walls),
        "joinAllNodesSeconds": join_s,
        "pluginVersionClientMedianMs": plugin_startup,
        "kubectlVersionClientMedianMs": kubectl_startup,
        "startupSamplesEach": 25,
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("verify_all_nodes.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    println!("{results:#}");
    drop(serving);
    Ok(())
}
