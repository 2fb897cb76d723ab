//! The join gaps an attacker review found, each performed on real components
//! (real control plane, swtpm TPMs, the real bootstrapper, the gate's join
//! endpoint over aTLS) by a test that fails if the attack works: a name held
//! by an attestation without a Node, two concurrent joins for one name, a
//! rejoin asking for another disk's key, a deleted attestation still in a
//! stale cache, and unauthenticated callers (attempt limit, body bound,
//! internal errors without their text, no API call before the evidence
//! checks out), plus readiness when the watches fail.

mod join_env;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::NodeAttestation;
use confidential_attestation::atls::{self, AtlsClient};
use confidential_attestation::protocol::{JoinResponse, PATH_JOIN, PATH_REJOIN};
use confidential_attestation::tpm::issuer::TpmIssuer;
use confidential_testenv::node::IMAGE_PCR;
use confidential_testenv::{eventually, unique_name};
use confidential_webhook::join::{AttemptLimit, Gate, MAX_JOIN_BODY_BYTES};
use confidential_webhook::state::{Snapshot, Stores};
use join_env::*;
use kube::api::{Api, DeleteParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_joins_for_one_name_get_exactly_one_token() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("node");
    let (a, b) = (env.boot(&name)?, env.boot(&name)?);
    let (ia, ib) = (
        TpmIssuer::open(&a.swtpm.tcti()).await?,
        TpmIssuer::open(&b.swtpm.tcti()).await?,
    );
    // Both verify against the same cache (no attestation yet) and are
    // challenged before either activates.
    let first = start_join(&env.addr, PATH_JOIN, &ia, |ev| join_request(&name, ev)).await?;
    let second = start_join(&env.addr, PATH_JOIN, &ib, |ev| join_request(&name, ev)).await?;
    assert_eq!((first.status, second.status), (202, 202));
    let (ra, rb) = tokio::join!(first.activate(&ia), second.activate(&ib));
    let (ra, rb) = (ra?, rb?);
    let outcomes = [ra, rb];
    let won = outcomes.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(won, 1, "exactly one machine gets the name: {outcomes:?}");
    let (status, body) = outcomes
        .iter()
        .find(|(s, _)| *s != 200)
        .context("a loser")?;
    assert_refused(*status, body, "name-taken");
    let (tokens, attestations) = env.snapshot().await?;
    assert_eq!(tokens.len(), 1, "one token for one name");
    assert_eq!(attestations.len(), 1);
    assert_eq!(env.gate.metrics.refused("name-taken"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_gets_only_the_key_of_its_own_recorded_disk() -> Result<()> {
    let env = Env::start().await?;
    let name = unique_name("node");
    let node = env.boot(&name)?;
    let issuer = TpmIssuer::open(&node.swtpm.tcti()).await?;
    let (status, body) = lib_join(&env.addr, &issuer, &name, |_| {}).await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let joined: JoinResponse = serde_json::from_slice(&body)?;
    let att = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    assert_eq!(att.spec.disk_uuid.as_deref(), Some(DISK_UUID));
    env.wait_cached(&name).await?;
    let before = env.snapshot().await?;

    // The same machine rejoins naming another disk: no key, nothing changes.
    let victim_disk = "5e1f0000-0000-4000-8000-0000000000ff";
    let (status, body) = start_join(&env.addr, PATH_REJOIN, &issuer, |ev| {
        join_request_for_disk(&name, victim_disk, ev)
    })
    .await?
    .activate(&issuer)
    .await?;
    assert_refused(status, &body, "disk-mismatch");
    assert!(
        serde_json::from_slice::<JoinResponse>(&body).is_err(),
        "no secrets in a refusal"
    );
    assert_eq!(env.snapshot().await?, before);
    let unchanged = Api::<NodeAttestation>::all(env.client()).get(&name).await?;
    assert_eq!(unchanged.spec.disk_uuid.as_deref(), Some(DISK_UUID));

    // Its own disk, asked in another case: the same key back.
    let (status, body) = start_join(&env.addr, PATH_REJOIN, &issuer, |ev| {
        join_request_for_disk(&name, &DISK_UUID.to_ascii_uppercase(), ev)
    })
    .await?
    .activate(&issuer)
    .await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rejoined: JoinResponse = serde_json::from_slice(&body)?;
    assert_eq!(rejoined.disk_key, joined.disk_key);

    // Another machine naming the first one's disk UUID under its own name
    // joins, but derives a different key: keys are bound to the identity.
    let other_name = unique_name("node");
    let other = env.boot(&other_name)?;
    let other_issuer = TpmIssuer::open(&other.swtpm.tcti()).await?;
    let (status, body) = lib_join(&env.addr, &other_issuer, &other_name, |_| {}).await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let theirs: JoinResponse = serde_json::from_slice(&body)?;
    assert_ne!(
        theirs.disk_key, joined.disk_key,
        "another machine got this disk's key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_attestation_is_not_honoured_from_a_stale_cache() -> Result<()> {
    let mut env = Env::start().await?;
    let name = unique_name("node");
    let node = env.joined(&name).await?;
    env.wait_cached(&name).await?;
    // A gate whose caches froze with the attestation in them (the extreme of
    // a lagging watch), while the admin revokes the machine.
    let (stale, _writers) = Stores::fixed(Snapshot {
        attestations: env
            .stores
            .attestations
            .state()
            .iter()
            .map(|a| (**a).clone())
            .collect(),
        attestation_policies: env
            .stores
            .attestation_policies
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect(),
        node_versions: env
            .stores
            .node_versions
            .state()
            .iter()
            .map(|v| (**v).clone())
            .collect(),
        image_policies: vec![],
    });
    let stale_gate = Arc::new(Gate::new(env.config(env.client(), stale)?)?);
    let stale_addr = env.serve_gate(stale_gate.clone()).await?;
    Api::<NodeAttestation>::all(env.client())
        .delete(&name, &DeleteParams::default())
        .await?;
    std::fs::remove_file(node.disk_key_file())?;
    let before = env.snapshot().await?;

    let out = node
        .run_bootstrapper(std::slice::from_ref(&stale_addr), &["--rejoin"])
        .await?;
    assert!(!out.success, "a revoked machine rejoined:\n{}", out.log);
    assert!(out.log.contains("attestation-changed"), "{}", out.log);
    assert!(
        !node.disk_key_file().exists(),
        "the revoked machine got its disk key"
    );
    assert_eq!(
        env.snapshot().await?,
        before,
        "the attestation was not re-created"
    );
    assert_eq!(stale_gate.metrics.refused("attestation-changed"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_attempts_are_limited_per_source_address() -> Result<()> {
    let env = Env::start_full(
        |_| {},
        AttemptLimit {
            burst: 3,
            per_minute: 1,
        },
    )
    .await?;
    let before = env.snapshot().await?;
    // Cheap garbage costs an attempt like real evidence does; connections
    // do not reset the count.
    for attempt in 0..3 {
        let mut client = AtlsClient::connect(&env.addr, atls::client_config(None)?).await?;
        let (status, body) = client.post(PATH_JOIN, b"{}".to_vec()).await?;
        expect_refusal(status.as_u16(), &body, 400, "malformed-request")
            .with_context(|| format!("attempt {attempt}"))?;
    }
    let mut client = AtlsClient::connect(&env.addr, atls::client_config(None)?).await?;
    let (status, body) = client.post(PATH_REJOIN, b"{}".to_vec()).await?;
    let refused = expect_refusal(status.as_u16(), &body, 429, "rate-limited")?;
    assert!(refused.message.contains("retry in"), "{}", refused.message);
    // A real machine from the same address is limited too.
    let node = env.boot(&unique_name("node"))?;
    env.refused(&node, &[], "rate-limited").await?;
    assert_eq!(env.snapshot().await?, before);
    assert_eq!(env.gate.metrics.refused("rate-limited"), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused() -> Result<()> {
    let env = Env::start().await?;
    let before = env.snapshot().await?;
    let mut client = AtlsClient::connect(&env.addr, atls::client_config(None)?).await?;
    let huge = format!(
        r#"{{"nodeName": "x", "diskUuid": "{}"}}"#,
        "a".repeat(MAX_JOIN_BODY_BYTES)
    );
    let (status, body) = client.post(PATH_JOIN, huge.into_bytes()).await?;
    expect_refusal(status.as_u16(), &body, 413, "body-too-large")?;
    assert_eq!(env.snapshot().await?, before);
    Ok(())
}

/// A gate whose API client points at nothing: every refusal must still come
/// out right (the decision made no API call), and the one join whose
/// evidence checks out fails at the write with a generic answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_api_call_before_the_evidence_and_no_internal_text_in_answers() -> Result<()> {
    let mut env = Env::start().await?;
    let unreachable = kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse()?))?;
    let cut_off = Arc::new(Gate::new(env.config(unreachable, env.stores.clone())?)?);
    let addr = env.serve_gate(cut_off.clone()).await?;
    let before = env.snapshot().await?;

    let node = env.boot(&unique_name("node"))?;
    let issuer = TpmIssuer::open(&node.swtpm.tcti()).await?;
    // Tampered, replayed, wrong-PCR evidence: refused from the caches alone.
    let (status, body) = lib_join(&addr, &issuer, &node.name, |ev| {
        let i = ev.attest.len() / 2;
        ev.attest[i] ^= 0x01;
    })
    .await?;
    assert_refused(status, &body, "quote-signature");
    let (status, body) = lib_join(&addr, &issuer, &node.name, |ev| {
        ev.pcrs.insert(IMAGE_PCR, vec![0; 32]);
    })
    .await?;
    assert_refused(status, &body, "pcr-digest");
    let (status, body) = lib_join(&addr, &issuer, "Not_A_Name", |_| {}).await?;
    expect_refusal(status, &body, 400, "bad-node-name")?;

    // Genuine evidence: the write fails inside the gate.
    let (status, body) = lib_join(&addr, &issuer, &node.name, |_| {}).await?;
    let refused = expect_refusal(status, &body, 503, "internal")?;
    assert!(
        refused.message.contains("correlation id"),
        "{}",
        refused.message
    );
    for internal in ["127.0.0.1:1", "onnect", "NodeAttestation", "error", "tcp"] {
        assert!(
            !refused.message.contains(internal),
            "internal detail {internal:?} leaked: {}",
            refused.message
        );
    }
    assert_eq!(env.snapshot().await?, before);
    assert_eq!(cut_off.metrics.refused("internal"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_drops_when_the_watches_fail_for_longer_than_the_bound() -> Result<()> {
    let mut env = Env::start().await?;
    let stores = Stores::new();
    let (stores, writers) = (stores.0.with_stale_after(Duration::from_secs(3)), stores.1);
    let watch = tokio::spawn(confidential_webhook::state::watch(env.client(), writers));
    stores.wait_ready().await;
    assert!(stores.is_ready());
    let gate = Arc::new(Gate::new(env.config(env.client(), stores.clone())?)?);
    let addr = env.serve_gate(gate).await?;

    // Cut the gate off: the API server dies.
    let cp = env
        .cluster
        .control_plane
        .as_ref()
        .context("needs a private control plane")?;
    let pid = cp
        .processes()
        .iter()
        .find(|p| p.name() == "kube-apiserver")
        .and_then(|p| p.pid())
        .context("kube-apiserver pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let watching = stores.clone();
    eventually("readiness to drop", Duration::from_secs(120), || {
        let ready = watching.is_ready();
        async move { Ok((!ready).then_some(())) }
    })
    .await?;
    // And joins are answered "not ready" instead of from a frozen view.
    let node = env.boot(&unique_name("node"))?;
    let issuer = TpmIssuer::open(&node.swtpm.tcti()).await?;
    let (status, body) = lib_join(&addr, &issuer, &node.name, |_| {}).await?;
    expect_refusal(status, &body, 503, "not-ready")?;
    watch.abort();
    Ok(())
}
