//! `kubectl-confidential`: the kubectl plugin through which an admin
//! initialises, verifies, upgrades, inspects and recovers a confidential
//! cluster, and through which image publishers compute and sign measurements.
//!
//! Installed on `PATH` (by Krew or by hand) it runs as `kubectl confidential`.
//! It takes kubectl's global flags (`--kubeconfig`, `--context`, `-n`) and
//! prints `-o json|yaml` where kubectl would.

mod measurements;
mod output;
mod preflight;
mod status;
mod upgrade;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

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
    /// Roll a node pool to a new node image or Kubernetes version.
    Upgrade(upgrade::UpgradeArgs),
    /// Show node pools, attestations and pending machines.
    Status(status::StatusArgs),
    /// Recover a cluster whose control-plane nodes all rebooted.
    Recover,
    /// Compute, sign and verify node-image measurement files.
    #[command(subcommand)]
    Measurements(measurements::MeasurementsCommand),
}

/// Connects with kubectl's flags: `--kubeconfig` (else `KUBECONFIG`, else
/// `~/.kube/config`, else in-cluster) and `--context`.
async fn client(cli: &Cli) -> Result<Client> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).with_context(|| {
                format!("reading kubeconfig {}; check --kubeconfig", path.display())
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    }
    .context("loading the kubeconfig; pass --kubeconfig or --context, or set KUBECONFIG")?;
    Client::try_from(config).context("building the Kubernetes client")
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match &cli.command {
        Command::Measurements(command) => measurements::run(command),
        Command::Status(args) => status::run(&client(&cli).await?, args).await,
        Command::Upgrade(args) => upgrade::run(&client(&cli).await?, args).await,
        other => bail!(
            "`kubectl confidential {}` is not available in this version yet; see `kubectl confidential --help`",
            format!("{other:?}").to_lowercase()
        ),
    }
}
