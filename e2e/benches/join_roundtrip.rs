//! Benchmark: a full attested join round trip against a real swtpm and a real
//! control plane, split into its phases as the client sees them: the aTLS
//! handshake, TPM2_Quote bound to the channel, `POST /v1/join` (the gate
//! reads its caches, decides, builds the credential challenge),
//! TPM2_ActivateCredential, `POST /v1/join/activate` (the gate binds the
//! verdict, writes the NodeAttestation and the bootstrap token). The gate's
//! pure decision (`decide`: evidence verification against the policy) is
//! also timed alone, in-process, on the same request and nonce.
//!
//! Writes p50/p90/p99/max per phase to `e2e/benches/results/join-roundtrip.json`.
//! p99 is only reported with at least 100 samples (nearest rank).
//!
//! `cargo bench -p confidential-e2e --bench join_roundtrip`
//! (`CONFIDENTIAL_BENCH_RUNS=N`, default 300).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_api::{AttestationPolicy, NodeVersion};
use confidential_attestation::atls::{self, AtlsClient, PURPOSE_JOIN};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, JoinRequest, PATH_ACTIVATE, PATH_JOIN,
};
use confidential_attestation::tpm::issuer::TpmIssuer;
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::node::{IMAGE_PCR, NodeImage};
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{TestCluster, crds_dir, install_crds, unique_name};
use confidential_webhook::join::decide::{Inputs, Mode, decide};
use confidential_webhook::join::{AttemptLimit, Gate, GateConfig, serve};
use confidential_webhook::state::{self, Stores};
use confidential_webhook::verify::TrustCache;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const PHASES: [&str; 7] = [
    "handshake",
    "quote",
    "join_request",
    "activation",
    "activate_request",
    "total",
    "decide",
];

#[derive(Default)]
struct Samples {
    by_phase: BTreeMap<&'static str, Vec<Duration>>,
}

impl Samples {
    fn add(&mut self, phase: &'static str, d: Duration) {
        self.by_phase.entry(phase).or_default().push(d);
    }
}

/// The gate's inputs for the in-process decision timing.
struct DecideCtx {
    stores: Stores,
    trust: TrustCache,
}

