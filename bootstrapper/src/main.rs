//! `confidential-bootstrapper`: runs on each node at boot. Collects evidence,
//! joins the cluster over attested TLS, hands the state disk key over (LUKS2
//! via `cryptsetup` when a device is given), extends a PCR with the cluster ID
//! so verifiers can tell which cluster the node belongs to, then runs
//! `kubeadm join` (or, with `--kubelet-bootstrap-kubeconfig`, writes the
//! bootstrap kubeconfig for a kubelet started by someone else: the simulated
//! nodes of the test environment use that). With `--attest-listen` it stays up
//! and serves `/v1/attest` over aTLS for `kubectl confidential verify --node`.
//!
//! Exit status: 0 joined; 1 refused or failed after all attempts. Refusals are
//! logged with the gate's reason.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use clap::Parser;
use confidential_attestation::atls::{
    self, AtlsClient, AtlsPeer, PURPOSE_JOIN, PURPOSE_NODE_ATTEST,
};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope};
use confidential_attestation::protocol::{
    ActivateRequest, AttestResponse, JoinChallenge, JoinRequest, JoinResponse, PATH_ACTIVATE,
    PATH_ATTEST, PATH_JOIN, PATH_REJOIN, Refused,
};
use confidential_attestation::tpm::issuer::{TpmIssuer, extend_pcr_blocking};
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// Boot agent of a confidential node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Join endpoints of the gate (`host:port`), tried in order.
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<String>,
    /// Name the node joins under.
    #[arg(long)]
    node_name: String,
    /// TPM to use (TCTI): `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`.
    #[arg(long, default_value = "device:/dev/tpmrm0", env = "CONFIDENTIAL_TCTI")]
    tcti: String,
    /// PCRs (SHA-256 bank) to quote; must cover every PCR the policy expects.
    #[arg(long, value_delimiter = ',', default_values_t = [0u32, 1, 2, 3, 4, 5, 6, 7, 8, 9])]
    pcrs: Vec<u32>,
    /// NodeVersion (pool) this node boots for; the gate's default when absent.
    #[arg(long)]
    pool: Option<String>,
    /// UUID of the state disk (its key is derived from it).
    #[arg(long)]
    disk_uuid: String,
    /// Block device of the state disk: formatted/opened with LUKS2 via cryptsetup.
    #[arg(long)]
    state_device: Option<PathBuf>,
    /// Without a device, write the state disk key here (mode 0600).
    #[arg(long)]
    disk_key_file: Option<PathBuf>,
    /// PCR extended with the cluster ID after joining.
    #[arg(long, default_value_t = 15)]
    cluster_id_pcr: u32,
    /// Ask `/v1/rejoin` (a rebooting node that is still attested).
    #[arg(long)]
    rejoin: bool,
    /// Instead of `kubeadm join`, write a kubelet bootstrap kubeconfig here
    /// (the kubelet is started by someone else, e.g. the test environment).
    #[arg(long)]
    kubelet_bootstrap_kubeconfig: Option<PathBuf>,
    /// Expected SHA-256 of the gate's TLS key (hex); any key when unset, as
    /// the node's trust in the gate then comes from the CA pin it receives.
    #[arg(long)]
    gate_pin: Option<String>,
    /// Join attempts over all endpoints before giving up (0: forever).
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
    /// File keeping the AK (TPM-wrapped, useless elsewhere) across reboots,
    /// so the machine keeps its identity for rejoin; a fresh AK per boot
    /// when unset.
    #[arg(long, default_value = "/var/lib/confidential/ak.blob")]
    ak_state: Option<PathBuf>,
    /// After joining, serve `/v1/attest` over aTLS on this address.
    #[arg(long)]
    attest_listen: Option<std::net::SocketAddr>,
}

/// A refusal from the gate (not retried on the same endpoint... but the
/// policy may change, so the loop retries with backoff anyway).
#[derive(Debug)]
struct GateRefused(Refused);

impl std::fmt::Display for GateRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.0.reason, self.0.message)
    }
}
impl std::error::Error for GateRefused {}

fn refused(status: StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<Refused>(body) {
        Ok(r) => GateRefused(r).into(),
        Err(_) => anyhow::anyhow!("gate answered {status}: {}", String::from_utf8_lossy(body)),
    }
}

async fn join_once(args: &Args, tpm: &Arc<TpmIssuer>, endpoint: &str) -> Result<JoinResponse> {
    let pin = match &args.gate_pin {
        Some(hex_pin) => Some(
            <[u8; 32]>::try_from(hex::decode(hex_pin).context("--gate-pin is not hex")?)
                .map_err(|_| anyhow::anyhow!("--gate-pin must be 32 bytes"))?,
        ),
        None => None,
    };
    let mut client = AtlsClient::connect(endpoint, atls::client_config(pin)?).await?;
    let evidence = tpm
        .quote(client.nonce(PURPOSE_JOIN), args.pcrs.clone())
        .await?;
    let request = JoinRequest {
        node_name: args.node_name.clone(),
        disk_uuid: args.disk_uuid.clone(),
        pool: args.pool.clone(),
        evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence)),
    };
    let path = if args.rejoin { PATH_REJOIN } else { PATH_JOIN };
    let (status, body) = client.post(path, serde_json::to_vec(&request)?).await?;
    let body = match status {
        StatusCode::OK => body,
        StatusCode::ACCEPTED => {
            let challenge: JoinChallenge = serde_json::from_slice(&body)?;
            let credential = tpm.activate_credential(challenge.challenge).await?;
            let (status, body) = client
                .post(
                    PATH_ACTIVATE,
                    serde_json::to_vec(&ActivateRequest { credential })?,
                )
                .await?;
            if status != StatusCode::OK {
                return Err(refused(status, &body));
            }
            body
        }
        other => return Err(refused(other, &body)),
    };
    Ok(serde_json::from_slice(&body)?)
}

