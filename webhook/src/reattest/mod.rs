//! Continuous re-attestation: the gate re-verifies every attested node on
//! its aTLS attestation endpoint and renews, records the failure of, or
//! revokes its NodeAttestation. Without it every attestation lapses after the
//! policy's `reattestationInterval` and every node would be replaced.
//!
//! One sweep, every `--reattest-period` (±10 % jitter, so replicas started
//! together drift apart): read the AttestationPolicy in force *now*, list the
//! NodeAttestations that are `Trusted` and not verified within half a
//! period, and for each (at most `--reattest-concurrency` at a time): connect
//! over aTLS to the node's endpoint, `POST /v1/attest`, and check the answer
//! ([`trust::PolicyInForce::check`]: fresh channel-bound nonce, trust roots
//! and signed measurements of the policy in force, the AK recorded at join).
//! What that does to the NodeAttestation is decided by the pure
//! [`decision::decide`]: success moves `spec.expiresAt` to
//! `now + reattestationInterval` and sets `status.lastVerified`; a failure
//! counts in `status.consecutiveFailures` from `status.firstFailure` with
//! the `Verified=False` condition and an Event on the NodeAttestation and
//! the Node; failures (or no answer) for longer than `--reattest-grace` set
//! `spec.verdict: Revoked`, which the admission rule and the operator read
//! as not valid.
//!
//! Several gate replicas: every write carries the `resourceVersion` the
//! sweep read (optimistic concurrency), so two replicas racing on one node
//! cannot both apply a decision (the second gets a conflict and drops its
//! result), and the half-period freshness filter makes the later replica
//! skip nodes the other just verified. No leader election is needed; the
//! cost of a race is one duplicate verification.
//!
//! Where a node is reached: the `spec.attestationEndpoint` recorded at join
//! when present, else the Node's `InternalIP` and `--reattest-port`. The
//! address is never trusted: whoever answers must quote with the recorded AK.

mod args;
pub mod decision;
mod failure;
pub mod metrics;
pub mod trust;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confidential_api::{AttestationPolicy, NodeAttestation, Verdict};
use confidential_attestation::atls::{self, AtlsClient, PURPOSE_NODE_ATTEST};
use confidential_attestation::protocol::{AttestResponse, PATH_ATTEST};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use rand::Rng as _;
use serde_json::json;

pub use self::args::ReattestArgs;
use self::decision::Decision;
pub use self::failure::{Failure, SweepError};
pub use self::metrics::ReattestMetrics;
use self::trust::PolicyInForce;

/// Largest `/v1/attest` answer read from a node (a TPM quote with its EK
/// certificate is a few KiB; a hostile node must not make the gate buffer
/// without bound).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Interval when the policy sets none (the join path's default too).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Everything a sweep needs.
#[derive(Clone)]
pub struct Reattester {
    client: Client,
    policy: String,
    args: ReattestArgs,
    metrics: ReattestMetrics,
    recorder: Recorder,
}

/// Counts of one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub due: usize,
    pub verified: usize,
    pub failed: usize,
    pub revoked: usize,
    pub conflicts: usize,
    pub elapsed: Duration,
}

