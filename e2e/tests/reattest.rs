//! Continuous re-attestation end to end, on real components: a real control
//! plane, the real gate binary (join listener + re-attestation sweeps),
//! swtpm machines joined through the real bootstrapper, which keeps serving
//! `/v1/attest` over aTLS on the address its kubelet stand-in reports as the
//! Node's InternalIP.
//!
//! Each test asserts what the gate wrote (expiry, status, verdict,
//! conditions), that failures never move the expiry, that a revocation
//! comes only after the grace period, and the Events and metrics users see.

mod support;

use std::time::Duration;

use anyhow::Result;
use confidential_api::{NodeAttestation, Verdict};
use confidential_testenv::unique_name;
use support::reattest::{Env, Timing, node_ip};

/// Sweeps every second, revokes after 3 s of failures.
const FAST: Timing = Timing {
    period: "1s",
    grace: "3s",
    concurrency: 4,
};

/// Generous bound for anything the gate does within a few sweeps (the
/// machine is shared; this is not a timing assertion).
const WAIT: Duration = Duration::from_secs(120);

fn condition(att: &NodeAttestation, type_: &str) -> Option<(String, String)> {
    att.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    })
}

fn failures(att: &NodeAttestation) -> i32 {
    att.status.as_ref().map_or(0, |s| s.consecutive_failures)
}

fn last_verified(att: &NodeAttestation) -> Option<jiff::Timestamp> {
    att.status
        .as_ref()
        .and_then(|s| s.last_verified.as_ref())
        .map(|t| t.0)
}

/// Asserts the revocation came no earlier than `grace` after the first
/// failure, and that failures never moved the expiry past the last success.
fn assert_revoked_after_grace(att: &NodeAttestation, grace: Duration, reason: &str) {
    assert_eq!(att.spec.verdict, Verdict::Revoked);
    let status = att
        .status
        .as_ref()
        .expect("a revoked attestation has a status");
    let first = status
        .first_failure
        .as_ref()
        .expect("first failure recorded")
        .0;
    let revoked = status
        .revoked_at
        .as_ref()
        .expect("revocation time recorded")
        .0;
    assert!(
        revoked.duration_since(first) >= jiff::SignedDuration::try_from(grace).expect("small"),
        "revoked at {revoked}, only {} after the first failure at {first}",
        revoked.duration_since(first)
    );
    assert!(status.consecutive_failures >= 2, "{status:?}");
    assert_eq!(status.last_failure_reason.as_deref(), Some(reason));
    assert_eq!(
        condition(att, "Revoked"),
        Some(("True".into(), "GracePeriodExceeded".into()))
    );
    assert_eq!(
        condition(att, "Verified"),
        Some(("False".into(), reason.to_owned()))
    );
}

