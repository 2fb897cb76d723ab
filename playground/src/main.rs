//! `confidential-playground`: a confidential cluster on real components on
//! this machine (see the library docs). Prints the `KUBECONFIG` to use and
//! what to try; Ctrl-C stops everything.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use confidential_playground::{IMAGE_V1, IMAGE_V2, Options, Playground};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Local playground: control plane, gate, node operator and swtpm-backed nodes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Nodes in the default pool.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=50))]
    nodes: i32,
    /// maxSurge of rollouts (count).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=50))]
    max_surge: i32,
    /// Start, wait for the pool to join, roll it to the second image, then exit.
    #[arg(long)]
    demo: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    confidential_startup::init(
        "warn,confidential_playground=info",
        confidential_startup::LogFormat::Text,
    );
    eprintln!(
        "playground: starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the gate and the node operator"
    );
    let playground = Playground::start(Options {
        nodes: args.nodes,
        max_surge: IntOrString::Int(args.max_surge),
    })
    .await?;
    let kubeconfig = playground.control_plane.kubeconfig.display().to_string();
    eprintln!(
        "playground: control plane ready in {:.1?}; {} swtpm nodes are joining",
        playground.control_plane.startup, args.nodes
    );
    playground
        .wait_for_pool(IMAGE_V1, Duration::from_secs(300))
        .await?;
    println!("export KUBECONFIG={kubeconfig}");
    eprintln!(
        "playground: every node attested {IMAGE_V1}. Try:\n  \
         kubectl get nodes,nodeattestations\n  \
         kubectl confidential status\n  \
         kubectl confidential upgrade --image {IMAGE_V2} --wait"
    );
    if args.demo {
        eprintln!("playground: demo: rolling the pool to {IMAGE_V2}");
        confidential_playground::upgrade(&playground.client, IMAGE_V2).await?;
        playground
            .wait_for_pool(IMAGE_V2, Duration::from_secs(600))
            .await?;
        eprintln!("playground: demo finished: every node runs {IMAGE_V2}");
        return Ok(());
    }
    eprintln!("playground: Ctrl-C stops everything");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("playground: stopping");
    drop(playground);
    Ok(())
}
