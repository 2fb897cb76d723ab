//! Benchmark: how long a test control plane takes to start with cached
//! binaries (etcd → kube-apiserver `/readyz` → controller-manager acting) and
//! to stop. Writes JSON to `target/bench/controlplane-startup.json`.
//!
//! `cargo bench -p confidential-e2e --bench controlplane_startup`
//! (`CONFIDENTIAL_BENCH_RUNS=N` sets the number of runs, default 7).

use std::time::{Duration, Instant};

use anyhow::Result;
use confidential_testenv::{ControlPlane, ControlPlaneOptions};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo test --benches` runs bench targets with `--bench`-less args; only
    // measure when invoked by `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let runs: usize = std::env::var("CONFIDENTIAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    confidential_testenv::binaries::ensure()?;
    let mut starts = Vec::new();
    let mut stops = Vec::new();
    for run in 0..runs {
        let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
        starts.push(cp.startup);
        let begun = Instant::now();
        drop(cp);
        stops.push(begun.elapsed());
        eprintln!("run {run}: start {:?}, stop {:?}", starts[run], stops[run]);
    }
    starts.sort();
    stops.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = serde_json::json!({
        "benchmark": "controlplane_startup",
        "runs": runs,
        "start_median_ms": ms(percentile(&starts, 0.5)),
        "start_min_ms": ms(starts[0]),
        "start_max_ms": ms(starts[runs - 1]),
        "stop_median_ms": ms(percentile(&stops, 0.5)),
        "kubernetes": confidential_testenv::binaries::KUBERNETES_VERSION,
        "etcd": confidential_testenv::binaries::ETCD_VERSION,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("controlplane-startup.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}
