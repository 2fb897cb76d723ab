//! Benchmark: wall time of `kubectl confidential init` (the real binary) on
//! the playground's real control plane with the real gate started by the
//! playground's host: a first install (generate the master secret and the
//! gate's PKI, apply every object, wait for CRDs and for the gate to answer
//! through its webhook, create the policy and the pool), a second,
//! idempotent run (everything `unchanged`), and a serving-certificate
//! rotation (until the gate serves the new certificate and the caBundle
//! trusts only the new CA). One fresh control plane per sample. Writes
//! `benches/results/init_wall_time.json`.
//!
//! Run: `cargo bench -p kubectl-confidential --bench init_wall_time` (or
//! `cargo test ... --bench init_wall_time` for the debug build; the JSON
//! records which profile was measured). `INIT_BENCH_SAMPLES` (default 3).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use confidential_playground::{Options, Playground};
use serde_json::json;

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn timed_init(playground: &Playground, extra: &[&str]) -> Result<Duration> {
    let options = Options {
        nodes: 0,
        ..Options::default()
    };
    let mut args = playground.init_args(&options);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let start = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .args(&args)
        .env("KUBECONFIG", &playground.control_plane.kubeconfig)
        .output()?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "init {extra:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let samples: usize = std::env::var("INIT_BENCH_SAMPLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let (mut first, mut second, mut rotation) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        let playground = Playground::start(Options {
            nodes: 0,
            init: false,
            ..Options::default()
        })
        .await?;
        first.push(timed_init(&playground, &[])?);
        second.push(timed_init(&playground, &[])?);
        rotation.push(timed_init(&playground, &["--rotate-serving-cert"])?);
    }
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect::<Vec<_>>()
    };
    let results = json!({
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "machine": "shared 2-core VM (other builds and tests running)",
        "samples": samples,
        "first_install_ms": { "median": median_ms(first.clone()), "all": ms(&first) },
        "second_run_unchanged_ms": { "median": median_ms(second.clone()), "all": ms(&second) },
        "rotate_serving_cert_ms": { "median": median_ms(rotation.clone()), "all": ms(&rotation) },
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("init_wall_time.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    println!("{results:#}");
    Ok(())
}
