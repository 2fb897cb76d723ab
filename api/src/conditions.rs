//! Helpers for `status.conditions` following the Kubernetes API conventions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types used on our resources.
pub mod types {
    /// NodeVersion: some nodes run another image or Kubernetes version.
    pub const OUTDATED: &str = "Outdated";
    /// NodeVersion: a rollout is replacing nodes.
    pub const ROLLOUT_PROGRESSING: &str = "RolloutProgressing";
    /// NodeVersion: the rollout cannot continue without intervention.
    pub const ROLLOUT_BLOCKED: &str = "RolloutBlocked";
    /// Policies and attestations: the object is valid and in force.
    pub const READY: &str = "Ready";
}

/// Sets `condition` in `conditions`, keeping `lastTransitionTime` when the
/// status did not change. Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            let changed = existing.status != condition.status
                || existing.reason != condition.reason
                || existing.message != condition.message
                || existing.observed_generation != condition.observed_generation;
            if existing.status != condition.status {
                existing.last_transition_time = condition.last_transition_time;
            }
            existing.status = condition.status;
            existing.reason = condition.reason;
            existing.message = condition.message;
            existing.observed_generation = condition.observed_generation;
            changed
        }
        None => {
            conditions.push(condition);
            true
        }
    }
}

/// Builds a condition with the given fields.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Whether the condition of `type_` is present and `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}
