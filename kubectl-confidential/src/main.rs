//! `kubectl-confidential`: the kubectl plugin through which an admin
//! initialises, verifies, upgrades, inspects and recovers a confidential
//! cluster, and through which image publishers compute and sign measurements.
//!
//! Installed on `PATH` (by Krew or by hand) it runs as `kubectl confidential`.
//! It takes kubectl's connection flags (see [`connection`]) and prints
//! `-o json|yaml` where kubectl would.

mod completion;
mod connection;
mod init;
mod measurements;
mod output;
mod preflight;
mod recover;
mod status;
mod upgrade;
mod verify;
mod version;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Manage confidential Kubernetes clusters.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl confidential",
    bin_name = "kubectl confidential",
    version,
    about
)]
pub struct Cli {
    #[command(flatten)]
    connection: connection::ConnectionArgs,
    /// Namespace of the confidential components (the gate and the node
    /// operator); used by `version`. Our resources are cluster-scoped.
    #[arg(short = 'n', long, global = true, default_value = confidential_api::keys::NAMESPACE)]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Initialise a cluster: generate the master secret, install CRDs, the
    /// gate, the operator, the policy and the node pool.
    Init(Box<init::Args>),
    /// Verify nodes by remote attestation over aTLS against local trusted measurements.
    Verify(verify::VerifyArgs),
    /// Roll a node pool to a new node image or Kubernetes version.
    Upgrade(upgrade::UpgradeArgs),
    /// Show node pools, attestations and pending machines.
    Status(status::StatusArgs),
    /// Recover a node that cannot reach its gate: verify it over aTLS
    /// against local trusted measurements, then send it its keys.
    Recover(recover::RecoverArgs),
    /// Compute, sign, verify, fetch and add node-image measurement files.
    #[command(subcommand)]
    Measurements(measurements::MeasurementsCommand),
    /// Print the plugin's version and, when the cluster is reachable, the
    /// installed gate, operator and CRD versions.
    Version(version::VersionArgs),
    /// Print a shell completion script (bash, zsh or fish).
    Completion(completion::CompletionArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    confidential_startup::install_crypto_provider();
    // kubectl's plugin completion: the words are not ours to parse (they may
    // be half-typed flags), so this bypasses clap.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(completion::COMPLETE_COMMAND) {
        return completion::run_complete(&args[2..]);
    }
    let cli = Cli::parse();
    // kube's client logs every failed request at ERROR; the plugin reports
    // each failure itself, with what to do next, so those stay off unless
    // RUST_LOG asks for them.
    confidential_startup::init(
        "warn,kube_client=off",
        confidential_startup::LogFormat::Text,
    );
    match &cli.command {
        Command::Measurements(command) => measurements::run(&cli.connection, command).await,
        Command::Status(args) => status::run(&cli.connection.client().await?, args).await,
        Command::Upgrade(args) => upgrade::run(&cli.connection.client().await?.client, args).await,
        Command::Verify(args) => verify::run(&cli.connection, args).await,
        Command::Recover(args) => recover::run(args).await,
        Command::Version(args) => version::run(&cli.connection, &cli.namespace, args).await,
        Command::Completion(args) => completion::run(args),
        Command::Init(args) => init::run(&cli.connection, &cli.namespace, args).await,
    }
}
