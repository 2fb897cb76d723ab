//! The HTTPS server: axum over rustls (ring provider, installed by the
//! caller), serving `POST /validate`, the optional `POST /mutate` (pins
//! tag-only images to mapped digests), `/healthz`, `/readyz` and `/metrics`.
//!
//! The serving certificate and key are polled and reloaded when their
//! *contents* change (Secret volumes swap a symlink, which inotify on the file
//! misses); a reload only affects new handshakes, so requests in flight and
//! keep-alive connections are not disturbed. A pair that fails to load keeps
//! the previous one in service and is retried on the next poll.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use kube::Client;

use crate::handler::{Reply, Webhook};
use crate::metrics::Metrics;
use crate::state::{self, Stores};

/// Flags of the admission server (flattened into the binary's CLI).
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(
        long,
        default_value = "0.0.0.0:8443",
        env = "CONFIDENTIAL_WEBHOOK_LISTEN"
    )]
    pub listen: SocketAddr,
    /// PEM serving certificate (chain); reloaded when its contents change.
    #[arg(long, env = "CONFIDENTIAL_WEBHOOK_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the serving certificate; reloaded with it.
    #[arg(long, env = "CONFIDENTIAL_WEBHOOK_TLS_KEY")]
    pub tls_key: PathBuf,
    /// How often to check the certificate files for new contents.
    #[arg(long, default_value = "10s", value_parser = confidential_api::duration::parse_flag, env = "CONFIDENTIAL_WEBHOOK_TLS_RELOAD_INTERVAL")]
    pub tls_reload_interval: Duration,
    /// Largest accepted request body, in bytes. A review carries the object
    /// and the old object (etcd allows 1.5 MiB each), plus the envelope.
    #[arg(long, default_value_t = 8 * 1024 * 1024, env = "CONFIDENTIAL_WEBHOOK_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Kubeconfig to watch the cluster with; in-cluster or $KUBECONFIG when unset.
    #[arg(long, env = "CONFIDENTIAL_WEBHOOK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces (comma-separated) where images are not checked while no
    /// ImagePolicy covers them; everywhere else unmeasured images are refused
    /// unless an ImagePolicy says otherwise. Include the gate's own namespace.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kube-system,kube-node-lease,kube-public,confidential-system",
        env = "CONFIDENTIAL_WEBHOOK_EXEMPT_NAMESPACES"
    )]
    pub exempt_namespaces: Vec<String>,
}

/// The HTTP routes, without TLS.
pub fn router(webhook: Webhook, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(webhook)
}

async fn validate(State(webhook): State<Webhook>, body: Bytes) -> Response {
    match webhook.review(&body) {
        Reply::Review(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Reply::BadRequest(message) => (StatusCode::BAD_REQUEST, message).into_response(),
    }
}

async fn mutate(State(webhook): State<Webhook>, body: Bytes) -> Response {
    match webhook.mutate(&body) {
        Reply::Review(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Reply::BadRequest(message) => (StatusCode::BAD_REQUEST, message).into_response(),
    }
}

async fn readyz(State(webhook): State<Webhook>) -> Response {
    if webhook.stores.is_ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(webhook): State<Webhook>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        webhook.metrics.render(),
    )
        .into_response()
}

/// Reads a certificate/key pair; `None` while the files are being swapped
/// (the certificate changed between two reads) or are unreadable.
async fn read_pair(cert: &Path, key: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
    let first = tokio::fs::read(cert).await.ok()?;
    let key_pem = tokio::fs::read(key).await.ok()?;
    let second = tokio::fs::read(cert).await.ok()?;
    (first == second).then_some((first, key_pem))
}

/// Loads the initial TLS config and keeps it in sync with the files.
pub async fn tls_config(cert: PathBuf, key: PathBuf, interval: Duration) -> Result<RustlsConfig> {
    let (cert_pem, key_pem) = read_pair(&cert, &key)
        .await
        .with_context(|| format!("reading {} and {}", cert.display(), key.display()))?;
    let config = RustlsConfig::from_pem(cert_pem.clone(), key_pem.clone())
        .await
        .with_context(|| format!("loading TLS pair {} / {}", cert.display(), key.display()))?;
    let reloading = config.clone();
    tokio::spawn(async move {
        let mut current = (cert_pem, key_pem);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(pair) = read_pair(&cert, &key).await else {
                continue;
            };
            if pair == current {
                continue;
            }
            match reloading
                .reload_from_pem(pair.0.clone(), pair.1.clone())
                .await
            {
                Ok(()) => {
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                    current = pair;
                }
                Err(e) => {
                    tracing::warn!(cert = %cert.display(), error = %e, "new certificate does not load; keeping the previous one");
                }
            }
        }
    });
    Ok(config)
}

/// A running server: its address and a handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub handle: Handle<SocketAddr>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `webhook` over TLS on `listen` (port 0 picks a free port).
pub async fn serve(webhook: Webhook, args: &WebhookArgs) -> Result<Running> {
    let tls = tls_config(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.tls_reload_interval,
    )
    .await?;
    let handle = Handle::new();
    let app = router(webhook, args.max_body_bytes);
    // Admission responses are small writes; without TCP_NODELAY, Nagle's
    // algorithm and delayed ACKs add latency to every review.
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    let server = axum_server::bind(args.listen)
        .acceptor(acceptor)
        .handle(handle.clone());
    let task = tokio::spawn(async move { server.serve(app.into_make_service()).await });
    let addr = handle
        .listening()
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(%addr, "serving admission reviews");
    Ok(Running { addr, handle, task })
}

/// Starts the watches and the server; returns once both are running.
pub async fn start(client: Client, args: &WebhookArgs) -> Result<(Webhook, Running)> {
    start_with_metrics(client, args, Metrics::new()).await
}

/// [`start`] serving `metrics` (built with [`Metrics::with_more`] when other
/// parts of the gate add theirs).
pub async fn start_with_metrics(
    client: Client,
    args: &WebhookArgs,
    metrics: Metrics,
) -> Result<(Webhook, Running)> {
    let (stores, writers) = Stores::new();
    tokio::spawn(state::watch(client, writers));
    let ready = stores.clone();
    tokio::spawn(async move {
        ready.wait_ready().await;
        tracing::info!("caches synced; ready");
    });
    let webhook =
        Webhook::new(stores, metrics).with_exempt_namespaces(args.exempt_namespaces.clone());
    let running = serve(webhook.clone(), args).await?;
    Ok((webhook, running))
}

/// Runs the webhook until the server stops.
pub async fn run(args: WebhookArgs) -> Result<()> {
    let client = confidential_startup::kube_client(args.kubeconfig.as_deref()).await?;
    let (_webhook, running) = start(client, &args).await?;
    running
        .task
        .await
        .context("server task")?
        .context("serving HTTPS")
}
