//! Load generator for the admission webhook.
//!
//! Starts a real control plane, runs the built `confidential-webhook` binary
//! as its own process (so its RSS is its own) against it, and then:
//!
//! 1. drives `POST /validate` directly over TLS keep-alive connections with a
//!    realistic mix of AdmissionReviews (Node heartbeat UPDATEs with the old
//!    object, Pod CREATEs, Deployment CREATEs) for a fixed time, and reports
//!    throughput, client-observed p50/p99/p99.9, the server-side latency
//!    histogram's p50/p99/p99.9 (from `/metrics`, bucket resolution), and the
//!    server's RSS (current and peak);
//! 2. creates Pods through the API server without and then with the webhook
//!    registered and reports both latency distributions and their ratio.
//!
//! Run: `cargo bench -p confidential-webhook --bench loadgen -- [--seconds N]
//! [--connections N] [--pods N] [--out FILE]`. Writes JSON to `--out`
//! (default `target/loadgen.json`) and prints it.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_testenv::{TestCluster, install_crypto_provider};
use hyper::body::Bytes;
use serde_json::{Value, json};

use support::client::{
    create_pods, drive, namespace, percentile, request, rss_kib, summary_us, tls_trusting,
};
use support::options::Options;
use support::ours::{install_policies, register_gate, start_gate, wait_enforced};
use support::reviews::review;

fn options() -> Result<Options> {
    Options::parse(Options {
        rounds: 1,
        seconds: 10,
        connections: 8,
        pods: 300,
        out: PathBuf::from("target/loadgen.json"),
    })
}

/// Sums the latency histogram buckets over all kinds: `le` -> count.
fn histogram(metrics: &str) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        if !line.starts_with("confidential_webhook_admission_review_duration_seconds_bucket") {
            continue;
        }
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        // Key in nanoseconds; +Inf sorts last.
        let key = le.parse::<f64>().map_or(u64::MAX, |s| (s * 1e9) as u64);
        *out.entry(key).or_insert(0.0) += count;
    }
    out
}

/// The bucket upper bound (µs) holding quantile `q` of the difference.
fn histogram_quantile(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>, q: f64) -> Value {
    let total = after.get(&u64::MAX).copied().unwrap_or(0.0)
        - before.get(&u64::MAX).copied().unwrap_or(0.0);
    for (le, count) in after {
        let diff = count - before.get(le).copied().unwrap_or(0.0);
        if diff >= q * total {
            return if *le == u64::MAX {
                json!("+Inf")
            } else {
                json!(*le as f64 / 1000.0)
            };
        }
    }
    Value::Null
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    install_crypto_provider();
    let opts = options()?;
    let cluster = TestCluster::start().await?;
    let client = cluster.client.clone();
    install_policies(&client).await?;
    let gate = start_gate(&cluster.kubeconfig).await?;
    let (addr, pid) = (gate.addr, gate.pid());
    let tls = tls_trusting(&gate.ca_pem)?;
    let metrics = |tls: tokio_rustls::TlsConnector| async move {
        let (_, body) = request(addr, &tls, "GET", "/metrics", Bytes::new()).await?;
        Ok::<_, anyhow::Error>(histogram(&String::from_utf8_lossy(&body)))
    };
    let result = async {
        let (idle_rss, _) = rss_kib(pid);

        // 1. Direct load.
        let kinds = ["Node", "Node", "Pod", "Pod", "Deployment"];
        let bodies: Arc<Vec<Bytes>> = Arc::new((0..1000).map(|i| Bytes::from(review(i, kinds[i % kinds.len()]))).collect());
        let sizes: Vec<usize> = kinds.iter().enumerate().map(|(i, _)| bodies[i].len()).collect();
        // Warm-up.
        let stop = Arc::new(AtomicBool::new(false));
        let warm: Vec<_> = (0..opts.connections).map(|c| tokio::spawn(drive(addr, "/validate".to_owned(), tls.clone(), bodies.clone(), c * 7, stop.clone()))).collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        for w in warm { w.await??; }
        let before = metrics(tls.clone()).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks: Vec<_> = (0..opts.connections).map(|c| tokio::spawn(drive(addr, "/validate".to_owned(), tls.clone(), bodies.clone(), c * 13, stop.clone()))).collect();
        tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        let (mut errors, mut allowed) = (0, 0);
        for t in tasks {
            let load = t.await??;
            latencies.extend(load.latencies_ns);
            errors += load.errors;
            allowed += load.allowed;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (rss, peak) = rss_kib(pid);
        let after = metrics(tls.clone()).await?;
        let total = latencies.len();
        if allowed as usize != total {
            bail!("{} of {total} reviews were not allowed; the load is meant to be admissible", total - allowed as usize);
        }
        let direct = json!({
            "connections": opts.connections,
            "seconds": elapsed,
            "reviews": total,
            "errors": errors,
            "throughput_per_s": total as f64 / elapsed,
            "mix": {"Node status UPDATE (with oldObject)": 2, "Pod CREATE": 2, "Deployment CREATE": 1},
            "body_bytes": {"Node": sizes[0], "Pod": sizes[2], "Deployment": sizes[4]},
            "client_observed": summary_us(latencies),
            "server_side_bucket_upper_bound_us": {
                "note": "bucket upper bounds of the server's histogram, not quantiles; client_observed holds the real quantiles",
                "p50": histogram_quantile(&before, &after, 0.50),
                "p99": histogram_quantile(&before, &after, 0.99),
                "p999": histogram_quantile(&before, &after, 0.999),
            },
            "rss_kib": {"idle": idle_rss, "after_load": rss, "peak": peak},
        });

        // 2. End to end through the API server.
        namespace(&client, "e2e-without", json!({})).await?;
        namespace(&client, "e2e-with", json!({})).await?;
        create_pods(&client, "e2e-without", 20).await?; // warm-up
        let without = create_pods(&client, "e2e-without", opts.pods).await?;
        register_gate(&client, &gate, None).await?;
        wait_enforced(&client, "e2e-with").await?;
        create_pods(&client, "e2e-with", 20).await?; // warm-up
        let with = create_pods(&client, "e2e-with", opts.pods).await?;
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let ratio = mean(&with) / mean(&without);
        let mut sorted_with = with.clone();
        sorted_with.sort_unstable();
        let mut sorted_without = without.clone();
        sorted_without.sort_unstable();
        let e2e = json!({
            "pods_each": opts.pods,
            "without_webhook": summary_us(without),
            "with_webhook": summary_us(with),
            "mean_ratio_with_over_without": ratio,
            "p50_ratio": percentile(&sorted_with, 0.5) / percentile(&sorted_without, 0.5),
            "p99_ratio": percentile(&sorted_with, 0.99) / percentile(&sorted_without, 0.99),
        });
        let (_, final_peak) = rss_kib(pid);
        Ok::<_, anyhow::Error>(json!({
            "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
            "note": "client, server and control plane share the same cores",
            "profile": if cfg!(debug_assertions) { "dev" } else { "bench (release)" },
            "direct": direct,
            "end_to_end_pod_create": e2e,
            "server_peak_rss_kib": final_peak,
        }))
    }
    .await;
    let report = result.with_context(|| format!("webhook log tail:\n{}", gate.log_tail(20)))?;
    drop(gate);
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, &text)?;
    println!("{text}");
    println!("written to {}", opts.out.display());
    Ok(())
}
