//! `confidential-webhook`: the cluster's gate. Serves the validating admission
//! endpoints, the attested join and rejoin endpoints, the cluster verify
//! endpoint, `/metrics` and health probes over TLS.

use anyhow::{Result, bail};
use clap::Parser;

/// The cluster's gate: admission webhook and attested join endpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve HTTPS on.
    #[arg(
        long,
        default_value = "0.0.0.0:8443",
        env = "CONFIDENTIAL_WEBHOOK_LISTEN"
    )]
    listen: std::net::SocketAddr,
    /// PEM serving certificate; reloaded when the file changes.
    #[arg(long, env = "CONFIDENTIAL_WEBHOOK_TLS_CERT")]
    tls_cert: std::path::PathBuf,
    /// PEM private key of the serving certificate.
    #[arg(long, env = "CONFIDENTIAL_WEBHOOK_TLS_KEY")]
    tls_key: std::path::PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    bail!(
        "serving on {} is not implemented in this build yet",
        args.listen
    )
}
