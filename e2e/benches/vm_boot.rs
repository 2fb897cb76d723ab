//! Benchmark: a VM node from QEMU start to its init running, split into
//! firmware + systemd-stub (OVMF start, measuring and loading the UKI, the
//! stub's measurements) and kernel (from the kernel's clock start to init,
//! `/proc/uptime` printed by init), and the QEMU process's RSS at that point.
//! Writes `e2e/benches/results/vm-boot.json`.
//!
//! `cargo bench -p confidential-e2e --bench vm_boot`
//! (`CONFIDENTIAL_BENCH_RUNS=N`, default 3; `CONFIDENTIAL_VM_ACCEL=kvm|tcg`,
//! default kvm; `scripts/vm-accel` says which one this machine can run).

use std::time::Duration;

use anyhow::Result;
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::vm::{Accel, BootReport, VM_MEMORY_MIB, Vm};
use xtask::node_image::{ImageVersion, NodeImageInputs, build};

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let runs: usize = std::env::var("CONFIDENTIAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let accel = Accel::from_env()?;
    let bootstrapper = confidential_testenv::workspace_binary(
        "confidential-bootstrapper",
        "confidential-bootstrapper",
        "CONFIDENTIAL_BOOTSTRAPPER",
    )?;
    let out = tempfile::tempdir()?;
    let uki = build(
        &"v1".parse::<ImageVersion>()?,
        &NodeImageInputs::system(bootstrapper)?,
        out.path(),
    )?;
    let uki_bytes = std::fs::metadata(&uki)?.len();
    let ca = SwtpmCa::new()?;
    let (mut totals, mut kernels, mut firmwares, mut rss) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let mut vm = Vm::boot(&ca, &uki, accel)?;
        let init_at = vm.wait_for_console("node-image: init running", Duration::from_secs(600))?;
        vm.wait_for_console("node-image: END EVENTLOG", Duration::from_secs(600))?;
        let report = BootReport::parse(&vm.console())?;
        let rss_kib = vm.qemu_rss_kib().unwrap_or(0);
        drop(vm);
        let total = init_at.as_secs_f64();
        eprintln!(
            "run {run}: init after {total:.2} s (kernel {:.2} s), QEMU RSS {rss_kib} KiB",
            report.kernel_seconds
        );
        totals.push(total);
        kernels.push(report.kernel_seconds);
        firmwares.push(total - report.kernel_seconds);
        rss.push(rss_kib as f64);
    }
    let report = serde_json::json!({
        "benchmark": "vm_boot",
        "accel": format!("{accel:?}").to_lowercase(),
        "runs": runs,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "vm_memory_mib": VM_MEMORY_MIB,
        "uki_bytes": uki_bytes,
        "start_to_init_median_s": median(&mut totals),
        "firmware_and_stub_median_s": median(&mut firmwares),
        "kernel_to_init_median_s": median(&mut kernels),
        "qemu_rss_median_kib": median(&mut rss),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("vm-boot.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}
