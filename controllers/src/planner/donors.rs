//! Phase 4, drain donors: every donor either has a Ready, attested heir
//! (pair them, copy the donor's labels, then cordon within the budget,
//! evict its pods and delete it), has a heir still joining (wait), or needs
//! a machine (create one within the surge; after a failed join, retry in
//! place with backoff; after the last attempt, report the pool blocked).
//! Surplus nodes leave the same way, without a heir.

use std::collections::BTreeMap;

use super::model::{
    Action, Blocked, Desired, NodeObs, available, is_reserved_label, retry_delay, up_to_date,
};
use super::pairing::paired_with;
use super::pending::PendingView;
use super::{Capacity, Namer, Plan, Pool};

/// Works through the donors in order (unavailable ones first).
#[allow(clippy::too_many_arguments)]
pub(super) fn replace_donors<'a>(
    desired: &Desired,
    pool: &Pool<'a>,
    pending: &PendingView<'a>,
    donors: &[&'a NodeObs],
    surplus: &[&'a NodeObs],
    new_pairs: &BTreeMap<&'a str, &'a NodeObs>,
    capacity: &mut Capacity,
    namer: &mut Namer,
    out: &mut Plan,
) {
    let now = pool.observed.now;
    let workers_wait = pool.observed.control_plane_rolling && !desired.control_plane;
    for donor in donors {
        out.status.donors.push(donor.name.clone());
        let latest = pending.latest_for_donor.get(donor.name.as_str()).copied();
        let heir = paired_with(desired, pool, donor)
            .or_else(|| new_pairs.get(donor.name.as_str()).copied())
            .or_else(|| {
                latest
                    .filter(|p| p.failed_at.is_none())
                    .and_then(|p| pool.node(&p.name))
                    // A joined machine not paired with this donor went to
                    // another one: this donor needs a new machine.
                    .filter(|h| !up_to_date(desired, h))
            });
        let latest = latest.filter(|p| {
            p.failed_at.is_some() || pool.node(&p.name).is_none_or(|h| !up_to_date(desired, h))
        });
        if let Some(heir) = heir.filter(|h| up_to_date(desired, h) && !h.deleting) {
            out.actions.extend(pair(donor, heir));
            out.status.heirs.push(heir.name.clone());
            let hold = surplus
                .iter()
                .any(|x| x.heir_of.as_deref() == Some(donor.name.as_str()));
            drain_or_delete(desired, now, donor, hold, out);
            continue;
        }
        if let Some(heir) = heir {
            // A heir exists but is not Ready and attested yet: wait.
            out.status.heirs.push(heir.name.clone());
            continue;
        }
        match latest {
            Some(p) if p.failed_at.is_none() => out.status.heirs.push(p.name.clone()),
            Some(p) => {
                if p.attempts >= desired.max_join_attempts {
                    out.status.blocked.push(Blocked::JoinsFailing {
                        donor: Some(donor.name.clone()),
                        attempts: p.attempts,
                    });
                } else if !workers_wait
                    && !capacity.blocked
                    && capacity.creatable > 0
                    && now
                        >= p.failed_at.unwrap_or(now)
                            + retry_delay(desired.join_retry_backoff, p.attempts + 1)
                {
                    capacity.creatable -= 1;
                    capacity.reserved = capacity.reserved.saturating_sub(1);
                    out.actions.push(namer.create(
                        desired,
                        Some(donor.name.clone()),
                        p.attempts + 1,
                    ));
                }
            }
            None => {
                if !workers_wait && !capacity.blocked && capacity.creatable > capacity.reserved {
                    capacity.creatable -= 1;
                    out.actions
                        .push(namer.create(desired, Some(donor.name.clone()), 1));
                }
            }
        }
    }
}

/// Pairs `heir` with `donor` unless both annotations already say so, and
/// copies the donor's non-reserved labels the heir lacks.
fn pair(donor: &NodeObs, heir: &NodeObs) -> Vec<Action> {
    if heir.heir_of.as_deref() == Some(donor.name.as_str())
        && donor.donor_for.as_deref() == Some(heir.name.as_str())
    {
        return Vec::new();
    }
    let mut actions = vec![Action::PairHeir {
        heir: heir.name.clone(),
        donor: donor.name.clone(),
    }];
    let labels: BTreeMap<String, String> = donor
        .labels
        .iter()
        .filter(|(k, v)| !is_reserved_label(k) && heir.labels.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !labels.is_empty() {
        actions.push(Action::CopyLabels {
            to: heir.name.clone(),
            labels,
        });
    }
    actions
}

/// The donor has a Ready, attested heir (or is a surplus machine): cordon
/// within the budget, evict, and delete once its pods are gone, unless
/// `hold` (a lapsed heir of it still drains).
pub(super) fn drain_or_delete(
    desired: &Desired,
    now: i64,
    donor: &NodeObs,
    hold: bool,
    out: &mut Plan,
) {
    if !donor.cordoned {
        let loses = u32::from(available(donor));
        if loses == 0 || out.available_now.saturating_sub(loses) >= desired.min_available() {
            out.available_now -= loses;
            out.actions.push(Action::Cordon {
                node: donor.name.clone(),
                start_drain: true,
            });
        }
        return;
    }
    if donor.drain_started.is_none() {
        // Cordoned early (invalid) or a crash between cordon and record.
        out.actions.push(Action::Cordon {
            node: donor.name.clone(),
            start_drain: true,
        });
    }
    let mut remaining = Vec::new();
    let mut refused = Vec::new();
    for pod in &donor.pods {
        if pod.daemon_set || pod.mirror {
            continue;
        }
        remaining.push(pod.key());
        if pod.terminating {
            continue;
        }
        let allowed = pod.finished
            || ((!pod.empty_dir || desired.delete_empty_dir_data)
                && (pod.managed || desired.evict_unmanaged_pods));
        if allowed {
            out.actions.push(Action::Evict {
                node: donor.name.clone(),
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
            });
        } else {
            refused.push(pod.key());
        }
    }
    if !refused.is_empty() {
        out.status.blocked.push(Blocked::PodsNotEvictable {
            node: donor.name.clone(),
            pods: refused,
        });
    }
    if remaining.is_empty() {
        if !hold {
            if desired.control_plane {
                out.actions.push(Action::LeaveControlPlane {
                    node: donor.name.clone(),
                });
            }
            out.actions.push(Action::DeleteMachine {
                name: donor.name.clone(),
            });
            out.actions.push(Action::DeleteNode {
                node: donor.name.clone(),
            });
        }
        return;
    }
    if donor
        .drain_started
        .is_some_and(|t| now - t > desired.drain_timeout)
    {
        out.status.blocked.push(Blocked::DrainTimeout {
            node: donor.name.clone(),
            pods: remaining.clone(),
        });
    }
    out.status.blocking_pods.extend(remaining);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::model::{PodInfo, PoolStatus};
    use crate::planner::tests::{desired, node};

    fn plan_for(donor: &NodeObs, available_now: u32) -> Plan {
        let mut out = Plan {
            actions: Vec::new(),
            status: PoolStatus::default(),
            available_now,
        };
        drain_or_delete(&desired(2), 1000, donor, false, &mut out);
        out
    }

    fn pod(name: &str) -> PodInfo {
        PodInfo {
            namespace: "app".into(),
            name: name.into(),
            daemon_set: false,
            mirror: false,
            empty_dir: false,
            managed: true,
            terminating: false,
            finished: false,
        }
    }

    #[test]
    fn an_available_donor_is_cordoned_only_within_the_budget() {
        let donor = node("old-0", "node:v1");
        assert!(plan_for(&donor, 2).actions.is_empty(), "2 - 1 < 2");
        assert_eq!(
            plan_for(&donor, 3).actions,
            vec![Action::Cordon {
                node: "old-0".into(),
                start_drain: true
            }]
        );
    }

    #[test]
    fn a_cordoned_donor_has_its_pods_evicted_and_is_deleted_once_empty() {
        let mut donor = node("old-0", "node:v1");
        donor.cordoned = true;
        donor.drain_started = Some(990);
        let mut ds = pod("ds");
        ds.daemon_set = true;
        donor.pods = vec![pod("web-1"), ds];
        let out = plan_for(&donor, 2);
        assert_eq!(
            out.actions,
            vec![Action::Evict {
                node: "old-0".into(),
                namespace: "app".into(),
                pod: "web-1".into()
            }]
        );
        assert_eq!(out.status.blocking_pods, vec!["app/web-1".to_owned()]);
        donor.pods.retain(|p| p.daemon_set);
        assert_eq!(
            plan_for(&donor, 2).actions,
            vec![
                Action::DeleteMachine {
                    name: "old-0".into()
                },
                Action::DeleteNode {
                    node: "old-0".into()
                }
            ]
        );
    }

    #[test]
    fn a_drain_past_its_timeout_reports_the_pods_it_waits_for() {
        let mut donor = node("old-0", "node:v1");
        donor.cordoned = true;
        donor.drain_started = Some(0);
        let mut unmanaged = pod("bare");
        unmanaged.managed = false;
        donor.pods = vec![unmanaged];
        let out = plan_for(&donor, 2);
        assert!(out.actions.is_empty(), "an unmanaged pod is never evicted");
        assert_eq!(
            out.status.blocked,
            vec![
                Blocked::PodsNotEvictable {
                    node: "old-0".into(),
                    pods: vec!["app/bare".into()]
                },
                Blocked::DrainTimeout {
                    node: "old-0".into(),
                    pods: vec!["app/bare".into()]
                }
            ]
        );
    }

    #[test]
    fn pairing_copies_only_labels_that_are_not_reserved() {
        let mut donor = node("old-0", "node:v1");
        donor.labels = BTreeMap::from([
            ("team".to_owned(), "a".to_owned()),
            ("kubernetes.io/hostname".to_owned(), "old-0".to_owned()),
        ]);
        let heir = node("new-0", "node:v2");
        assert_eq!(
            pair(&donor, &heir),
            vec![
                Action::PairHeir {
                    heir: "new-0".into(),
                    donor: "old-0".into()
                },
                Action::CopyLabels {
                    to: "new-0".into(),
                    labels: BTreeMap::from([("team".to_owned(), "a".to_owned())])
                }
            ]
        );
    }
}
