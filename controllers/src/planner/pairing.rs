//! Phase 3, pair heirs: a joined heir is paired with the donor its machine
//! was made for, unless that donor is available, the budget forbids
//! cordoning it, and an unavailable donor without a heir could take the heir
//! instead (otherwise an invalid node would hold the budget and the surge
//! forever). A heir whose attestation lapsed is no heir: it is replaced
//! itself.

use std::collections::BTreeMap;

use super::Pool;
use super::model::{Desired, NodeObs, available, current, up_to_date};
use super::pending::PendingView;

/// The heir already paired with `donor` in the API (either annotation), if
/// it is still current.
pub(super) fn paired_with<'a>(
    desired: &Desired,
    pool: &Pool<'a>,
    donor: &NodeObs,
) -> Option<&'a NodeObs> {
    pool.nodes.values().copied().find(|h| {
        !h.deleting
            && current(desired, h)
            && (h.heir_of.as_deref() == Some(donor.name.as_str())
                || donor.donor_for.as_deref() == Some(h.name.as_str()))
    })
}

/// New pairs (donor name → heir) for joined heirs not paired yet.
/// `available_now` is the availability before any action of this plan.
pub(super) fn pair_heirs<'a>(
    desired: &Desired,
    pool: &Pool<'a>,
    pending: &PendingView<'a>,
    donors: &[&'a NodeObs],
    available_now: u32,
) -> BTreeMap<&'a str, &'a NodeObs> {
    let mut new_pairs: BTreeMap<&'a str, &'a NodeObs> = BTreeMap::new();
    let mut budget = available_now;
    for p in &pool.observed.pending {
        let Some(d) = p.donor.as_deref() else {
            continue;
        };
        let Some(heir) = pool.node(&p.name) else {
            continue;
        };
        if p.failed_at.is_some()
            || heir.heir_of.is_some()
            || heir.deleting
            || !up_to_date(desired, heir)
            || !pool.live(d)
        {
            continue;
        }
        let intended = pool.node(d);
        let intended_free = intended.is_some_and(|dn| {
            paired_with(desired, pool, dn).is_none() && !new_pairs.contains_key(dn.name.as_str())
        });
        let affordable = intended.is_some_and(|dn| {
            !available(dn) || budget.saturating_sub(1) >= desired.min_available()
        });
        let needy = donors.iter().copied().find(|x| {
            !available(x)
                && paired_with(desired, pool, x).is_none()
                && !new_pairs.contains_key(x.name.as_str())
                && pending
                    .latest_for_donor
                    .get(x.name.as_str())
                    .is_none_or(|q| q.failed_at.is_some() || q.name == p.name)
        });
        let target = match (intended_free && affordable, needy) {
            (true, _) => intended,
            (false, Some(x)) => Some(x),
            (false, None) if intended_free => intended,
            _ => None,
        };
        if let Some(t) = target {
            if available(t) {
                budget = budget.saturating_sub(1);
            }
            new_pairs.insert(t.name.as_str(), heir);
        }
    }
    new_pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::model::Observed;
    use crate::planner::pending::classify_pending;
    use crate::planner::tests::{desired, node, pending};

    fn pairs(observed: &Observed, donors: &[&str]) -> Vec<(String, String)> {
        let desired = desired(2);
        let pool = Pool::new(observed);
        let view = classify_pending(&desired, &pool);
        let donors: Vec<&NodeObs> = donors.iter().filter_map(|d| pool.node(d)).collect();
        let available_now = observed.nodes.iter().filter(|n| available(n)).count() as u32;
        pair_heirs(&desired, &pool, &view, &donors, available_now)
            .into_iter()
            .map(|(d, h)| (d.to_owned(), h.name.clone()))
            .collect()
    }

    #[test]
    fn a_joined_heir_is_paired_with_the_donor_it_was_made_for() {
        let observed = Observed {
            now: 10,
            nodes: vec![
                node("old-0", "node:v1"),
                node("old-1", "node:v1"),
                node("new-0", "node:v2"),
            ],
            pending: vec![pending("new-0", Some("old-0"), 1, 100)],
            ..Observed::default()
        };
        assert_eq!(
            pairs(&observed, &["old-0", "old-1"]),
            vec![("old-0".into(), "new-0".into())]
        );
    }

    #[test]
    fn an_unavailable_donor_takes_the_heir_when_the_budget_forbids_the_intended_one() {
        // replicas 2, maxUnavailable 0: cordoning available old-0 would leave
        // one available node (old-1 is NotReady), so the heir goes to old-1.
        let mut down = node("old-1", "node:v1");
        down.ready = false;
        let observed = Observed {
            now: 10,
            nodes: vec![node("old-0", "node:v1"), down, node("new-0", "node:v2")],
            pending: vec![pending("new-0", Some("old-0"), 1, 100)],
            ..Observed::default()
        };
        // new-0 is available too: 2 available, minimum 2, so old-0 may not go.
        assert_eq!(
            pairs(&observed, &["old-1", "old-0"]),
            vec![("old-1".into(), "new-0".into())]
        );
    }

    #[test]
    fn a_heir_not_ready_is_not_paired() {
        let mut heir = node("new-0", "node:v2");
        heir.ready = false;
        let observed = Observed {
            now: 10,
            nodes: vec![node("old-0", "node:v1"), heir],
            pending: vec![pending("new-0", Some("old-0"), 1, 100)],
            ..Observed::default()
        };
        assert!(pairs(&observed, &["old-0"]).is_empty());
    }
}