impl Reattester {
    /// A re-attester enforcing the AttestationPolicy `policy`.
    pub fn new(
        client: Client,
        policy: String,
        args: ReattestArgs,
        metrics: ReattestMetrics,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "confidential-webhook".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            policy,
            args,
            metrics,
            recorder,
        }
    }

    /// Sweeps every period (±10 % jitter) until the task is dropped. A
    /// sweep that cannot run is logged and retried on the next period.
    pub async fn run(self) {
        if self.args.period.is_zero() {
            tracing::info!("re-attestation off (--reattest-period 0s)");
            return;
        }
        // A first sweep soon after start (replicas started together still
        // spread out), then one per period.
        let mut wait = jittered(self.args.period.min(Duration::from_secs(50)) / 10);
        loop {
            tokio::time::sleep(wait).await;
            match self.sweep().await {
                Ok(report) => tracing::info!(
                    due = report.due,
                    verified = report.verified,
                    failed = report.failed,
                    revoked = report.revoked,
                    conflicts = report.conflicts,
                    elapsed_ms = u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
                    "re-attestation sweep finished"
                ),
                Err(e) => tracing::warn!(error = %e, "re-attestation sweep did not run"),
            }
            wait = jittered(self.args.period);
        }
    }

    /// One sweep over every due NodeAttestation.
    pub async fn sweep(&self) -> Result<SweepReport, SweepError> {
        let started = Instant::now();
        let policy = Api::<AttestationPolicy>::all(self.client.clone())
            .get_opt(&self.policy)
            .await?
            .ok_or_else(|| SweepError::NoPolicy(self.policy.clone()))?;
        let in_force = Arc::new(PolicyInForce::new(&policy.spec).map_err(|message| {
            SweepError::BadPolicy {
                name: self.policy.clone(),
                message,
            }
        })?);
        let interval = policy
            .spec
            .reattestation_interval
            .as_deref()
            .and_then(confidential_api::duration::parse_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_INTERVAL);
        let now = jiff::Timestamp::now();
        let due: Vec<NodeAttestation> = Api::<NodeAttestation>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|a| decision::is_due(a, now, self.args.period / 2))
            .collect();
        let nodes: HashMap<String, Node> = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name.clone().map(|name| (name, n)))
            .collect();
        let nodes = Arc::new(nodes);
        let tls = atls::client_config(None)?;
        let mut report = SweepReport {
            due: due.len(),
            ..Default::default()
        };
        let mut results = futures::stream::iter(due.into_iter().map(|att| {
            let (in_force, nodes, tls) = (in_force.clone(), nodes.clone(), tls.clone());
            async move {
                self.reattest_one(
                    &att,
                    &in_force,
                    nodes.get(&att.spec.node_name),
                    tls,
                    interval,
                )
                .await
            }
        }))
        .buffer_unordered(self.args.concurrency.max(1));
        while let Some(result) = results.next().await {
            match result {
                "verified" => report.verified += 1,
                "revoked" => report.revoked += 1,
                "conflict" => report.conflicts += 1,
                _ => report.failed += 1,
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Re-verifies one node and records the decision; returns the result
    /// label it was counted under.
    async fn reattest_one(
        &self,
        att: &NodeAttestation,
        in_force: &PolicyInForce,
        node: Option<&Node>,
        tls: Arc<rustls::ClientConfig>,
        interval: Duration,
    ) -> &'static str {
        let started = Instant::now();
        let name = att.spec.node_name.as_str();
        let outcome = match decision::endpoint(att, node, self.args.port) {
            Ok(endpoint) => match self.probe(&endpoint, tls).await {
                Ok((answer, nonce)) => in_force.check(att, &answer, &nonce).map(drop),
                Err(failure) => Err(failure),
            },
            Err(failure) => Err(failure),
        };
        let decision = decision::decide(
            jiff::Timestamp::now(),
            att.status.as_ref(),
            att.metadata.generation,
            outcome.as_ref().map(|_| ()),
            interval,
            self.args.grace,
        );
        let result = match (&decision, &outcome) {
            (Decision::Renew { .. }, _) => "verified",
            (Decision::Revoke { .. }, _) => "revoked",
            (_, Err(f)) if f.is_unreachable() => "unreachable",
            _ => "failed",
        };
        let written = self.record(att, &decision).await;
        let result = match written {
            Ok(()) => result,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(
                    node = name,
                    "re-attestation result dropped: the attestation changed meanwhile"
                );
                "conflict"
            }
            Err(e) => {
                tracing::warn!(node = name, error = %e, "recording the re-attestation failed");
                "write-failed"
            }
        };
        if let Err(failure) = &outcome {
            self.metrics
                .failures
                .get_or_create(&metrics::ReasonLabels {
                    reason: failure.code(),
                })
                .inc();
            tracing::warn!(
                node = name,
                reason = failure.code(),
                failures = decision_failures(&decision),
                revoked = result == "revoked",
                error = %failure,
                "re-attestation failed"
            );
            if matches!(result, "revoked" | "failed" | "unreachable") {
                self.publish_failure(att, node.is_some(), failure, result == "revoked");
            }
        } else {
            tracing::debug!(node = name, result, "re-attested");
        }
        self.metrics
            .results
            .get_or_create(&metrics::ResultLabels { result })
            .inc();
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Connects to `endpoint` over aTLS and asks for evidence bound to this
    /// connection; returns the answer and the nonce it must carry.
    async fn probe(
        &self,
        endpoint: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(AttestResponse, [u8; 32]), Failure> {
        let exchange = async {
            let mut client = AtlsClient::connect(endpoint, tls)
                .await
                .map_err(|e| Failure::Unreachable(format!("{endpoint}: {e}")))?;
            let (status, body) = client
                .post_limited(PATH_ATTEST, Vec::new(), MAX_ANSWER_BYTES)
                .await
                .map_err(|e| Failure::Unreachable(format!("{endpoint}: {e}")))?;
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                let text: String = text.chars().take(200).collect();
                return Err(Failure::BadAnswer(format!(
                    "{endpoint} answered {status}: {text}"
                )));
            }
            let answer: AttestResponse = serde_json::from_slice(&body)
                .map_err(|e| Failure::BadAnswer(format!("{endpoint}: {e}")))?;
            Ok((answer, client.nonce(PURPOSE_NODE_ATTEST)))
        };
        tokio::time::timeout(self.args.timeout, exchange)
            .await
            .map_err(|_| {
                Failure::Unreachable(format!(
                    "{endpoint}: no evidence within {}s",
                    self.args.timeout.as_secs_f32()
                ))
            })?
    }

    /// Writes `decision`, each write conditional on the resourceVersion the
    /// sweep read (a concurrent writer makes it fail with 409).
    ///
    /// Spec and status are two writes, ordered so that no reader sees a
    /// state the decision does not explain: a renewal moves `expiresAt`
    /// before recording the success; a revocation records why and when
    /// (status) before it flips the verdict, so a `Revoked` attestation
    /// always carries its reason, and a gate that stops between the two
    /// writes leaves a `Trusted` attestation the next sweep decides again.
    async fn record(&self, att: &NodeAttestation, decision: &Decision) -> Result<(), kube::Error> {
        let api = Api::<NodeAttestation>::all(self.client.clone());
        let name = att.metadata.name.as_deref().unwrap_or(&att.spec.node_name);
        let status = match decision {
            Decision::Renew { status, .. }
            | Decision::RecordFailure { status }
            | Decision::Revoke { status } => status.clone(),
        };
        let patch_spec = |resource_version: Option<String>, spec: serde_json::Value| {
            let api = api.clone();
            async move {
                api.patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({
                        "metadata": { "resourceVersion": resource_version },
                        "spec": spec,
                    })),
                )
                .await
            }
        };
        match decision {
            Decision::Renew { expires_at, .. } => {
                let mut current = patch_spec(
                    att.metadata.resource_version.clone(),
                    json!({ "expiresAt": expires_at }),
                )
                .await?;
                current.status = Some(status);
                api.replace_status(name, &PostParams::default(), &current)
                    .await?;
            }
            Decision::RecordFailure { .. } => {
                let mut current = att.clone();
                current.status = Some(status);
                api.replace_status(name, &PostParams::default(), &current)
                    .await?;
            }
            Decision::Revoke { .. } => {
                let mut current = att.clone();
                current.status = Some(status);
                let recorded = api
                    .replace_status(name, &PostParams::default(), &current)
                    .await?;
                patch_spec(
                    recorded.metadata.resource_version,
                    json!({ "verdict": Verdict::Revoked }),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Events on the NodeAttestation and the Node, sent without waiting
    /// (best effort: an Event must not hold up the sweep).
    fn publish_failure(
        &self,
        att: &NodeAttestation,
        node_exists: bool,
        failure: &Failure,
        revoked: bool,
    ) {
        let name = att.spec.node_name.clone();
        let (reason, note) = if revoked {
            (
                "AttestationRevoked".to_owned(),
                format!(
                    "attestation of node {name} revoked: re-attestation failing for longer than the grace period ({failure}); \
                     the node must be replaced by a newly attested machine"
                ),
            )
        } else {
            (
                format!("Reattestation{}", failure.reason()),
                format!("re-attestation of node {name} failed: {failure}"),
            )
        };
        // The API server refuses an Event note longer than 1 kB.
        let note: String = note.chars().take(1000).collect();
        let event = Event {
            type_: EventType::Warning,
            reason,
            note: Some(note),
            action: if revoked { "Revoke" } else { "Reattest" }.to_owned(),
            secondary: None,
        };
        let mut references = vec![ObjectReference {
            api_version: Some(format!(
                "{}/{}",
                confidential_api::GROUP,
                confidential_api::VERSION
            )),
            kind: Some("NodeAttestation".into()),
            name: att.metadata.name.clone(),
            uid: att.metadata.uid.clone(),
            ..Default::default()
        }];
        if node_exists {
            references.push(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name),
                ..Default::default()
            });
        }
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            for reference in references {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::debug!(error = %e, "publishing a re-attestation event");
                }
            }
        });
    }
}

fn decision_failures(decision: &Decision) -> i32 {
    match decision {
        Decision::Renew { status, .. }
        | Decision::RecordFailure { status }
        | Decision::Revoke { status } => status.consecutive_failures,
    }
}

/// `base` ± 10 %, at random.
fn jittered(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..=1.1);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_camel_case_codes_are_stable() {
        let f = Failure::Evidence {
            reason: "pcr-mismatch",
            message: "PCR 4".into(),
        };
        assert_eq!(f.code(), "pcr-mismatch");
        assert_eq!(f.reason(), "PcrMismatch");
        let ak = Failure::AkMismatch {
            recorded: "a".into(),
            presented: "b".into(),
        };
        assert_eq!(ak.reason(), "AkMismatch");
        assert!(!ak.is_unreachable());
        assert!(Failure::Unreachable("x".into()).is_unreachable());
        assert_eq!(Failure::NoEndpoint("x".into()).reason(), "NoEndpoint");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(100));
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
    }
}
