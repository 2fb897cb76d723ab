//! What one re-attestation outcome does to a NodeAttestation, as pure
//! functions: which attestations a sweep looks at, where a node is reached,
//! and, given the current status and the outcome, the new status and whether
//! the expiry moves (success), a failure is recorded, or the attestation is
//! revoked (failures lasting longer than the grace period). No I/O here: the
//! sweep in [`super`] reads and writes the cluster around these decisions,
//! and the unit tests below pin every transition.

use std::net::IpAddr;
use std::time::Duration;

use confidential_api::conditions::{condition, set_condition};
use confidential_api::endpoint::Endpoint;
use confidential_api::{NodeAttestation, NodeAttestationStatus, Verdict};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::Failure;

/// Condition type: the last re-verification succeeded (True) or the node
/// is failing (False, reason of the failure).
pub const CONDITION_VERIFIED: &str = "Verified";
/// Condition type: the attestation was revoked.
pub const CONDITION_REVOKED: &str = "Revoked";
/// Reason of the `Revoked` condition.
pub const REASON_GRACE_EXCEEDED: &str = "GracePeriodExceeded";

/// What a sweep does with one attestation.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Fresh evidence verified: move `spec.expiresAt`, write the status.
    Renew {
        expires_at: Time,
        status: NodeAttestationStatus,
    },
    /// A failure within the grace period: write the status only.
    RecordFailure { status: NodeAttestationStatus },
    /// Failures lasted longer than the grace period: set the verdict to
    /// `Revoked` and write the status.
    Revoke { status: NodeAttestationStatus },
}

/// Whether a sweep re-verifies `att` now: only trusted attestations (a
/// revoked or untrusted one is already invalid) whose last success is older
/// than `min_age`. With several gate replicas, the one that comes second
/// within `min_age` skips the node instead of verifying it twice.
pub fn is_due(att: &NodeAttestation, now: Timestamp, min_age: Duration) -> bool {
    if att.spec.verdict != Verdict::Trusted {
        return false;
    }
    let last = att.status.as_ref().and_then(|s| s.last_verified.as_ref());
    match last {
        None => true,
        Some(t) => {
            now.duration_since(t.0)
                >= SignedDuration::try_from(min_age).unwrap_or(SignedDuration::MAX)
        }
    }
}

/// Where the node's `/v1/attest` is served: the endpoint recorded at join
/// when there is one, else the Node's first `InternalIP` and `port`.
pub fn endpoint(att: &NodeAttestation, node: Option<&Node>, port: u16) -> Result<String, Failure> {
    if let Some(recorded) = Endpoint::recorded(att) {
        return recorded
            .map(|e| e.to_string())
            .map_err(|e| Failure::NoEndpoint(format!("the recorded attestation endpoint {e}")));
    }
    let node = node.ok_or_else(|| {
        Failure::NoEndpoint(format!(
            "no endpoint recorded and no Node {} to read an InternalIP from",
            att.spec.node_name
        ))
    })?;
    let ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<IpAddr>().ok())
        .ok_or_else(|| {
            Failure::NoEndpoint(format!(
                "Node {} reports no InternalIP and no endpoint was recorded at join",
                att.spec.node_name
            ))
        })?;
    Ok(Endpoint::from_ip(ip, port).to_string())
}

