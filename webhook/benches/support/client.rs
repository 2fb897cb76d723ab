//! The load generator's client side: TLS keep-alive connections posting
//! AdmissionReviews, latency samples kept whole so quantiles are real
//! (nearest rank over every sample, not histogram bucket bounds), the
//! server process's RSS and CPU time from `/proc`, and Pod creation through
//! the API server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};

use super::reviews::{DIGEST, pod_spec};

/// A TLS client trusting exactly `ca_pem`.
pub fn tls_trusting(ca_pem: &str) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )))
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn connect(addr: SocketAddr, tls: &tokio_rustls::TlsConnector) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One request on a fresh connection: `(status, body)`.
pub async fn request(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(u16, Vec<u8>)> {
    let mut sender = connect(addr, tls).await?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.ip().to_string())
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body.to_vec()))
}

/// `response.allowed` of an AdmissionReview answer.
pub fn allowed(review_json: &[u8]) -> Result<bool> {
    let review: Value = serde_json::from_slice(review_json).context("answer is not JSON")?;
    review["response"]["allowed"]
        .as_bool()
        .with_context(|| format!("answer without response.allowed: {review}"))
}

/// `response.status.message` of an AdmissionReview answer, if any.
pub fn message(review_json: &[u8]) -> String {
    serde_json::from_slice::<Value>(review_json)
        .ok()
        .and_then(|r| {
            r["response"]["status"]["message"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// What one connection saw during a load phase.
pub struct Load {
    pub latencies_ns: Vec<u64>,
    pub errors: u64,
    pub allowed: u64,
}

/// Posts `bodies` round-robin to `path` on one keep-alive connection until
/// `stop`, timing each review from send to the last byte of the answer.
pub async fn drive(
    addr: SocketAddr,
    path: String,
    tls: tokio_rustls::TlsConnector,
    bodies: Arc<Vec<Bytes>>,
    offset: usize,
    stop: Arc<AtomicBool>,
) -> Result<Load> {
    let mut sender = connect(addr, &tls).await?;
    let mut load = Load {
        latencies_ns: Vec::with_capacity(200_000),
        errors: 0,
        allowed: 0,
    };
    let mut i = offset;
    while !stop.load(Ordering::Relaxed) {
        let body = bodies[i % bodies.len()].clone();
        i += 1;
        let req = hyper::Request::post(path.as_str())
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let started = Instant::now();
        sender.ready().await?;
        match sender.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let body = resp.into_body().collect().await?.to_bytes();
                load.latencies_ns.push(started.elapsed().as_nanos() as u64);
                if !ok {
                    load.errors += 1;
                } else if says_allowed(&body) {
                    load.allowed += 1;
                }
            }
            Err(_) => {
                load.errors += 1;
                sender = connect(addr, &tls).await?;
            }
        }
    }
    Ok(load)
}

/// Cheap check of a compact JSON answer (both servers write no spaces).
fn says_allowed(body: &[u8]) -> bool {
    body.windows(14).any(|w| w == b"\"allowed\":true")
}

/// Nearest-rank quantile of sorted samples.
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// Count, mean and nearest-rank p50/p99/p99.9/max in microseconds. p99.9
/// is `null` below 1,000 samples and p99 below 100 (it would be the maximum).
pub fn summary_us(mut ns: Vec<u64>) -> Value {
    ns.sort_unstable();
    let mean = ns.iter().sum::<u64>() as f64 / ns.len().max(1) as f64;
    let q = |q: f64, min: usize| (ns.len() >= min).then(|| percentile(&ns, q) / 1000.0);
    json!({
        "count": ns.len(),
        "mean_us": mean / 1000.0,
        "p50_us": percentile(&ns, 0.50) / 1000.0,
        "p99_us": q(0.99, 100),
        "p999_us": q(0.999, 1000),
        "max_us": ns.last().copied().unwrap_or(0) as f64 / 1000.0,
    })
}

/// Current and peak resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU seconds `pid` has used (all its threads).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which ends with the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .map(|(u, s)| Ok::<_, std::num::ParseIntError>(u.parse::<u64>()? + s.parse::<u64>()?))
        .context("stat without utime/stime")??;
    Ok(ticks as f64 / clock_ticks_per_second()?)
}

fn clock_ticks_per_second() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ticks: f64 = text.trim().parse().context("getconf CLK_TCK output")?;
    if ticks <= 0.0 {
        bail!("CLK_TCK is {ticks}");
    }
    Ok(ticks)
}

/// Creates `count` admissible Pods in `ns` one after the other through the
/// API server, returning each create's latency.
pub async fn create_pods(client: &kube::Client, ns: &str, count: usize) -> Result<Vec<u64>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "e2e-", "labels": {"app": "e2e"}},
        "spec": pod_spec(&format!("nginx@{DIGEST}")),
    }))?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating a pod in {ns}"))?;
        out.push(started.elapsed().as_nanos() as u64);
    }
    Ok(out)
}

/// Creates namespace `name` with `labels` and the service account the pods name.
pub async fn namespace(client: &kube::Client, name: &str, labels: Value) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    api.create(&PostParams::default(), &ns).await?;
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let mut account = ServiceAccount::default();
    account.metadata.name = Some("web".into());
    sa.create(&PostParams::default(), &account).await?;
    Ok(())
}
