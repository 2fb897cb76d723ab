//! The rollout planner: a pure function from the desired state of one node
//! pool and what was observed of it to the next actions. No I/O happens here;
//! the reconciler (`crate::reconciler`) carries the actions out
//! idempotently, and every piece of progress the planner relies on is stored
//! in the API (PendingNodes, Node annotations, cordons, taints), so planning
//! again after a restart yields the same next step.
//!
//! A rollout pairs every outdated or invalid node (a *donor*) with a new
//! machine (its *heir*). The heir is created within `maxSurge`; only when it is
//! Ready and attested for the desired image is the donor cordoned, drained
//! through the Eviction API and deleted. A node whose attestation expired or
//! failed is revoked at once (tainted `NoExecute`, cordoned) and replaced.
//!
//! [`plan`] runs six phases, each a module with its own example tests:
//! [`pending`] (classify PendingNodes, ensure their machines), [`nodes`]
//! (classify nodes, revoke untrusted ones), [`pairing`] (pair joined heirs
//! with donors), [`donors`] (drain and delete donors, create their heirs),
//! and [`scale`] (scale down extra nodes, scale up missing slots). Safety
//! invariants, checked by the property tests in `tests/planner_properties.rs`:
//!
//! - actions never bring the available nodes below `replicas - maxUnavailable`
//!   (nor lower them further when the world already did);
//! - a node is deleted only when its heir is Ready and attested;
//! - pods leave only through `Evict` actions, never by deletion.

use std::collections::{BTreeMap, BTreeSet};

mod donors;
mod model;
mod nodes;
mod pairing;
mod pending;
mod scale;

pub use model::*;

/// The observed pool with its nodes by name.
pub(crate) struct Pool<'a> {
    observed: &'a Observed,
    nodes: BTreeMap<&'a str, &'a NodeObs>,
}

impl<'a> Pool<'a> {
    fn new(observed: &'a Observed) -> Self {
        Self {
            observed,
            nodes: observed
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n))
                .collect(),
        }
    }

    fn node(&self, name: &str) -> Option<&'a NodeObs> {
        self.nodes.get(name).copied()
    }

    /// A Node of that name exists and is not being deleted.
    fn live(&self, name: &str) -> bool {
        self.node(name).is_some_and(|n| !n.deleting)
    }
}

/// How many machines this plan may still create.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Machines within `replicas + surge`.
    creatable: u32,
    /// Surge kept for failed slots that back off before their retry.
    reserved: u32,
    /// A slot used all its join attempts: the pool creates nothing more.
    blocked: bool,
}

impl Capacity {
    /// Untrusted machines (invalid, being replaced) do not count against the
    /// surge: they are no capacity, and replacing them must not wait for the
    /// rollout they would otherwise block. A slot whose join failed keeps its
    /// surge while it backs off, so failures are retried in place instead of
    /// spreading over other donors.
    fn of(
        desired: &Desired,
        pool: &Pool<'_>,
        pending: &pending::PendingView<'_>,
        donors: &[&NodeObs],
    ) -> Self {
        let machines = pool
            .observed
            .nodes
            .iter()
            .filter(|n| {
                !n.deleting
                    && (!(n.attestation_invalid || n.revoked)
                        || pending.joining.contains(n.name.as_str()))
            })
            .count() as u32
            + pool
                .observed
                .pending
                .iter()
                .filter(|p| p.failed_at.is_none() && pool.node(&p.name).is_none())
                .count() as u32;
        let failed_slots: Vec<u32> = donors
            .iter()
            .filter_map(|d| {
                pending
                    .latest_for_donor
                    .get(d.name.as_str())
                    .filter(|p| p.failed_at.is_some())
                    .map(|p| p.attempts)
            })
            .collect();
        Self {
            creatable: (desired.replicas + desired.surge()).saturating_sub(machines),
            reserved: failed_slots
                .iter()
                .filter(|a| **a < desired.max_join_attempts)
                .count() as u32,
            blocked: failed_slots.iter().any(|a| *a >= desired.max_join_attempts),
        }
    }
}

/// Names new machines and builds their `CreateMachine` actions.
pub(crate) struct Namer {
    taken: BTreeSet<String>,
    now: Seconds,
}

impl Namer {
    fn new(pool: &Pool<'_>) -> Self {
        let mut taken: BTreeSet<String> = pool.nodes.keys().map(|s| (*s).to_owned()).collect();
        taken.extend(pool.observed.pending.iter().map(|p| p.name.clone()));
        Self {
            taken,
            now: pool.observed.now,
        }
    }

    fn create(&mut self, desired: &Desired, donor: Option<String>, attempt: u32) -> Action {
        let name = fresh_name(&desired.pool, self.now, &self.taken);
        self.taken.insert(name.clone());
        Action::CreateMachine {
            name,
            image: desired.image.clone(),
            donor,
            attempt,
            deadline: self.now + desired.join_deadline,
        }
    }
}

/// The plan being built: actions in order, the status, and the available
/// nodes left after the cordons planned so far.
pub(crate) struct Plan {
    actions: Vec<Action>,
    status: PoolStatus,
    available_now: u32,
}