/// The decision for `outcome` on an attestation whose status is `current`.
/// `interval` is the policy's re-attestation interval (a success moves the
/// expiry to `now + interval`), `grace` how long failures may last before
/// the attestation is revoked.
pub fn decide(
    now: Timestamp,
    current: Option<&NodeAttestationStatus>,
    generation: Option<i64>,
    outcome: Result<(), &Failure>,
    interval: Duration,
    grace: Duration,
) -> Decision {
    let mut status = current.cloned().unwrap_or_default();
    let stamp = Time(now);
    match outcome {
        Ok(()) => {
            let recovered = status.consecutive_failures > 0;
            status.last_verified = Some(stamp.clone());
            status.consecutive_failures = 0;
            status.first_failure = None;
            status.last_failure_reason = None;
            set_condition(
                &mut status.conditions,
                condition(
                    CONDITION_VERIFIED,
                    true,
                    "Verified",
                    if recovered {
                        "fresh evidence verified against the policy in force (recovered from failures)"
                    } else {
                        "fresh evidence verified against the policy in force"
                    },
                    generation,
                    stamp,
                ),
            );
            let expires = now
                .checked_add(SignedDuration::try_from(interval).unwrap_or(SignedDuration::ZERO))
                .unwrap_or(now);
            Decision::Renew {
                expires_at: Time(expires),
                status,
            }
        }
        Err(failure) => {
            let first = status
                .first_failure
                .clone()
                .unwrap_or_else(|| stamp.clone());
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
            status.first_failure = Some(first.clone());
            status.last_failure_reason = Some(failure.reason());
            set_condition(
                &mut status.conditions,
                condition(
                    CONDITION_VERIFIED,
                    false,
                    &failure.reason(),
                    failure.to_string(),
                    generation,
                    stamp.clone(),
                ),
            );
            let failing_for = now.duration_since(first.0);
            let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
            if failing_for < grace {
                return Decision::RecordFailure { status };
            }
            status.revoked_at = Some(stamp.clone());
            set_condition(
                &mut status.conditions,
                condition(
                    CONDITION_REVOKED,
                    true,
                    REASON_GRACE_EXCEEDED,
                    format!(
                        "re-attestation failing since {} ({} failures in a row, last: {failure}); \
                         longer than the grace period of {}s",
                        first.0,
                        status.consecutive_failures,
                        grace.as_secs()
                    ),
                    generation,
                    stamp,
                ),
            );
            Decision::Revoke { status }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_api::{EvidenceKind, NodeAttestationSpec};
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    const GRACE: Duration = Duration::from_secs(600);
    const INTERVAL: Duration = Duration::from_secs(3600);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid")
    }

    fn att(verdict: Verdict, status: Option<NodeAttestationStatus>) -> NodeAttestation {
        let mut a = NodeAttestation::new(
            "n1",
            NodeAttestationSpec {
                node_name: "n1".into(),
                evidence_kind: EvidenceKind::Tpm,
                image: "img".into(),
                pool: None,
                measurements: Default::default(),
                ak_fingerprint: "ab".repeat(32),
                disk_uuid: None,
                attestation_endpoint: None,
                attested_at: Time(at(0)),
                expires_at: Time(at(100)),
                verdict,
                warnings: vec![],
            },
        );
        a.status = status;
        a
    }

    fn unreachable() -> Failure {
        Failure::Unreachable("connection refused".into())
    }

    fn cond(s: &NodeAttestationStatus, type_: &str) -> Option<(String, String)> {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    }

    #[test]
    fn success_moves_the_expiry_and_clears_failures() {
        let failing = NodeAttestationStatus {
            consecutive_failures: 3,
            first_failure: Some(Time(at(10))),
            last_failure_reason: Some("Unreachable".into()),
            ..Default::default()
        };
        let d = decide(at(50), Some(&failing), Some(1), Ok(()), INTERVAL, GRACE);
        let Decision::Renew { expires_at, status } = d else {
            panic!("expected a renewal, got {d:?}");
        };
        assert_eq!(expires_at.0, at(50 + 3600));
        assert_eq!(status.last_verified, Some(Time(at(50))));
        assert_eq!(status.consecutive_failures, 0);
        assert_eq!(status.first_failure, None);
        assert_eq!(status.last_failure_reason, None);
        assert_eq!(
            cond(&status, CONDITION_VERIFIED),
            Some(("True".into(), "Verified".into()))
        );
    }

    #[test]
    fn failures_within_the_grace_period_are_recorded_not_revoked() {
        let first = decide(at(0), None, None, Err(&unreachable()), INTERVAL, GRACE);
        let Decision::RecordFailure { status } = first else {
            panic!("a first failure must not revoke: {first:?}");
        };
        assert_eq!(status.consecutive_failures, 1);
        assert_eq!(status.first_failure, Some(Time(at(0))));
        assert_eq!(
            cond(&status, CONDITION_VERIFIED),
            Some(("False".into(), "Unreachable".into()))
        );
        let second = decide(
            at(599),
            Some(&status),
            None,
            Err(&unreachable()),
            INTERVAL,
            GRACE,
        );
        let Decision::RecordFailure { status } = second else {
            panic!("599 s of failures is within 600 s of grace: {second:?}");
        };
        assert_eq!(status.consecutive_failures, 2);
        assert_eq!(
            status.first_failure,
            Some(Time(at(0))),
            "the run's start stays"
        );
        assert_eq!(status.revoked_at, None);
    }

    #[test]
    fn failures_longer_than_the_grace_period_revoke() {
        let status = NodeAttestationStatus {
            consecutive_failures: 4,
            first_failure: Some(Time(at(0))),
            ..Default::default()
        };
        let mismatch = Failure::AkMismatch {
            recorded: "aa".into(),
            presented: "bb".into(),
        };
        let d = decide(
            at(600),
            Some(&status),
            None,
            Err(&mismatch),
            INTERVAL,
            GRACE,
        );
        let Decision::Revoke { status } = d else {
            panic!("expected a revocation, got {d:?}");
        };
        assert_eq!(status.revoked_at, Some(Time(at(600))));
        assert_eq!(status.consecutive_failures, 5);
        assert_eq!(status.last_failure_reason.as_deref(), Some("AkMismatch"));
        assert_eq!(
            cond(&status, CONDITION_REVOKED),
            Some(("True".into(), REASON_GRACE_EXCEEDED.into()))
        );
    }

    #[test]
    fn zero_grace_revokes_on_the_first_failure() {
        let d = decide(
            at(0),
            None,
            None,
            Err(&unreachable()),
            INTERVAL,
            Duration::ZERO,
        );
        assert!(matches!(d, Decision::Revoke { .. }), "{d:?}");
    }

    #[test]
    fn only_trusted_attestations_not_verified_recently_are_due() {
        let min_age = Duration::from_secs(30);
        assert!(is_due(&att(Verdict::Trusted, None), at(0), min_age));
        assert!(!is_due(&att(Verdict::Revoked, None), at(0), min_age));
        let recent = NodeAttestationStatus {
            last_verified: Some(Time(at(0))),
            ..Default::default()
        };
        assert!(!is_due(
            &att(Verdict::Trusted, Some(recent.clone())),
            at(29),
            min_age
        ));
        assert!(is_due(
            &att(Verdict::Trusted, Some(recent)),
            at(30),
            min_age
        ));
    }

    fn node_with(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn endpoint_prefers_the_recorded_one_then_the_internal_ip() {
        let mut a = att(Verdict::Trusted, None);
        let node = node_with(&[("Hostname", "n1"), ("InternalIP", "10.0.0.7")]);
        assert_eq!(
            endpoint(&a, Some(&node), 7443).expect("ip"),
            "10.0.0.7:7443"
        );
        let v6 = node_with(&[("InternalIP", "fd00::7")]);
        assert_eq!(endpoint(&a, Some(&v6), 7443).expect("ip"), "[fd00::7]:7443");
        a.spec.attestation_endpoint = Some("192.0.2.1:9000".into());
        assert_eq!(
            endpoint(&a, Some(&node), 7443).expect("recorded"),
            "192.0.2.1:9000"
        );
        for written_by_someone_else in ["192.0.2.1:9000,10.0.0.1:1", "user@host:1", "host"] {
            a.spec.attestation_endpoint = Some(written_by_someone_else.into());
            let err = endpoint(&a, Some(&node), 7443).expect_err(written_by_someone_else);
            assert_eq!(err.reason(), "NoEndpoint");
            assert!(
                err.to_string().contains("recorded attestation endpoint"),
                "{err}"
            );
        }
    }

    #[test]
    fn no_endpoint_is_a_failure_saying_why() {
        let a = att(Verdict::Trusted, None);
        let err = endpoint(&a, None, 7443).expect_err("no node");
        assert_eq!(err.reason(), "NoEndpoint");
        let hostname_only = node_with(&[("Hostname", "n1"), ("InternalIP", "not-an-ip")]);
        let err = endpoint(&a, Some(&hostname_only), 7443).expect_err("no usable IP");
        assert!(err.to_string().contains("InternalIP"), "{err}");
    }
}
