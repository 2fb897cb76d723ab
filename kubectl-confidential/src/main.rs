//! `kubectl-confidential`: the kubectl plugin through which an admin
//! initialises, verifies, upgrades, inspects and recovers a confidential
//! cluster.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

/// Manage confidential Kubernetes clusters.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl confidential",
    bin_name = "kubectl confidential",
    version,
    about
)]
struct Cli {
    /// Path to the kubeconfig file to use.
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace of the confidential components.
    #[arg(short = 'n', long, global = true, default_value = confidential_api::keys::NAMESPACE)]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Initialise a cluster: generate the master secret, install CRDs and components.
    Init,
    /// Verify the cluster (or one node) by remote attestation with a fresh nonce.
    Verify,
    /// Roll the fleet to a new node image or Kubernetes version.
    Upgrade,
    /// Show nodes, attestations and rollout progress.
    Status,
    /// Recover a cluster whose control-plane nodes all rebooted.
    Recover,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    bail!("`{:?}` is not implemented in this build yet", cli.command)
}
