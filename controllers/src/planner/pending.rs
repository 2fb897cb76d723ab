//! Phase 1, classify pending: what each PendingNode (a machine being
//! created) means now. A record whose machine joined and was paired (or
//! whose donor is gone) has done its job and is forgotten; one past its
//! deadline is marked failed; one still joining keeps its machine (ensured
//! again after a crash) and counts as pending. Failed records are kept while
//! their slot backs off, then forgotten once superseded.

use std::collections::{BTreeMap, BTreeSet};

use super::Pool;
use super::model::{Action, Desired, PendingObs, up_to_date};

/// What the PendingNodes of a pool say.
#[derive(Debug, Default)]
pub(super) struct PendingView<'a> {
    /// The latest PendingNode (highest attempt) of every donor's slot.
    pub latest_for_donor: BTreeMap<&'a str, &'a PendingObs>,
    /// Machines with a PendingNode that have not joined (or failed): never
    /// donors.
    pub joining: BTreeSet<&'a str>,
    /// Heirs-to-be whose donor is alive: they do not occupy a slot.
    pub pending_heirs: BTreeSet<&'a str>,
    /// Machines still within their join deadline (the status' `pending`).
    pub waiting: Vec<String>,
    /// EnsureMachine, ForgetPending and MarkFailed actions.
    pub actions: Vec<Action>,
}

/// The latest PendingNode of every donor's slot.
pub(super) fn latest_for_donor(pending: &[PendingObs]) -> BTreeMap<&str, &PendingObs> {
    let mut latest: BTreeMap<&str, &PendingObs> = BTreeMap::new();
    for p in pending {
        if let Some(d) = p.donor.as_deref()
            && latest.get(d).is_none_or(|q| p.attempts > q.attempts)
        {
            latest.insert(d, p);
        }
    }
    latest
}

/// Classifies every PendingNode of the pool.
pub(super) fn classify_pending<'a>(desired: &Desired, pool: &Pool<'a>) -> PendingView<'a> {
    let now = pool.observed.now;
    let mut view = PendingView {
        latest_for_donor: latest_for_donor(&pool.observed.pending),
        ..PendingView::default()
    };
    for p in &pool.observed.pending {
        let superseded = p
            .donor
            .as_deref()
            .and_then(|d| view.latest_for_donor.get(d))
            .is_some_and(|q| q.name != p.name);
        let donor_gone = p.donor.as_deref().is_some_and(|d| !pool.live(d));
        let node = pool.node(&p.name);
        if p.failed_at.is_some() {
            if node.is_some() {
                view.joining.insert(p.name.as_str());
            }
            if superseded || donor_gone {
                view.actions.push(Action::ForgetPending {
                    name: p.name.clone(),
                });
            }
            continue;
        }
        let joined = node.is_some_and(|n| up_to_date(desired, n) && !n.deleting);
        if joined {
            // Paired (with its donor, or with another donor that needed it
            // more), or its donor is gone: the record has done its job.
            let paired = match p.donor.as_deref() {
                Some(d) => !pool.live(d) || node.is_some_and(|n| n.heir_of.is_some()),
                None => true,
            };
            if paired {
                view.actions.push(Action::ForgetPending {
                    name: p.name.clone(),
                });
            } else {
                view.pending_heirs.insert(p.name.as_str());
            }
            continue;
        }
        view.joining.insert(p.name.as_str());
        if !donor_gone && p.donor.is_some() {
            view.pending_heirs.insert(p.name.as_str());
        }
        if now > p.deadline {
            view.actions.push(Action::MarkFailed {
                name: p.name.clone(),
                reason: format!(
                    "machine {} did not join and attest for {} within the join deadline",
                    p.name, desired.image
                ),
            });
        } else {
            if node.is_none() {
                // A crash between recording the PendingNode and asking the
                // provider leaves a record without a machine.
                view.actions.push(Action::EnsureMachine {
                    name: p.name.clone(),
                    image: p.image.clone(),
                });
            }
            view.waiting.push(p.name.clone());
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::model::Observed;
    use crate::planner::tests::{desired, node, pending};

    fn view_of(observed: &Observed) -> PendingView<'_> {
        classify_pending(&desired(2), &Pool::new(observed))
    }

    #[test]
    fn a_record_without_its_machine_gets_the_machine_ensured() {
        let observed = Observed {
            now: 100,
            pending: vec![pending("new-1", Some("old-0"), 1, 160)],
            nodes: vec![node("old-0", "node:v1")],
            ..Observed::default()
        };
        let view = view_of(&observed);
        assert_eq!(
            view.actions,
            vec![Action::EnsureMachine {
                name: "new-1".into(),
                image: "node:v2".into()
            }]
        );
        assert_eq!(view.waiting, vec!["new-1".to_owned()]);
        assert!(view.joining.contains("new-1"));
        assert!(view.pending_heirs.contains("new-1"));
    }

    #[test]
    fn a_record_past_its_deadline_is_marked_failed_and_nothing_is_ensured() {
        let observed = Observed {
            now: 200,
            pending: vec![pending("new-1", None, 1, 160)],
            ..Observed::default()
        };
        let view = view_of(&observed);
        assert!(matches!(
            view.actions.as_slice(),
            [Action::MarkFailed { name, reason }] if name == "new-1" && reason.contains("join deadline")
        ));
        assert!(view.waiting.is_empty());
    }

    #[test]
    fn a_joined_and_paired_heir_forgets_its_record() {
        let mut heir = node("new-1", "node:v2");
        heir.heir_of = Some("old-0".into());
        let observed = Observed {
            now: 100,
            pending: vec![pending("new-1", Some("old-0"), 1, 160)],
            nodes: vec![node("old-0", "node:v1"), heir],
            ..Observed::default()
        };
        let view = view_of(&observed);
        assert_eq!(
            view.actions,
            vec![Action::ForgetPending {
                name: "new-1".into()
            }]
        );
        assert!(view.joining.is_empty());
    }

    #[test]
    fn a_joined_heir_not_yet_paired_keeps_its_record() {
        let observed = Observed {
            now: 100,
            pending: vec![pending("new-1", Some("old-0"), 1, 160)],
            nodes: vec![node("old-0", "node:v1"), node("new-1", "node:v2")],
            ..Observed::default()
        };
        let view = view_of(&observed);
        assert!(view.actions.is_empty());
        assert!(view.pending_heirs.contains("new-1"));
        assert!(!view.joining.contains("new-1"));
    }

    #[test]
    fn a_failed_record_is_forgotten_once_a_later_attempt_exists() {
        let mut failed = pending("new-1", Some("old-0"), 1, 160);
        failed.failed_at = Some(161);
        let observed = Observed {
            now: 300,
            pending: vec![failed, pending("new-2", Some("old-0"), 2, 400)],
            nodes: vec![node("old-0", "node:v1")],
            ..Observed::default()
        };
        let view = view_of(&observed);
        assert!(view.actions.contains(&Action::ForgetPending {
            name: "new-1".into()
        }));
        assert_eq!(
            view.latest_for_donor.get("old-0").map(|p| p.attempts),
            Some(2)
        );
    }
}