/// Plans the next actions for one pool. The last action is always
/// `UpdateStatus`.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Action> {
    let pool = Pool::new(observed);
    let pending = pending::classify_pending(desired, &pool);
    let mut classes = nodes::classify_nodes(desired, &pool, &pending);
    let mut out = Plan {
        actions: pending.actions.clone(),
        status: PoolStatus {
            pending: pending.waiting.clone(),
            ..PoolStatus::default()
        },
        available_now: observed.nodes.iter().filter(|n| available(n)).count() as u32,
    };
    out.actions
        .extend(nodes::revoke_untrusted(&pool, &classes.donors));
    let mut capacity = Capacity::of(desired, &pool, &pending, &classes.donors);
    let mut namer = Namer::new(&pool);
    let new_pairs =
        pairing::pair_heirs(desired, &pool, &pending, &classes.donors, out.available_now);
    donors::replace_donors(
        desired,
        &pool,
        &pending,
        &classes.donors,
        &classes.surplus,
        &new_pairs,
        &mut capacity,
        &mut namer,
        &mut out,
    );
    let extra = scale::scale_down(desired, &pool, &pending, &classes);
    classes
        .up_to_date
        .retain(|u| !extra.iter().any(|n| &n.name == u));
    for leaving in classes.surplus.iter().chain(&extra) {
        donors::drain_or_delete(desired, observed.now, leaving, false, &mut out);
    }
    scale::scale_up(
        desired,
        &pool,
        &pending,
        &mut capacity,
        &mut namer,
        &mut out,
    );

    let mut status = out.status;
    status.up_to_date = classes.up_to_date;
    status.outdated = classes.outdated;
    status.invalid = classes.invalid;
    status.up_to_date.sort();
    status.heirs.sort();
    status.heirs.dedup();
    status.pending.sort();
    status.progressing = !status.outdated.is_empty()
        || !status.invalid.is_empty()
        || !status.pending.is_empty()
        || !out.actions.is_empty();
    let mut actions = out.actions;
    actions.push(Action::UpdateStatus(status));
    actions
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pool of `replicas` at image `node:v2`, surge 1, no unavailability.
    pub(crate) fn desired(replicas: u32) -> Desired {
        Desired {
            pool: "workers".into(),
            image: "node:v2".into(),
            kubernetes_version: "v1.35.4".into(),
            replicas,
            control_plane: false,
            max_surge: Amount::Count(1),
            max_unavailable: Amount::Count(0),
            drain_timeout: 120,
            join_deadline: 60,
            max_join_attempts: DEFAULT_MAX_JOIN_ATTEMPTS,
            join_retry_backoff: JOIN_RETRY_BACKOFF,
            delete_empty_dir_data: false,
            evict_unmanaged_pods: false,
        }
    }

    /// A Ready node attested for `image` with the desired kubelet.
    pub(crate) fn node(name: &str, image: &str) -> NodeObs {
        NodeObs {
            name: name.into(),
            ready: true,
            kubelet_version: "v1.35.4".into(),
            attested_image: Some(image.into()),
            ..NodeObs::default()
        }
    }

    /// A PendingNode for image `node:v2`.
    pub(crate) fn pending(
        name: &str,
        donor: Option<&str>,
        attempts: u32,
        deadline: Seconds,
    ) -> PendingObs {
        PendingObs {
            name: name.into(),
            image: "node:v2".into(),
            donor: donor.map(str::to_owned),
            deadline,
            attempts,
            failed_at: None,
        }
    }

    fn status(actions: &[Action]) -> &PoolStatus {
        match actions.last() {
            Some(Action::UpdateStatus(s)) => s,
            other => panic!("the last action is not UpdateStatus: {other:?}"),
        }
    }

    #[test]
    fn a_settled_pool_plans_nothing_but_its_status() {
        let observed = Observed {
            now: 10,
            nodes: vec![node("a", "node:v2"), node("b", "node:v2")],
            ..Observed::default()
        };
        let actions = plan(&desired(2), &observed);
        assert_eq!(actions.len(), 1);
        let status = status(&actions);
        assert_eq!(status.up_to_date, vec!["a", "b"]);
        assert!(!status.progressing);
    }

    #[test]
    fn an_outdated_pool_creates_one_heir_within_the_surge() {
        let observed = Observed {
            now: 10,
            nodes: vec![node("a", "node:v1"), node("b", "node:v1")],
            ..Observed::default()
        };
        let actions = plan(&desired(2), &observed);
        assert!(matches!(
            actions.as_slice(),
            [Action::CreateMachine { donor: Some(d), attempt: 1, deadline: 70, .. }, Action::UpdateStatus(_)]
                if d == "a"
        ));
        let status = status(&actions);
        assert_eq!(status.outdated, vec!["a", "b"]);
        assert!(status.progressing);
    }

    #[test]
    fn an_expired_node_is_revoked_and_replaced_without_waiting_for_the_surge() {
        let mut expired = node("b", "node:v2");
        expired.attestation_invalid = true;
        let observed = Observed {
            now: 10,
            nodes: vec![node("a", "node:v2"), expired],
            ..Observed::default()
        };
        let actions = plan(&desired(2), &observed);
        assert!(matches!(&actions[0], Action::Revoke { node, .. } if node == "b"));
        assert!(matches!(
            &actions[1],
            Action::CreateMachine { donor: Some(d), .. } if d == "b"
        ));
        assert_eq!(status(&actions).invalid, vec!["b"]);
    }

    #[test]
    fn a_pool_blocked_by_a_control_plane_roll_creates_nothing() {
        let observed = Observed {
            now: 10,
            nodes: vec![node("a", "node:v1")],
            control_plane_rolling: true,
            ..Observed::default()
        };
        let actions = plan(&desired(1), &observed);
        assert_eq!(actions.len(), 1, "{actions:?}");
    }
}
