//! `confidential-webhook`: the cluster's gate. Serves the validating admission
//! endpoint, `/metrics` and health probes over TLS (see the library for the
//! pieces); the attested join endpoint and continuous re-attestation of the
//! joined nodes run beside it in the same process.

use anyhow::{Context, Result};
use clap::Parser;
use confidential_webhook::metrics::Metrics;
use confidential_webhook::reattest::{ReattestMetrics, Reattester};
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
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    webhook: WebhookArgs,
    #[command(flatten)]
    join: confidential_webhook::join::JoinArgs,
    #[command(flatten)]
    reattest: confidential_webhook::reattest::ReattestArgs,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text", env = "CONFIDENTIAL_WEBHOOK_LOG_FORMAT")]
    log_format: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    // rustls needs its crypto provider chosen before any TLS config is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if cli.join.join_listen.is_none() {
        return server::run(cli.webhook).await;
    }
    // Admission and join share one client (and `--kubeconfig`); if either
    // listener stops, the process exits so its supervisor restarts it.
    let client = server::client(cli.webhook.kubeconfig.as_deref()).await?;
    // The gate that writes NodeAttestations also keeps them current.
    let reattest_metrics = ReattestMetrics::default();
    let metrics = Metrics::with_more(|registry| reattest_metrics.register(registry));
    let (_webhook, running) =
        server::start_with_metrics(client.clone(), &cli.webhook, metrics).await?;
    let reattester = Reattester::new(
        client.clone(),
        cli.join.policy.clone(),
        cli.reattest,
        reattest_metrics,
    );
    let _reattest = AbortOnDrop(tokio::spawn(reattester.run()));
    let join = tokio::spawn(confidential_webhook::join::run(cli.join, client));
    tokio::select! {
        served = running.task => served.context("server task")?.context("serving HTTPS"),
        joined = join => {
            joined.context("join task")?.context("join listener stopped")?;
            anyhow::bail!("join listener stopped")
        }
    }
}
