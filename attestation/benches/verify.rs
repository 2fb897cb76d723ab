//! Evidence verification cost (DESIGN.md targets: TPM quote < 1 ms p99,
//! SNP report with chain < 10 ms p99). Criterion gives the median with its
//! confidence interval; each bench also prints p50/p99 over individually
//! timed calls, since Criterion does not report tail latency.
//!
//! `cargo bench -p confidential-attestation --bench verify`

use std::hint::black_box;
use std::time::{Duration, Instant};

use confidential_attestation::evidence::{SnpEvidence, TpmEvidence};
use confidential_attestation::snp::launch::{SnpLaunchPolicy, check_launch};
use confidential_attestation::snp::{SnpTrust, Tcb, verify_report};
use confidential_attestation::tpm::{parse_certificates, verify_quote};
use criterion::{Criterion, criterion_group, criterion_main};

fn tail(name: &str, n: usize, mut f: impl FnMut()) {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort_unstable();
    let p = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)];
    eprintln!(
        "{name}: n={n} p50={:?} p99={:?} max={:?}",
        p(0.50),
        p(0.99),
        samples[n - 1]
    );
    // One JSON file per measurement under benches/results/ (criterion keeps
    // its own under target/criterion/).
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let result = serde_json::json!({
        "benchmark": name,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "samples": n,
        "p50_us": micros(p(0.50)),
        "p99_us": micros(p(0.99)),
        "max_us": micros(samples[n - 1]),
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(&result).unwrap_or_default(),
        )
    });
    if let Err(error) = written {
        eprintln!("{name}: could not write its JSON result: {error}");
    }
}

fn tpm(c: &mut Criterion) {
    let ev: TpmEvidence =
        serde_json::from_str(include_str!("../testdata/tpm/quote.json")).expect("fixture");
    let cas = parse_certificates(include_str!("../testdata/tpm/ek-ca.pem")).expect("CA");
    let nonce = [0x11u8; 32];
    verify_quote(&ev, &nonce, &cas).expect("fixture verifies");
    tail("tpm_quote_verify", 2000, || {
        black_box(verify_quote(black_box(&ev), &nonce, &cas).is_ok());
    });
    c.bench_function("tpm_quote_verify", |b| {
        b.iter(|| verify_quote(black_box(&ev), black_box(&nonce), &cas).is_ok())
    });
}

fn snp(c: &mut Criterion) {
    let ev = SnpEvidence {
        report: hex::decode(include_str!("../testdata/snp/report_milan.hex").trim()).expect("hex"),
        vcek: include_bytes!("../testdata/snp/vcek_milan.der").to_vec(),
    };
    let trust = SnpTrust {
        ark_pem: include_bytes!("../testdata/snp/ark_milan.pem").to_vec(),
        ask_pem: include_bytes!("../testdata/snp/ask_milan.pem").to_vec(),
        minimum_tcb: Tcb::default(),
    };
    verify_report(&ev, &trust).expect("sample verifies");
    tail("snp_report_chain_verify", 300, || {
        black_box(verify_report(black_box(&ev), &trust).is_ok());
    });
    c.bench_function("snp_report_chain_verify", |b| {
        b.iter(|| verify_report(black_box(&ev), &trust).is_ok())
    });
    // What the gate does per SNP node: chain, signature, TCB, and the
    // image's signed launch values (measurement, guest policy, VMPL).
    let launch = SnpLaunchPolicy {
        measurement: verify_report(&ev, &trust).expect("verifies").measurement,
        vmpl: 0,
        allow_smt: true,
        allow_migration_agent: false,
    };
    let full = |ev: &SnpEvidence| {
        verify_report(ev, &trust).is_ok_and(|report| check_launch(&report, &launch).is_ok())
    };
    assert!(full(&ev), "sample matches its launch values");
    tail("snp_report_chain_launch_verify", 300, || {
        black_box(full(black_box(&ev)));
    });
    c.bench_function("snp_report_chain_launch_verify", |b| {
        b.iter(|| full(black_box(&ev)))
    });
}

criterion_group!(benches, tpm, snp);
criterion_main!(benches);
