//! Benchmark: a full attested join round trip against a real swtpm and a real
//! control plane, client side: aTLS handshake, TPM2_Quote bound to the
//! channel, `POST /v1/join` (gate verifies, reads policy and pool, builds the
//! credential challenge), TPM2_ActivateCredential, `POST /v1/join/activate`
//! (gate writes the bootstrap token Secret and the NodeAttestation). Prints
//! and writes p50/p99 (`target/bench/join-roundtrip.json`), with the TPM's
//! share measured separately (quote + activation alone).
//!
//! `cargo bench -p confidential-testenv --bench join_roundtrip`
//! (`CONFIDENTIAL_BENCH_RUNS=N`, default 40).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use confidential_api::{AttestationPolicy, NodeVersion};
use confidential_attestation::atls::{self, AtlsClient, PURPOSE_JOIN};
use confidential_attestation::evidence::{Evidence, EvidenceEnvelope};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::measurements::{Expected, MeasurementFile, Measurements};
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, JoinRequest, PATH_ACTIVATE, PATH_JOIN,
};
use confidential_attestation::tpm::issuer::TpmIssuer;
use confidential_testenv::node::{IMAGE_PCR, NodeImage};
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{TestCluster, crds_dir, install_crds, unique_name};
use confidential_webhook::join::{Gate, GateConfig, serve};
use kube::api::{Api, PostParams};
use p256::pkcs8::EncodePublicKey;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

async fn join_once(addr: &str, issuer: &Arc<TpmIssuer>, name: &str) -> Result<()> {
    let mut client = AtlsClient::connect(addr, atls::client_config(None)?).await?;
    let evidence = issuer
        .quote(client.nonce(PURPOSE_JOIN), vec![IMAGE_PCR])
        .await?;
    let request = JoinRequest {
        node_name: name.to_owned(),
        disk_uuid: "00000000-0000-4000-8000-00000000beef".into(),
        pool: None,
        evidence: EvidenceEnvelope::new(Evidence::Tpm(evidence)),
    };
    let (status, body) = client
        .post(PATH_JOIN, serde_json::to_vec(&request)?)
        .await?;
    if status.as_u16() != 202 {
        bail!("join answered {status}: {}", String::from_utf8_lossy(&body));
    }
    let challenge: JoinChallenge = serde_json::from_slice(&body)?;
    let credential = issuer.activate_credential(challenge.challenge).await?;
    let (status, body) = client
        .post(
            PATH_ACTIVATE,
            serde_json::to_vec(&ActivateRequest { credential })?,
        )
        .await?;
    if status.as_u16() != 200 {
        bail!(
            "activate answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
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
        .unwrap_or(40);
    let cluster = TestCluster::start().await?;
    let client = cluster.client.clone();
    install_crds(&client, &crds_dir()).await?;
    let ca = SwtpmCa::new()?;
    let image = NodeImage::new("bench-image");
    let tpm = Swtpm::start(&ca)?;
    tpm.measure_boot(IMAGE_PCR, &image.components)?;
    let key = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let file = MeasurementFile {
        image: image.name.clone(),
        measurements: Measurements::new(BTreeMap::from([(
            u8::try_from(IMAGE_PCR)?,
            Expected {
                expected: image.expected_pcr(),
                warn_only: false,
            },
        )]))?,
    };
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy: AttestationPolicy = serde_json::from_value(json!({
        "metadata": { "name": "bench" },
        "spec": {
            "evidenceKinds": ["Tpm"],
            "tpm": { "ekCaCertificates": [ca.issuer_pem()?] },
            "publishers": [{ "name": "p", "publicKey": public_pem }],
            "images": [{
                "image": image.name,
                "measurements": { IMAGE_PCR.to_string(): { "expected": hex::encode(image.expected_pcr()) } },
                "publisher": "p", "signature": file.sign(&key),
            }],
        }
    }))?;
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
    let gate = Arc::new(Gate::new(GateConfig {
        client: client.clone(),
        master: MasterSecret::new(vec![1; 32], vec![2; 16])?,
        api_server: cp.server.clone(),
        ca_pem: cp.ca_pem.clone(),
        policy: "bench".into(),
        default_pool: "bench".into(),
        token_ttl: Duration::from_secs(600),
    })?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let server = tokio::spawn(async move {
        let _ = serve(listener, gate).await;
    });

    let issuer = TpmIssuer::open(&tpm.tcti()).await?;
    // Warm up (first connections, API discovery).
    join_once(&addr, &issuer, &unique_name("warm")).await?;
    let mut joins = Vec::with_capacity(runs);
    let mut tpm_only = Vec::with_capacity(runs);
    for _ in 0..runs {
        let begun = Instant::now();
        join_once(&addr, &issuer, &unique_name("bench-node")).await?;
        joins.push(begun.elapsed());
        let begun = Instant::now();
        issuer.quote([0; 32], vec![IMAGE_PCR]).await?;
        tpm_only.push(begun.elapsed());
    }
    server.abort();
    joins.sort();
    tpm_only.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = json!({
        "benchmark": "join_roundtrip",
        "runs": runs,
        "join_p50_ms": ms(percentile(&joins, 0.5)),
        "join_p99_ms": ms(percentile(&joins, 0.99)),
        "join_max_ms": ms(joins[runs - 1]),
        "tpm_quote_p50_ms": ms(percentile(&tpm_only, 0.5)),
        "tpm_quote_p99_ms": ms(percentile(&tpm_only, 0.99)),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("join-roundtrip.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
