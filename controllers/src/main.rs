//! `confidential-controllers`: the node operator. Rolls node pools to the image
//! and Kubernetes version in `NodeVersion` (create, cordon, drain, replace),
//! tracks pending machines, approves kubelet CSRs of attested nodes and
//! replaces nodes whose attestation expired. Serves `/metrics` and `/healthz`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use confidential_controllers::etcd::{EtcdFlags, EtcdMembership, NO_ETCD_ACCESS};
use confidential_controllers::metrics::Metrics;
use confidential_controllers::operator::{self, Leadership};
use confidential_controllers::provider::{Provider, RecordOnly};
use confidential_controllers::reconciler::Settings;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProviderKind {
    /// Only record PendingNodes; machines are created outside (an admin, a
    /// Cluster API or autoscaler bridge watching PendingNodes).
    RecordOnly,
}

/// Node operator for confidential clusters.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of the metrics and health endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: std::net::SocketAddr,
    /// Machine provider.
    #[arg(long, value_enum, default_value = "record-only")]
    provider: ProviderKind,
    /// Namespace of the leader Lease.
    #[arg(long, default_value = confidential_api::keys::NAMESPACE)]
    leader_namespace: String,
    /// Disable leader election (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// Identity in the leader Lease (default: POD_NAME or hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Requeue interval while a rollout runs, milliseconds.
    #[arg(long, default_value_t = 2000)]
    busy_requeue_ms: u64,
    /// etcd client URLs (`https://host:2379`, comma-separated). With the
    /// other --etcd-* flags the operator removes a control-plane donor's etcd
    /// member (keeping quorum) before deleting it; without them it refuses to
    /// roll control-plane pools.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) the etcd servers' certificates are verified with.
    #[arg(long)]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd (kubeadm: apiserver-etcd-client.crt).
    #[arg(long)]
    etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert-file.
    #[arg(long)]
    etcd_key_file: Option<PathBuf>,
    /// Log format: `text` or `json` (one object per line).
    #[arg(long, default_value = "text", env = "CONFIDENTIAL_OPERATOR_LOG_FORMAT")]
    log_format: confidential_startup::LogFormat,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    confidential_startup::init("info", args.log_format);
    // Flag mistakes first, before any cluster access.
    let etcd = EtcdFlags {
        endpoints: args.etcd_endpoints.clone(),
        ca_file: args.etcd_ca_file.clone(),
        cert_file: args.etcd_cert_file.clone(),
        key_file: args.etcd_key_file.clone(),
    }
    .load()
    .context("etcd access (--etcd-* flags)")?
    .map(|settings| EtcdMembership::new(&settings))
    .transpose()
    .context("etcd client")?;
    if etcd.is_none() {
        tracing::warn!("{NO_ETCD_ACCESS}; worker pools roll as usual");
    }
    // No silent 429 retries: an eviction refused by a PDB is an answer the
    // drain must see at once.
    let client = confidential_startup::kube_client(None).await?;
    let metrics = Metrics::new();
    let provider: Arc<dyn Provider> = match args.provider {
        ProviderKind::RecordOnly => {
            Arc::new(etcd.map_or_else(RecordOnly::new, RecordOnly::with_etcd))
        }
    };
    let served = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = served.clone();
                async move { m.encode() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics server");
        }
    });
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("confidential-controllers-{}", std::process::id()));
    let leadership = (!args.no_leader_election).then(|| Leadership {
        namespace: args.leader_namespace,
        lease: "confidential-controllers".into(),
        identity,
        duration: Duration::from_secs(15),
    });
    let settings = Settings {
        busy_requeue: Duration::from_millis(args.busy_requeue_ms),
        ..Settings::default()
    };
    operator::run(client, provider, metrics, settings, leadership).await;
    anyhow::bail!("lost leadership; exiting so a restart competes again")
}
