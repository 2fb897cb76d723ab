//! `confidential-controllers`: the node operator. Rolls node pools to the image
//! and Kubernetes version in `NodeVersion` (create, cordon, drain, replace),
//! tracks pending machines, approves kubelet CSRs of attested nodes and expires
//! attestations.

use anyhow::{Result, bail};
use clap::Parser;

/// Node operator for confidential clusters.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of the metrics and health endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: std::net::SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    bail!(
        "the controllers are not implemented in this build yet (metrics on {})",
        args.metrics_listen
    )
}
