//! Phase 2, classify nodes: every live Node of the pool is up to date, a
//! machine still joining, a heir waiting to be Ready, a *donor* (outdated or
//! invalid: it needs a heir) or *surplus* (a heir whose attestation lapsed
//! before its donor left: drained and removed without a heir of its own).
//! Nodes whose attestation expired or failed are revoked here: tainted
//! `NoExecute` and cordoned at once, whatever else they are.

use super::Pool;
use super::model::{Action, Desired, NodeObs, available, current, trusted, up_to_date};
use super::pending::PendingView;

/// The nodes of a pool by their place in the rollout.
#[derive(Debug, Default)]
pub(super) struct NodeClasses<'a> {
    pub up_to_date: Vec<String>,
    pub outdated: Vec<String>,
    pub invalid: Vec<String>,
    /// Nodes that need a heir, unavailable ones first (replacing them costs
    /// no availability).
    pub donors: Vec<&'a NodeObs>,
    /// Nodes leaving without a heir.
    pub surplus: Vec<&'a NodeObs>,
}

/// Classifies the live nodes of the pool.
pub(super) fn classify_nodes<'a>(
    desired: &Desired,
    pool: &Pool<'a>,
    pending: &PendingView<'a>,
) -> NodeClasses<'a> {
    let mut classes = NodeClasses::default();
    for n in pool.nodes.values().copied() {
        if n.deleting {
            continue;
        }
        let paired_with_live_donor = n.heir_of.as_deref().is_some_and(|d| pool.live(d));
        if up_to_date(desired, n) {
            classes.up_to_date.push(n.name.clone());
        } else if pending.joining.contains(n.name.as_str()) {
            // A machine of this rollout that has not joined (or failed).
        } else if paired_with_live_donor && current(desired, n) {
            // A paired heir that is not Ready right now: wait for it.
        } else if paired_with_live_donor {
            // A heir whose attestation lapsed before its donor left: its
            // donor gets another heir, and it is drained and removed.
            classes.invalid.push(n.name.clone());
            classes.surplus.push(n);
        } else if !trusted(n) {
            classes.invalid.push(n.name.clone());
            classes.donors.push(n);
        } else if !current(desired, n) {
            classes.outdated.push(n.name.clone());
            classes.donors.push(n);
        }
    }
    classes
        .donors
        .sort_by_key(|n| (available(n), n.name.clone()));
    classes
}

/// Revokes nodes whose attestation expired or failed (joining or not):
/// taint and cordon, once. Donors without any attestation are cordoned.
/// Neither is available, so the budget does not change.
pub(super) fn revoke_untrusted(pool: &Pool<'_>, donors: &[&NodeObs]) -> Vec<Action> {
    let mut actions = Vec::new();
    for n in pool.nodes.values().filter(|n| !n.deleting) {
        if (n.attestation_invalid || n.revoked) && !(n.cordoned && n.revoked) {
            actions.push(Action::Revoke {
                node: n.name.clone(),
                reason: format!(
                    "the attestation of {} expired or failed re-attestation",
                    n.name
                ),
            });
        }
    }
    for n in donors {
        if !trusted(n) && !n.attestation_invalid && !n.revoked && !n.cordoned {
            actions.push(Action::Cordon {
                node: n.name.clone(),
                start_drain: false,
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::model::Observed;
    use crate::planner::pending::classify_pending;
    use crate::planner::tests::{desired, node};

    fn classes(observed: &Observed) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
        let desired = desired(3);
        let pool = Pool::new(observed);
        let pending = classify_pending(&desired, &pool);
        let c = classify_nodes(&desired, &pool, &pending);
        let donors = c.donors.iter().map(|n| n.name.clone()).collect();
        (c.up_to_date, c.outdated, c.invalid, donors)
    }

    #[test]
    fn nodes_are_up_to_date_outdated_or_invalid_and_unavailable_donors_come_first() {
        let mut expired = node("c", "node:v2");
        expired.attestation_invalid = true;
        let observed = Observed {
            nodes: vec![node("a", "node:v2"), node("b", "node:v1"), expired],
            ..Observed::default()
        };
        let (up, outdated, invalid, donors) = classes(&observed);
        assert_eq!(up, vec!["a"]);
        assert_eq!(outdated, vec!["b"]);
        assert_eq!(invalid, vec!["c"]);
        assert_eq!(donors, vec!["c", "b"], "the invalid donor first");
    }

    #[test]
    fn a_revoked_node_stays_invalid_when_its_attestation_is_renewed() {
        let mut renewed = node("a", "node:v2");
        renewed.revoked = true;
        renewed.cordoned = true;
        let observed = Observed {
            nodes: vec![renewed],
            ..Observed::default()
        };
        let (up, _, invalid, donors) = classes(&observed);
        assert!(up.is_empty());
        assert_eq!(invalid, vec!["a"]);
        assert_eq!(donors, vec!["a"]);
    }

    #[test]
    fn an_expired_node_is_revoked_once_and_a_node_without_attestation_only_cordoned() {
        let mut expired = node("a", "node:v2");
        expired.attestation_invalid = true;
        let mut unattested = node("b", "node:v2");
        unattested.attested_image = None;
        let mut done = node("c", "node:v2");
        done.attestation_invalid = true;
        done.revoked = true;
        done.cordoned = true;
        let observed = Observed {
            nodes: vec![expired, unattested, done],
            ..Observed::default()
        };
        let pool = Pool::new(&observed);
        let donors: Vec<&NodeObs> = observed.nodes.iter().collect();
        let actions = revoke_untrusted(&pool, &donors);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(matches!(&actions[0], Action::Revoke { node, .. } if node == "a"));
        assert_eq!(
            actions[1],
            Action::Cordon {
                node: "b".into(),
                start_drain: false
            }
        );
    }
}
