//! `confidential-playground`: a confidential cluster on real components on
//! this machine (see the library docs). It starts the control plane and the
//! machines, then installs everything with the real
//! `kubectl confidential init` (unless `--no-init`: then you run it, as the
//! tour does). Prints the `KUBECONFIG` to use and what to try; Ctrl-C (or
//! SIGTERM) stops everything.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use confidential_playground::{IMAGE_V1, IMAGE_V2, Machines, Options, Playground};
use confidential_testenv::vm::Accel;

/// What the machines are (`--machines`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum MachineKind {
    /// swtpm-backed processes: the real bootstrapper, a kubelet stand-in.
    Process,
    /// QEMU VMs booting the node image UKI under OVMF with a swtpm vTPM.
    Vm,
}

/// Local playground: control plane and swtpm-backed machines; the gate, the
/// operator and the policy installed by `kubectl confidential init`.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// What the pool's machines are. `vm`: QEMU VMs booting the node image
    /// (`cargo xtask node-image`) under OVMF with a swtpm vTPM, on KVM, or
    /// on QEMU's TCG emulator with CONFIDENTIAL_VM_ACCEL=tcg (20-110 s per
    /// boot). The default is `process` because on machines like the one this
    /// was developed on /dev/kvm is PVM (a Firecracker host's kvm_pvm module),
    /// which runs no firmware, so VMs there need TCG.
    #[arg(long, value_enum, default_value_t = MachineKind::Process)]
    machines: MachineKind,
    /// Nodes in the default pool.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=50))]
    nodes: i32,
    /// maxSurge of rollouts (count).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=50))]
    max_surge: i32,
    /// Directory for the trust material, playground.env and logs (default: a
    /// temporary directory removed at exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Do not run `kubectl confidential init`: start the control plane and
    /// the machines' host, write DIR/playground.env and wait for you to run
    /// it (`$PLAYGROUND_INIT_ARGS` holds the arguments).
    #[arg(long)]
    no_init: bool,
    /// Start, wait for the pool to join, roll it to the second image with
    /// `kubectl confidential upgrade`, then exit.
    #[arg(long, conflicts_with = "no_init")]
    demo: bool,
}

async fn stop_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    confidential_startup::init(
        "warn,confidential_playground=info",
        confidential_startup::LogFormat::Text,
    );
    eprintln!(
        "playground: starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler"
    );
    let options = Options {
        nodes: args.nodes,
        max_surge: args.max_surge,
        dir: args.dir.clone(),
        init: !args.no_init,
        machines: match args.machines {
            MachineKind::Process => Machines::Process,
            MachineKind::Vm => Machines::Vm {
                accel: Accel::from_env()?,
            },
        },
    };
    let playground = tokio::select! {
        started = Playground::start(options) => started?,
        stopped = stop_signal() => {
            stopped?;
            eprintln!("playground: stopped while starting");
            return Ok(());
        }
    };
    let kubeconfig = playground.control_plane.kubeconfig.display().to_string();
    eprintln!(
        "playground: control plane ready in {:.1?}; files in {}",
        playground.control_plane.startup,
        playground.dir.display()
    );
    if args.no_init {
        println!("export KUBECONFIG={kubeconfig}");
        eprintln!(
            "playground: waiting for `kubectl confidential init` (source {}/playground.env; \
             its arguments are in $PLAYGROUND_INIT_ARGS). Ctrl-C stops everything",
            playground.dir.display()
        );
        stop_signal().await?;
        eprintln!("playground: stopping");
        drop(playground);
        return Ok(());
    }
    let (kind, join_timeout) = match args.machines {
        MachineKind::Process => ("swtpm", Duration::from_secs(300)),
        MachineKind::Vm => ("VM", Duration::from_secs(1800)),
    };
    eprintln!("playground: {} {kind} machines are joining", args.nodes);
    playground.wait_for_pool(IMAGE_V1, join_timeout).await?;
    println!("export KUBECONFIG={kubeconfig}");
    eprintln!(
        "playground: every node attested {IMAGE_V1}. Try:\n  \
         kubectl get nodes,nodeattestations\n  \
         kubectl confidential status\n  \
         kubectl confidential verify --all-nodes --measurements {} --publisher-key {} --ek-ca {} --cluster-file {}\n  \
         kubectl confidential upgrade --image {IMAGE_V2} --wait",
        playground.files.measurements_v1.display(),
        playground.files.publisher_key.display(),
        playground.files.ek_ca.display(),
        playground.files.cluster_file.display(),
    );
    if args.demo {
        eprintln!("playground: demo: kubectl confidential upgrade --image {IMAGE_V2} --wait");
        playground.upgrade(IMAGE_V2).await?;
        eprintln!("playground: demo finished: every node runs {IMAGE_V2}");
        return Ok(());
    }
    eprintln!("playground: Ctrl-C stops everything");
    stop_signal().await?;
    eprintln!("playground: stopping");
    drop(playground);
    Ok(())
}
