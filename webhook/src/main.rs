//! `confidential-webhook`: the cluster's gate. Serves the validating admission
//! endpoint, `/metrics` and health probes over TLS (see the library for the
//! pieces); the attested join endpoint runs beside it in the same process.

use anyhow::Result;
use clap::Parser;
use confidential_webhook::server::{self, WebhookArgs};

/// The cluster's gate: admission webhook and attested join endpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    webhook: WebhookArgs,
    #[command(flatten)]
    join: confidential_webhook::join::JoinArgs,
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
    tokio::spawn(confidential_webhook::join::run_in_cluster(cli.join));
    server::run(cli.webhook).await
}