async fn join(args: &Args, tpm: &Arc<TpmIssuer>) -> Result<JoinResponse> {
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut last = None;
        for endpoint in &args.endpoints {
            match join_once(args, tpm, endpoint).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    tracing::warn!(%endpoint, attempt, error = %format!("{e:#}"), "join failed");
                    last = Some(e);
                }
            }
        }
        if args.max_attempts != 0 && attempt >= args.max_attempts {
            return Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoint")));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

/// LUKS2 on `device` with `key`: format when it is not LUKS yet, then open
/// as `/dev/mapper/state`.
fn setup_luks(device: &Path, key: &[u8]) -> Result<()> {
    let is_luks = Command::new("cryptsetup")
        .arg("isLuks")
        .arg(device)
        .status()
        .context("running cryptsetup")?
        .success();
    let run = |args: &[&str]| -> Result<()> {
        let mut child = Command::new("cryptsetup")
            .args(args)
            .arg(device)
            .args(if args[0] == "open" {
                &["state"][..]
            } else {
                &[][..]
            })
            .stdin(Stdio::piped())
            .spawn()
            .context("running cryptsetup")?;
        child
            .stdin
            .take()
            .context("cryptsetup stdin")?
            .write_all(key)?;
        let status = child.wait()?;
        if !status.success() {
            bail!("cryptsetup {} failed: {status}", args[0]);
        }
        Ok(())
    };
    if !is_luks {
        run(&[
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--key-file",
            "-",
        ])?;
    }
    run(&["open", "--key-file", "-"])
}

fn bootstrap_kubeconfig(resp: &JoinResponse) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: kubelet-bootstrap\n  user:\n    token: {}\n\
         contexts:\n- name: bootstrap\n  context:\n    cluster: cluster\n    user: kubelet-bootstrap\ncurrent-context: bootstrap\n",
        resp.api_server,
        B64.encode(&resp.ca_pem),
        resp.bootstrap_token
    )
}

async fn serve_attest(
    listen: std::net::SocketAddr,
    tpm: Arc<TpmIssuer>,
    node: String,
    pcrs: Vec<u32>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving /v1/attest");
    atls::serve(listener, atls::server_config()?, move |peer: AtlsPeer| {
        let tpm = tpm.clone();
        let node = node.clone();
        let pcrs = pcrs.clone();
        atls::service_fn(move |req| {
            let tpm = tpm.clone();
            let node = node.clone();
            let pcrs = pcrs.clone();
            async move {
                if req.uri().path() != PATH_ATTEST {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"not found")));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    return Ok(r);
                }
                let answer = match tpm.quote(peer.nonce(PURPOSE_NODE_ATTEST), pcrs).await {
                    Ok(ev) => serde_json::to_vec(&AttestResponse {
                        node_name: node,
                        evidence: EvidenceEnvelope::new(Evidence::Tpm(ev)),
                    })
                    .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                Ok(match answer {
                    Ok(body) => Response::new(Full::new(Bytes::from(body))),
                    Err(e) => {
                        let mut r = Response::new(Full::new(Bytes::from(e)));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        r
                    }
                })
            }
        })
    })
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let tpm = match &args.ak_state {
        Some(path) => TpmIssuer::open_persistent(&args.tcti, path).await,
        None => TpmIssuer::open(&args.tcti).await,
    }
    .context("opening the TPM")?;
    let resp = join(&args, &tpm).await?;
    tracing::info!(node = %resp.node_name, cluster_id = %resp.cluster_id, "joined");

    let cluster_id =
        <[u8; 32]>::try_from(hex::decode(&resp.cluster_id).context("cluster ID is not hex")?)
            .map_err(|_| anyhow::anyhow!("cluster ID must be 32 bytes"))?;
    let (tcti, pcr) = (args.tcti.clone(), args.cluster_id_pcr);
    tokio::task::spawn_blocking(move || extend_pcr_blocking(&tcti, pcr, &cluster_id)).await??;

    match (&args.state_device, &args.disk_key_file) {
        (Some(device), _) => setup_luks(device, &resp.disk_key)?,
        (None, Some(path)) => write_private(path, &resp.disk_key)?,
        (None, None) => tracing::info!("no state device: disk key not used"),
    }

    if !args.rejoin {
        match &args.kubelet_bootstrap_kubeconfig {
            Some(path) => write_private(path, bootstrap_kubeconfig(&resp).as_bytes())?,
            None => {
                let endpoint = resp
                    .api_server
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_owned();
                let status = Command::new("kubeadm")
                    .args(["join", &endpoint, "--token", &resp.bootstrap_token])
                    .args(["--discovery-token-ca-cert-hash", &resp.ca_pin])
                    .args(["--node-name", &args.node_name])
                    .status()
                    .context("running kubeadm join")?;
                if !status.success() {
                    bail!("kubeadm join failed: {status}");
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({ "joined": resp.node_name, "clusterId": resp.cluster_id })
    );
    if let Some(listen) = args.attest_listen {
        serve_attest(listen, tpm, args.node_name.clone(), args.pcrs.clone()).await?;
    }
    Ok(())
}
