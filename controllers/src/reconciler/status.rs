//! The NodeVersion status: what the planner found (node groups, blocked
//! reasons) and what executing its plan met (evictions a PDB refused),
//! turned into conditions and counts by the pure [`status_of`], then
//! written by server-side apply with our field manager, with metrics and a
//! Warning Event when the rollout becomes blocked.

use confidential_api::conditions::{self, set_condition, types};
use confidential_api::keys::FIELD_MANAGER;
use confidential_api::{NodeVersion, NodeVersionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::events::publish;
use super::{Context, Error};
use crate::metrics::{Pool, PoolState};
use crate::planner::{Blocked, PoolStatus};

/// The reason and message of the RolloutBlocked condition.
pub fn blocked_message(blocked: &[Blocked]) -> (String, String) {
    let mut reason = String::new();
    let mut parts = Vec::new();
    for b in blocked {
        match b {
            Blocked::JoinsFailing { donor, attempts } => {
                reason = "JoinsFailing".into();
                parts.push(format!(
                    "machines {} failed to join and attest {attempts} times",
                    donor
                        .as_ref()
                        .map_or_else(|| "for a new slot".to_owned(), |d| format!("replacing {d}"))
                ));
            }
            Blocked::DrainTimeout { node, pods } => {
                if reason.is_empty() {
                    reason = "DrainTimeout".into();
                }
                parts.push(format!(
                    "drain of {node} exceeded its timeout; still waiting for {} (evictions are retried, pods are never deleted directly)",
                    pods.join(", ")
                ));
            }
            Blocked::PodsNotEvictable { node, pods } => {
                if reason.is_empty() {
                    reason = "PodsNotEvictable".into();
                }
                parts.push(format!(
                    "{node} runs pods that may not be evicted without opt-in (emptyDir: deleteEmptyDirData; no controller: evictUnmanagedPods): {}",
                    pods.join(", ")
                ));
            }
            // etcd (issue 9)
            Blocked::EtcdUnavailable { reason: why } => {
                reason = "EtcdUnavailable".into();
                parts.push(why.clone());
            }
            Blocked::EtcdQuorumWait { node, reason: why } => {
                if reason.is_empty() {
                    reason = "EtcdQuorumWait".into();
                }
                parts.push(format!("{node} stays until it can leave etcd: {why}"));
            }
        }
    }
    (reason, parts.join("; "))
}

/// The new status of a pool: node groups and counts from the plan, the
/// Outdated, RolloutBlocked and RolloutProgressing conditions (transition
/// times kept while a condition's status does not change), and the pods the
/// drains wait for (including evictions a PDB refused just now).
pub fn status_of(
    previous: &NodeVersionStatus,
    plan: &PoolStatus,
    refused: &[String],
    generation: Option<i64>,
    now: Time,
) -> NodeVersionStatus {
    let mut conditions = previous.conditions.clone();
    let outdated = plan.outdated.len() + plan.invalid.len();
    set_condition(
        &mut conditions,
        conditions::condition(
            types::OUTDATED,
            outdated > 0,
            if outdated > 0 {
                "NodesOutdated"
            } else {
                "AllNodesUpToDate"
            },
            format!(
                "{} outdated, {} invalid, {} up to date",
                plan.outdated.len(),
                plan.invalid.len(),
                plan.up_to_date.len()
            ),
            generation,
            now.clone(),
        ),
    );
    let (reason, message) = blocked_message(&plan.blocked);
    let blocked = !plan.blocked.is_empty();
    set_condition(
        &mut conditions,
        conditions::condition(
            types::ROLLOUT_BLOCKED,
            blocked,
            if blocked { &reason } else { "NotBlocked" },
            if blocked { message } else { String::new() },
            generation,
            now.clone(),
        ),
    );
    set_condition(
        &mut conditions,
        conditions::condition(
            types::ROLLOUT_PROGRESSING,
            plan.progressing,
            if plan.progressing {
                "ReplacingNodes"
            } else {
                "RolloutComplete"
            },
            format!(
                "{} donors, {} heirs, {} pending",
                plan.donors.len(),
                plan.heirs.len(),
                plan.pending.len()
            ),
            generation,
            now,
        ),
    );
    let mut blocking = plan.blocking_pods.clone();
    for pod in refused {
        if !blocking.contains(pod) {
            blocking.push(pod.clone());
        }
    }
    NodeVersionStatus {
        up_to_date: plan.up_to_date.clone(),
        outdated: plan.outdated.clone(),
        donors: plan.donors.clone(),
        heirs: plan.heirs.clone(),
        pending: plan.pending.clone(),
        invalid: plan.invalid.clone(),
        up_to_date_count: i32::try_from(plan.up_to_date.len()).unwrap_or(i32::MAX),
        outdated_count: i32::try_from(outdated).unwrap_or(i32::MAX),
        blocking_pods: blocking,
        conditions,
        observed_generation: generation,
    }
}

/// Seconds a rollout took, when this status ends one: RolloutProgressing
/// went from True to False.
pub fn rollout_finished(previous: &NodeVersionStatus, new: &NodeVersionStatus) -> Option<i64> {
    let was = conditions::is_true(&previous.conditions, types::ROLLOUT_PROGRESSING);
    let is = conditions::is_true(&new.conditions, types::ROLLOUT_PROGRESSING);
    let started = previous
        .conditions
        .iter()
        .find(|c| c.type_ == types::ROLLOUT_PROGRESSING)?;
    let ended = new
        .conditions
        .iter()
        .find(|c| c.type_ == types::ROLLOUT_PROGRESSING)?;
    (was && !is).then(|| {
        (ended.last_transition_time.0.as_second() - started.last_transition_time.0.as_second())
            .max(0)
    })
}

/// Writes the status (only when it changed), records metrics, and warns
/// once when the rollout becomes blocked.
pub async fn write_status(
    ctx: &Context,
    nv: &NodeVersion,
    plan: &PoolStatus,
    refused: &[String],
) -> Result<(), Error> {
    let previous = nv.status.clone().unwrap_or_default();
    let new = status_of(
        &previous,
        plan,
        refused,
        nv.metadata.generation,
        Time(jiff::Timestamp::now()),
    );
    let pool = nv.name_any();
    if let Some(took) = rollout_finished(&previous, &new) {
        ctx.metrics
            .rollout_duration
            .get_or_create(&Pool { pool: pool.clone() })
            .observe(took as f64);
    }
    let blocked = conditions::is_true(&new.conditions, types::ROLLOUT_BLOCKED);
    if blocked && !conditions::is_true(&previous.conditions, types::ROLLOUT_BLOCKED) {
        publish(
            ctx,
            &nv.object_ref(&()),
            true,
            "RolloutBlocked",
            "Rollout",
            blocked_message(&plan.blocked).1,
        );
    }
    for (state, count) in [
        ("upToDate", plan.up_to_date.len()),
        ("outdated", plan.outdated.len()),
        ("invalid", plan.invalid.len()),
        ("donor", plan.donors.len()),
        ("heir", plan.heirs.len()),
        ("pending", plan.pending.len()),
    ] {
        ctx.metrics
            .nodes
            .get_or_create(&PoolState {
                pool: pool.clone(),
                state: state.into(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    if Some(&new) == nv.status.as_ref() {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "confidential.dev/v1alpha1",
        "kind": "NodeVersion",
        "status": new,
    });
    Api::<NodeVersion>::all(ctx.client.clone())
        .patch_status(
            &pool,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
    }

    fn condition<'a>(status: &'a NodeVersionStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
    }

    fn rolling() -> PoolStatus {
        PoolStatus {
            up_to_date: vec!["c".into()],
            outdated: vec!["a".into()],
            invalid: vec!["b".into()],
            donors: vec!["a".into(), "b".into()],
            heirs: vec!["c".into()],
            blocking_pods: vec!["app/web-1".into()],
            progressing: true,
            ..PoolStatus::default()
        }
    }

    #[test]
    fn a_rolling_pool_is_outdated_and_progressing_with_counts() {
        let status = status_of(
            &NodeVersionStatus::default(),
            &rolling(),
            &["app/web-2".into(), "app/web-1".into()],
            Some(3),
            at(100),
        );
        assert_eq!(status.outdated_count, 2, "outdated and invalid");
        assert_eq!(status.up_to_date_count, 1);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.blocking_pods, vec!["app/web-1", "app/web-2"]);
        let outdated = condition(&status, types::OUTDATED);
        assert_eq!(
            (outdated.status.as_str(), outdated.reason.as_str()),
            ("True", "NodesOutdated")
        );
        assert_eq!(outdated.message, "1 outdated, 1 invalid, 1 up to date");
        let progressing = condition(&status, types::ROLLOUT_PROGRESSING);
        assert_eq!(progressing.reason, "ReplacingNodes");
        assert_eq!(progressing.observed_generation, Some(3));
        assert_eq!(condition(&status, types::ROLLOUT_BLOCKED).status, "False");
    }

    #[test]
    fn a_blocked_pool_says_why_and_keeps_the_first_reason() {
        let plan = PoolStatus {
            blocked: vec![
                Blocked::DrainTimeout {
                    node: "a".into(),
                    pods: vec!["app/web-1".into()],
                },
                Blocked::JoinsFailing {
                    donor: Some("b".into()),
                    attempts: 3,
                },
            ],
            ..rolling()
        };
        let status = status_of(&NodeVersionStatus::default(), &plan, &[], None, at(5));
        let blocked = condition(&status, types::ROLLOUT_BLOCKED);
        assert_eq!(blocked.status, "True");
        assert_eq!(blocked.reason, "JoinsFailing", "failing joins win");
        assert!(blocked.message.contains("drain of a exceeded its timeout"));
        assert!(
            blocked
                .message
                .contains("replacing b failed to join and attest 3 times")
        );
    }

    #[test]
    fn finishing_a_rollout_keeps_transition_times_and_reports_its_duration() {
        let first = status_of(
            &NodeVersionStatus::default(),
            &rolling(),
            &[],
            None,
            at(100),
        );
        let again = status_of(&first, &rolling(), &[], None, at(150));
        assert_eq!(
            condition(&again, types::ROLLOUT_PROGRESSING).last_transition_time,
            at(100),
            "no transition while still progressing"
        );
        assert_eq!(rollout_finished(&first, &again), None);
        let settled = PoolStatus {
            up_to_date: vec!["c".into()],
            ..PoolStatus::default()
        };
        let done = status_of(&again, &settled, &[], None, at(190));
        let progressing = condition(&done, types::ROLLOUT_PROGRESSING);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", "RolloutComplete")
        );
        assert_eq!(condition(&done, types::OUTDATED).reason, "AllNodesUpToDate");
        assert_eq!(rollout_finished(&again, &done), Some(90));
    }
}