/// The value of `reattestation_total{result}` on the gate's `/metrics`.
fn metric(text: &str, result: &str) -> f64 {
    let prefix = format!("confidential_webhook_reattestation_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_is_reverified_then_a_distrusted_pcr_fails_it_and_it_is_revoked() -> Result<()> {
    let env = Env::start(FAST).await?;
    let name = unique_name("node");
    let joined = env.join(&name, node_ip(0), true).await?;
    let at_join = env.attestation(&name).await?;

    // Re-verified over aTLS: the expiry moves forward, status says so.
    let renewed = env
        .wait_for(&name, "a successful re-verification", WAIT, |a| {
            last_verified(a).is_some() && a.spec.expires_at.0 > at_join.spec.expires_at.0
        })
        .await?;
    assert_eq!(renewed.spec.verdict, Verdict::Trusted);
    assert_eq!(
        condition(&renewed, "Verified"),
        Some(("True".into(), "Verified".into()))
    );
    assert_eq!(failures(&renewed), 0);
    assert_eq!(renewed.spec.ak_fingerprint, at_join.spec.ak_fingerprint);
    // It keeps being renewed on every sweep, not once.
    let first_success = last_verified(&renewed).expect("set");
    let again = env
        .wait_for(&name, "a second re-verification", WAIT, |a| {
            last_verified(a).is_some_and(|t| t > first_success)
        })
        .await?;
    assert!(again.spec.expires_at.0 >= renewed.spec.expires_at.0);

    // The admin no longer trusts the image's PCR value: the next sweep
    // records the failure, then the gate revokes after the grace period.
    env.distrust_image_pcr().await?;
    let failing = env
        .wait_for(&name, "the PCR mismatch to be recorded", WAIT, |a| {
            failures(a) >= 1
        })
        .await?;
    assert_eq!(
        failing
            .status
            .as_ref()
            .and_then(|s| s.last_failure_reason.clone()),
        Some("PcrMismatch".into())
    );
    let revoked = env
        .wait_for(&name, "the revocation", WAIT, |a| {
            a.spec.verdict == Verdict::Revoked
        })
        .await?;
    assert_revoked_after_grace(&revoked, Duration::from_secs(3), "PcrMismatch");
    // Failures never renewed: the expiry is the one of the last success.
    let last_success = last_verified(&revoked).expect("the earlier successes stay recorded");
    assert_eq!(
        revoked.spec.expires_at.0,
        last_success + jiff::SignedDuration::from_hours(24)
    );
    assert_eq!(revoked.spec.ak_fingerprint, at_join.spec.ak_fingerprint);

    // A revoked attestation is not swept again: it stays as revoked.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = env.attestation(&name).await?;
    assert_eq!(later.spec.verdict, Verdict::Revoked);
    assert_eq!(later.status, revoked.status);

    // Users see it: Events on the NodeAttestation and the Node, metrics.
    let events = env
        .wait_for_events("NodeAttestation", &name, "AttestationRevoked")
        .await?;
    assert!(
        events.iter().any(|r| r == "ReattestationPcrMismatch"),
        "{events:?}"
    );
    let node_events = env
        .wait_for_events("Node", &name, "AttestationRevoked")
        .await?;
    assert!(!node_events.is_empty());
    let metrics = env.metrics()?;
    assert!(metric(&metrics, "verified") >= 2.0, "{metrics}");
    assert!(metric(&metrics, "failed") >= 1.0, "{metrics}");
    assert!(metric(&metrics, "revoked") >= 1.0, "{metrics}");
    assert!(
        metrics
            .contains("confidential_webhook_reattestation_failures_total{reason=\"pcr-mismatch\"}"),
        "{metrics}"
    );
    drop(joined);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_node_is_revoked_after_the_grace_period() -> Result<()> {
    let env = Env::start(FAST).await?;
    let name = unique_name("node");
    let mut joined = env.join(&name, node_ip(1), true).await?;
    let verified = env
        .wait_for(&name, "a successful re-verification", WAIT, |a| {
            last_verified(a).is_some()
        })
        .await?;

    // The machine stops answering (its attestation endpoint is gone).
    joined.attest.stop(Duration::from_secs(5));
    let failing = env
        .wait_for(&name, "the unreachable node's failure", WAIT, |a| {
            failures(a) >= 1
        })
        .await?;
    assert_eq!(
        failing
            .status
            .as_ref()
            .and_then(|s| s.last_failure_reason.clone()),
        Some("Unreachable".into())
    );
    let revoked = env
        .wait_for(&name, "the revocation", WAIT, |a| {
            a.spec.verdict == Verdict::Revoked
        })
        .await?;
    assert_revoked_after_grace(&revoked, Duration::from_secs(3), "Unreachable");
    // No answer never renews: the expiry is the one of the last success.
    assert_eq!(
        revoked.spec.expires_at.0,
        last_verified(&revoked).expect("set") + jiff::SignedDuration::from_hours(24)
    );
    assert!(last_verified(&revoked) >= last_verified(&verified));
    let events = env
        .wait_for_events("NodeAttestation", &name, "AttestationRevoked")
        .await?;
    assert!(
        events.iter().any(|r| r == "ReattestationUnreachable"),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_machine_answering_for_the_node_fails_on_its_ak() -> Result<()> {
    // A long grace: the swapped machine needs a few seconds to boot and
    // join, and the failure it causes must be seen before any revocation.
    let env = Env::start(Timing {
        grace: "10m",
        ..FAST
    })
    .await?;
    let name = unique_name("node");
    let ip = node_ip(2);
    let mut original = env.join(&name, ip, true).await?;
    let at_join = env
        .wait_for(&name, "a successful re-verification", WAIT, |a| {
            last_verified(a).is_some()
        })
        .await?;

    // The machine is swapped: another genuine machine (own swtpm with a
    // trusted EK, booted from the trusted image, joined under its own name)
    // now answers on the node's address. Its evidence verifies against the
    // policy, bound to the gate's connection, but it is not the AK recorded
    // for this node.
    original.attest.stop(Duration::from_secs(5));
    let other_name = unique_name("swapped");
    let swapped = env.join(&other_name, ip, false).await?;
    let failing = env
        .wait_for(&name, "the AK mismatch", WAIT, |a| {
            a.status
                .as_ref()
                .and_then(|s| s.last_failure_reason.as_deref())
                == Some("AkMismatch")
        })
        .await?;
    assert_eq!(
        failing.spec.verdict,
        Verdict::Trusted,
        "within the grace period"
    );
    assert_eq!(failing.spec.ak_fingerprint, at_join.spec.ak_fingerprint);
    assert_eq!(
        failing.spec.expires_at.0,
        last_verified(&failing).expect("set") + jiff::SignedDuration::from_hours(24),
        "a failure must not renew"
    );
    assert_eq!(
        condition(&failing, "Verified"),
        Some(("False".into(), "AkMismatch".into()))
    );
    let other = env.attestation(&other_name).await?;
    assert_ne!(other.spec.ak_fingerprint, at_join.spec.ak_fingerprint);
    let events = env
        .wait_for_events("NodeAttestation", &name, "ReattestationAkMismatch")
        .await?;
    assert!(!events.is_empty());
    drop(swapped);
    Ok(())
}
