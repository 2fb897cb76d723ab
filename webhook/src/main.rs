//! `confidential-webhook`: the cluster's gate. Serves the validating admission
//! endpoint, `/metrics` and health probes over TLS (see the library for the
//! pieces); the attested join endpoint and continuous re-attestation of the
//! joined nodes run beside it in the same process, reading the same watch
//! caches. `confidential-webhook gate-pin` prints the pin of the gate
//! identity, for the install and node launch configurations.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use confidential_webhook::join::{self, JoinArgs};
use confidential_webhook::metrics::Metrics;
use confidential_webhook::reattest::{ReattestArgs, ReattestMetrics, Reattester};
use confidential_webhook::server::{self, WebhookArgs};

/// Stops a background task when the gate returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The cluster's gate: admission webhook and attested join endpoint.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    webhook: WebhookArgs,
    #[command(flatten)]
    join: JoinArgs,
    #[command(flatten)]
    reattest: ReattestArgs,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text", env = "CONFIDENTIAL_WEBHOOK_LOG_FORMAT")]
    log_format: confidential_startup::LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prints the hex SHA-256 pin of the gate identity derived from the
    /// master secret: what nodes pass as `--gate-pin`.
    GatePin(GatePinArgs),
}

#[derive(clap::Args, Debug)]
struct GatePinArgs {
    /// JSON file `{"secret": "<hex>", "salt": "<hex>"}`: the cluster master secret.
    #[arg(
        long = "join-master-secret-file",
        env = "CONFIDENTIAL_JOIN_MASTER_SECRET_FILE"
    )]
    master_secret_file: PathBuf,
}

/// `confidential-webhook gate-pin ...` parsed on its own: clap would still
/// demand the server's required flags next to a subcommand's own flags.
#[derive(Parser, Debug)]
#[command(name = "confidential-webhook gate-pin", version)]
struct GatePinCli {
    #[command(flatten)]
    args: GatePinArgs,
}

#[tokio::main]
async fn main() -> Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "gate-pin") {
        let pin = GatePinCli::parse_from(&argv[1..]);
        println!("{}", join::gate_pin(&pin.args.master_secret_file)?);
        return Ok(());
    }
    let cli = Cli::parse();
    if let Some(Command::GatePin(args)) = &cli.command {
        println!("{}", join::gate_pin(&args.master_secret_file)?);
        return Ok(());
    }
    confidential_startup::init("info", cli.log_format);
    if cli.join.join_listen.is_none() {
        return server::run(cli.webhook).await;
    }
    // Admission and join share one client (and `--kubeconfig`) and one set
    // of watch caches; if either listener stops, the process exits so its
    // supervisor restarts it.
    let client = confidential_startup::kube_client(cli.webhook.kubeconfig.as_deref()).await?;
    // The gate that writes NodeAttestations also keeps them current.
    let reattest_metrics = ReattestMetrics::default();
    let metrics = Metrics::with_more(|registry| reattest_metrics.register(registry));
    let (webhook, running) =
        server::start_with_metrics(client.clone(), &cli.webhook, metrics).await?;
    let reattester = Reattester::new(
        client.clone(),
        cli.join.policy.clone(),
        cli.reattest,
        reattest_metrics,
    );
    let _reattest = AbortOnDrop(tokio::spawn(reattester.run()));
    let join = tokio::spawn(join::run(cli.join, client, webhook.stores.clone()));
    tokio::select! {
        served = running.task => served.context("server task")?.context("serving HTTPS"),
        joined = join => {
            joined.context("join task")?.context("join listener stopped")?;
            anyhow::bail!("join listener stopped")
        }
    }
}
