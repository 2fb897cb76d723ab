//! Phases 5 and 6, scale down and scale up. Down: more up-to-date nodes
//! than replicas once nothing else is in flight (a heir whose attestation
//! lapsed, was replaced, and then recovered leaves one machine too many);
//! the extra nodes leave like surplus heirs. Up: slots without a node (a new
//! pool, nodes that vanished) get machines within the surge, failed joins
//! retried with backoff up to the attempt limit.

use std::collections::BTreeSet;

use super::model::{Blocked, Desired, NodeObs, PendingObs, retry_delay, up_to_date};
use super::nodes::NodeClasses;
use super::pending::PendingView;
use super::{Action, Capacity, Namer, Plan, Pool};

/// Up-to-date nodes beyond `replicas` that should leave, once no donor,
/// surplus node or joining machine is in flight. Cordoned ones go first,
/// then ones that are not heirs, then by name, so the choice is stable
/// while they drain.
pub(super) fn scale_down<'a>(
    desired: &Desired,
    pool: &Pool<'a>,
    pending: &PendingView<'a>,
    classes: &NodeClasses<'a>,
) -> Vec<&'a NodeObs> {
    let in_flight = !classes.donors.is_empty()
        || !classes.surplus.is_empty()
        || !pending.waiting.is_empty()
        || !pending.joining.is_empty();
    let excess = classes
        .up_to_date
        .len()
        .saturating_sub(desired.replicas as usize);
    if in_flight || excess == 0 {
        return Vec::new();
    }
    let mut extra: Vec<&NodeObs> = pool
        .nodes
        .values()
        .copied()
        .filter(|n| !n.deleting && up_to_date(desired, n))
        .collect();
    extra.sort_by_key(|n| (!n.cordoned, n.heir_of.is_some(), n.name.clone()));
    extra.truncate(excess);
    extra
}

/// Creates machines for slots without a node.
pub(super) fn scale_up(
    desired: &Desired,
    pool: &Pool<'_>,
    pending: &PendingView<'_>,
    capacity: &mut Capacity,
    namer: &mut Namer,
    out: &mut Plan,
) {
    let now = pool.observed.now;
    let failed_names: BTreeSet<&str> = pool
        .observed
        .pending
        .iter()
        .filter(|p| p.failed_at.is_some())
        .map(|p| p.name.as_str())
        .collect();
    let occupied = pool
        .observed
        .nodes
        .iter()
        .filter(|n| {
            !n.deleting
                && !n.heir_of.as_deref().is_some_and(|d| pool.live(d))
                && !pending.pending_heirs.contains(n.name.as_str())
                && !failed_names.contains(n.name.as_str())
        })
        .count() as u32
        + pool
            .observed
            .pending
            .iter()
            .filter(|p| p.donor.is_none() && p.failed_at.is_none() && pool.node(&p.name).is_none())
            .count() as u32;
    let mut failures: Vec<&PendingObs> = pool
        .observed
        .pending
        .iter()
        .filter(|p| p.donor.is_none() && p.failed_at.is_some())
        .collect();
    failures.sort_by_key(|p| std::cmp::Reverse(p.attempts));
    let mut failures = failures.into_iter();
    let mut missing = desired.replicas.saturating_sub(occupied);
    while missing > 0 && capacity.creatable > capacity.reserved && !capacity.blocked {
        let previous = failures.next();
        let attempt = previous.map_or(1, |p| p.attempts + 1);
        if let Some(p) = previous {
            if p.attempts >= desired.max_join_attempts {
                out.status.blocked.push(Blocked::JoinsFailing {
                    donor: None,
                    attempts: p.attempts,
                });
                break;
            }
            if now < p.failed_at.unwrap_or(now) + retry_delay(desired.join_retry_backoff, attempt) {
                break;
            }
            out.actions.push(Action::ForgetPending {
                name: p.name.clone(),
            });
        }
        missing -= 1;
        capacity.creatable -= 1;
        out.actions.push(namer.create(desired, None, attempt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::model::{Observed, PoolStatus};
    use crate::planner::nodes::classify_nodes;
    use crate::planner::pending::classify_pending;
    use crate::planner::tests::{desired, node, pending};

    fn scale_up_of(observed: &Observed, creatable: u32) -> Plan {
        let desired = desired(3);
        let pool = Pool::new(observed);
        let view = classify_pending(&desired, &pool);
        let mut capacity = Capacity {
            creatable,
            reserved: 0,
            blocked: false,
        };
        let mut namer = Namer::new(&pool);
        let mut out = Plan {
            actions: Vec::new(),
            status: PoolStatus::default(),
            available_now: 0,
        };
        scale_up(&desired, &pool, &view, &mut capacity, &mut namer, &mut out);
        out
    }

    #[test]
    fn missing_slots_get_machines_within_the_capacity() {
        let observed = Observed {
            now: 16,
            nodes: vec![node("a", "node:v2")],
            ..Observed::default()
        };
        let out = scale_up_of(&observed, 4);
        let created: Vec<_> = out
            .actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::CreateMachine {
                        donor: None,
                        attempt: 1,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(created.len(), 2, "{:?}", out.actions);
        assert_eq!(scale_up_of(&observed, 1).actions.len(), 1, "capacity 1");
    }

    #[test]
    fn a_failed_slot_is_retried_after_its_backoff_then_blocks_the_pool() {
        let mut failed = pending("new-0", None, 1, 50);
        failed.failed_at = Some(60);
        let mut observed = Observed {
            now: 61,
            nodes: vec![node("a", "node:v2"), node("b", "node:v2")],
            pending: vec![failed],
            ..Observed::default()
        };
        assert!(scale_up_of(&observed, 2).actions.is_empty(), "backing off");
        observed.now = 60 + 10;
        let out = scale_up_of(&observed, 2);
        assert_eq!(out.actions.len(), 2, "{:?}", out.actions);
        assert_eq!(
            out.actions[0],
            Action::ForgetPending {
                name: "new-0".into()
            }
        );
        assert!(matches!(
            out.actions[1],
            Action::CreateMachine { attempt: 2, .. }
        ));
        observed.pending[0].attempts = 3;
        let out = scale_up_of(&observed, 2);
        assert!(out.actions.is_empty());
        assert!(matches!(
            out.status.blocked.as_slice(),
            [Blocked::JoinsFailing {
                donor: None,
                attempts: 3
            }]
        ));
    }

    #[test]
    fn extra_up_to_date_nodes_leave_only_when_nothing_is_in_flight() {
        let mut cordoned = node("z", "node:v2");
        cordoned.cordoned = true;
        let mut observed = Observed {
            now: 10,
            nodes: vec![
                node("a", "node:v2"),
                node("b", "node:v2"),
                node("c", "node:v2"),
                cordoned,
            ],
            ..Observed::default()
        };
        let desired = desired(3);
        let names = |observed: &Observed| {
            let pool = Pool::new(observed);
            let view = classify_pending(&desired, &pool);
            let classes = classify_nodes(&desired, &pool, &view);
            scale_down(&desired, &pool, &view, &classes)
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&observed), vec!["z"], "the cordoned one first");
        observed.pending.push(pending("new-0", None, 1, 100));
        assert!(names(&observed).is_empty(), "a machine is joining");
    }
}
