//! Benchmark: a VM node from QEMU start to its init running, split into
//! firmware + systemd-stub (OVMF start, measuring and loading the UKI, the
//! stub's measurements) and kernel (from the kernel's clock start to init,
//! `/proc/uptime` printed by init), and the QEMU process's RSS at that point.
//! Writes `e2e/benches/results/vm-boot.json`.
//!
//! Then (unless `CONFIDENTIAL_BENCH_NODE_READY=0`) one node image with the
//! kubelet boots against a real control plane and gate
//! (`tests/vm_node_env`): VM start to Node Ready, split into firmware +
//! stub, kernel, node setup (modules, network, disks), join + LUKS2 (the
//! bootstrapper: attestation over aTLS, format/open, mount), containerd
//! (start and image import) and kubelet (start to Ready, from the API);
//! the guest's `/proc/uptime` marks on the console give the in-guest
//! phases. Writes `e2e/benches/results/vm-node-ready.json`.
//!
//! `cargo bench -p confidential-e2e --bench vm_boot`
//! (`CONFIDENTIAL_BENCH_RUNS=N`, default 3; `CONFIDENTIAL_VM_ACCEL=kvm|tcg`,
//! default kvm; `scripts/vm-accel` says which one this machine can run).

#[path = "../tests/vm_node_env/mod.rs"]
mod vm_node_env;

use std::time::Duration;

use anyhow::Result;
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::vm::{Accel, BootReport, VM_MEMORY_MIB, Vm};
use xtask::node_image::{ImageVersion, NodeImageInputs, build};

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The guest uptime printed with `node-image: step <name>`.
fn step_uptime(console: &str, step: &str) -> Option<f64> {
    vm_node_env::console_field(console, &format!("node-image: step {step} "), "uptime")
        .and_then(|v| v.parse().ok())
}

/// One VM start to Node Ready, by phase.
async fn node_ready() -> Result<serde_json::Value> {
    use k8s_openapi::api::core::v1::Node;
    let env = vm_node_env::NodeEnv::start().await?;
    let name = vm_node_env::node_name();
    let disks = env.disks("bench")?;
    let vm = env.boot(
        &env.uki,
        &name,
        &vm_node_env::disk_uuid(),
        &disks,
        &env.dir.path().join("tpm-bench"),
    )?;
    let patience = vm_node_env::patience(env.accel, 600);
    let (vm, init_at) =
        vm_node_env::NodeEnv::console(vm, "node-image: init running", patience).await?;
    let (vm, _) = vm_node_env::NodeEnv::console(vm, "node-image: step kubelet", patience).await?;
    let nodes = kube::Api::<Node>::all(env.cluster.client.clone());
    let ready_at = loop {
        let ready = nodes.get_opt(&name).await?.is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        if ready {
            break vm.uptime();
        }
        if vm.uptime() > patience {
            anyhow::bail!("no Ready Node within {patience:?}:\n{}", vm.console());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rss_kib = vm.qemu_rss_kib().unwrap_or(0);
    let console = vm.console();
    vm.stop();
    let report = BootReport::parse(&console)?;
    let kernel = report.kernel_seconds;
    let step = |name: &str| {
        step_uptime(&console, name).ok_or_else(|| anyhow::anyhow!("no step {name} on the console"))
    };
    let (modules, join, containerd, kubelet) = (
        step("modules")?,
        step("join")?,
        step("containerd")?,
        step("kubelet")?,
    );
    // Guest uptime u happened at host time (init_at - kernel) + u.
    let guest_zero = init_at.as_secs_f64() - kernel;
    let total = ready_at.as_secs_f64();
    Ok(serde_json::json!({
        "benchmark": "vm_node_ready",
        "accel": format!("{:?}", env.accel).to_lowercase(),
        "vm_memory_mib": vm_node_env::NODE_MEMORY_MIB,
        "uki_bytes": std::fs::metadata(&env.uki)?.len(),
        "start_to_node_ready_s": total,
        "firmware_and_stub_s": guest_zero,
        "kernel_to_init_s": kernel,
        "node_setup_s": join - kernel,
        "modules_loaded_at_guest_s": modules,
        "join_and_luks_s": containerd - join,
        "containerd_and_image_import_s": kubelet - containerd,
        "kubelet_to_ready_s": total - (guest_zero + kubelet),
        "qemu_rss_at_ready_kib": rss_kib,
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
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

    if std::env::var("CONFIDENTIAL_BENCH_NODE_READY").as_deref() != Ok("0") {
        let ready = node_ready().await?;
        let path = dir.join("vm-node-ready.json");
        std::fs::write(&path, serde_json::to_string_pretty(&ready)? + "\n")?;
        println!("{}", serde_json::to_string_pretty(&ready)?);
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