async fn join_once(
    addr: &str,
    issuer: &Arc<TpmIssuer>,
    name: &str,
    samples: &mut Samples,
    ctx: &DecideCtx,
) -> Result<()> {
    let begun = Instant::now();
    let mut client = AtlsClient::connect(addr, atls::client_config(None)?).await?;
    let handshake = begun.elapsed();
    let t = Instant::now();
    let nonce = client.nonce(PURPOSE_JOIN);
    let evidence = issuer.quote(nonce, vec![IMAGE_PCR]).await?;
    let quote = t.elapsed();
    let request = JoinRequest {
        node_name: name.to_owned(),
        disk_uuid: "00000000-0000-4000-8000-00000000beef".into(),
        pool: None,
        attestation_endpoint: None,
        evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence)),
    };
    let t = Instant::now();
    let (status, body) = client
        .post(PATH_JOIN, serde_json::to_vec(&request)?)
        .await?;
    let join_request = t.elapsed();
    if status.as_u16() != 202 {
        bail!("join answered {status}: {}", String::from_utf8_lossy(&body));
    }
    let challenge: JoinChallenge = serde_json::from_slice(&body)?;
    let t = Instant::now();
    let credential = issuer.activate_credential(challenge.challenge).await?;
    let activation = t.elapsed();
    let t = Instant::now();
    let (status, body) = client
        .post(
            PATH_ACTIVATE,
            serde_json::to_vec(&ActivateRequest { credential })?,
        )
        .await?;
    let activate_request = t.elapsed();
    let total = begun.elapsed();
    if status.as_u16() != 200 {
        bail!(
            "activate answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // The same decision, alone and in-process (the name is free in the
    // request's view: no existing attestation is passed).
    let policy = ctx
        .stores
        .attestation_policies
        .get(&ObjectRef::new("bench"));
    let pool = ctx.stores.node_versions.get(&ObjectRef::new("bench"));
    let t = Instant::now();
    let decided = decide(&Inputs {
        mode: Mode::Join,
        request: &request,
        nonce: &nonce,
        policy_name: "bench",
        policy: policy.as_ref(),
        pool_name: "bench",
        pool: pool.as_deref(),
        existing: None,
        trust: &ctx.trust,
    });
    let decide_time = t.elapsed();
    decided.map_err(|r| anyhow::anyhow!("in-process decision refused: {r:?}"))?;
    for (phase, d) in [
        ("handshake", handshake),
        ("quote", quote),
        ("join_request", join_request),
        ("activation", activation),
        ("activate_request", activate_request),
        ("total", total),
        ("decide", decide_time),
    ] {
        samples.add(phase, d);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let runs: usize = std::env::var("CONFIDENTIAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let cluster = TestCluster::start().await?;
    let client = cluster.client.clone();
    install_crds(&client, &crds_dir()).await?;
    let ca = SwtpmCa::new()?;
    let image = NodeImage::new("bench-image");
    let tpm = Swtpm::start(&ca)?;
    tpm.measure_boot(IMAGE_PCR, &image.components)?;
    let publisher = Publisher::random("p");
    let mut spec = fixtures::policy_spec(
        Some(&ca.issuer_pem()?),
        &[&publisher],
        vec![publisher.entry(&fixtures::node_image_file(&image))],
    );
    spec.reattestation_interval = None;
    let policy = AttestationPolicy::new("bench", spec);
    Api::<AttestationPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    let version: NodeVersion = serde_json::from_value(json!({
        "metadata": { "name": "bench" },
        "spec": { "image": image.name, "kubernetesVersion": "v1.35.0", "replicas": 1 }
    }))?;
    Api::<NodeVersion>::all(client.clone())
        .create(&PostParams::default(), &version)
        .await?;
    let cp = cluster
        .control_plane
        .as_ref()
        .context("needs a private control plane")?;
    let (stores, writers) = Stores::new();
    let watch = tokio::spawn(state::watch(client.clone(), writers));
    stores.wait_ready().await;
    while stores
        .attestation_policies
        .get(&ObjectRef::new("bench"))
        .is_none()
        || stores.node_versions.get(&ObjectRef::new("bench")).is_none()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gate = Arc::new(Gate::new(GateConfig {
        client: client.clone(),
        stores: stores.clone(),
        master: MasterSecret::new(vec![1; 32], vec![2; 16])?,
        api_server: cp.server.clone(),
        ca_pem: cp.ca_pem.clone(),
        policy: "bench".into(),
        default_pool: "bench".into(),
        token_ttl: Duration::from_secs(600),
        attempts: AttemptLimit {
            burst: u32::MAX,
            per_minute: u32::MAX,
        },
    })?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let server = tokio::spawn(async move {
        if let Err(e) = serve(listener, gate).await {
            eprintln!("join server stopped: {e:#}");
        }
    });

    let issuer = TpmIssuer::open(&tpm.tcti()).await?;
    let ctx = DecideCtx {
        stores,
        trust: TrustCache::default(),
    };
    // Warm up (first connections, API discovery, the image-trust cache).
    join_once(
        &addr,
        &issuer,
        &unique_name("warm"),
        &mut Samples::default(),
        &ctx,
    )
    .await?;
    let mut samples = Samples::default();
    for _ in 0..runs {
        join_once(
            &addr,
            &issuer,
            &unique_name("bench-node"),
            &mut samples,
            &ctx,
        )
        .await?;
    }
    server.abort();
    watch.abort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut phases = serde_json::Map::new();
    for phase in PHASES {
        let mut v = samples.by_phase.remove(phase).context("samples")?;
        v.sort();
        phases.insert(
            phase.to_owned(),
            json!({
                "p50_ms": ms(percentile(&v, 0.5)),
                "p90_ms": ms(percentile(&v, 0.9)),
                "p99_ms": (v.len() >= 100).then(|| ms(percentile(&v, 0.99))),
                "max_ms": ms(v[v.len() - 1]),
                "samples": v.len(),
            }),
        );
    }
    let report = json!({
        "benchmark": "join_roundtrip",
        "runs": runs,
        "profile": if cfg!(debug_assertions) { "dev" } else { "bench (release)" },
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "phases": phases,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("join-roundtrip.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
