//! Benchmark: rolling a pool of VM nodes from v1 to v2 with the real
//! `kubectl confidential upgrade --image v2 --wait`, against its
//! theoretical minimum. The operator creates each heir with the QEMU
//! provider and waits for it to be Ready and attested before the donor is
//! drained and deleted, so with `maxSurge` 1 the roll is one machine boot +
//! join per node, in sequence: the minimum is the sum of the heirs' own
//! boot + join times (machine created -> its Node Ready and attested, each
//! measured in this run), and the rest of the wall time is what the roll
//! adds (the operator's reactions, drains, deletes, the plugin's polling).
//! No pods run in the pool here, so drains are empty. The initial v1 pool's
//! boot + join times are recorded too (its machines boot at the same time,
//! so on 2 cores each is slower than a heir booting alone).
//! Writes `e2e/benches/results/vm-roll.json`.
//!
//! `CONFIDENTIAL_VM_ACCEL=tcg cargo bench --profile dev -p confidential-e2e --bench vm_roll`
//! (`CONFIDENTIAL_BENCH_NODES=N`, default 2). The dev profile: the roll's
//! time is QEMU's and the control plane's, and the playground starts the
//! workspace's binaries from the bench's own target directory.

#[path = "../tests/support/vm_roll.rs"]
mod roll;

use std::time::Instant;

use anyhow::{Context, Result};
use confidential_playground::vm_provider::VM_MEMORY_MIB;
use confidential_playground::{IMAGE_V1, IMAGE_V2};
use confidential_testenv::vm::Accel;
use roll::{RollWatch, WatchSpec, join_timeout, qemu_provider, vm_playground};

fn max(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.max_by(f64::total_cmp)
}

#[tokio::main]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let nodes: i32 = std::env::var("CONFIDENTIAL_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let accel = Accel::from_env()?;
    let started = Instant::now();
    let playground = vm_playground(nodes, accel).await?;
    let provider = qemu_provider(&playground).await?;
    let client = playground.client.clone();

    // The initial pool: each machine's boot + join, measured.
    let initial = RollWatch::start(
        client.clone(),
        provider.clone(),
        WatchSpec {
            image: IMAGE_V1.to_owned(),
            pods: None,
        },
    );
    playground
        .wait_for_pool(IMAGE_V1, join_timeout(accel))
        .await?;
    let initial = initial.finish().await?;
    let v1_boot = initial.boot_to_ready();
    let v1_slowest =
        max(v1_boot.values().copied()).context("no v1 machine was seen from creation to Ready")?;

    let watch = RollWatch::start(
        client.clone(),
        provider.clone(),
        WatchSpec {
            image: IMAGE_V2.to_owned(),
            pods: None,
        },
    );
    let roll_started = Instant::now();
    playground.upgrade(IMAGE_V2).await?;
    let roll = roll_started.elapsed().as_secs_f64();
    let record = watch.finish().await?;
    anyhow::ensure!(
        record.violations.is_empty(),
        "invariants violated: {:?}",
        record.violations
    );
    let heirs_boot = record.boot_to_ready();
    // maxSurge 1: one heir at a time.
    anyhow::ensure!(
        heirs_boot.len() == usize::try_from(nodes)?,
        "not every heir was seen from creation to Ready: {heirs_boot:?}"
    );
    let minimum: f64 = heirs_boot.values().sum();
    let report = serde_json::json!({
        "benchmark": "vm_roll",
        "accel": format!("{accel:?}").to_lowercase(),
        "nodes": nodes,
        "profile": if cfg!(debug_assertions) { "dev" } else { "release" },
        "max_surge": 1,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "vm_memory_mib": VM_MEMORY_MIB,
        "v1_pool_boot_to_ready_s": v1_boot,
        "v1_pool_slowest_s": v1_slowest,
        "theoretical_minimum_s": minimum,
        "roll_wall_s": roll,
        "roll_over_minimum": roll / minimum,
        "heirs_boot_to_ready_s": heirs_boot,
        "donors_gone_at_s": record.machine_gone,
        "heirs_ready_at_s": record.heir_ready,
        "total_s": started.elapsed().as_secs_f64(),
        "note": "minimum = the sum of the heirs' own boot+join times (machine created -> Node Ready and attested), maxSurge 1, no pods in the pool; *_at_s are seconds since the roll's watch started",
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("vm-roll.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", path.display());
    Ok(())
}
