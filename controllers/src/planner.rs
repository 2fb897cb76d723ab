//! The rollout planner: a pure function from the desired state of one node
//! pool and what was observed of it to the next actions. No I/O happens here;
//! the executor (`crate::executor`) carries the actions out idempotently, and
//! every piece of progress the planner relies on is stored in the API
//! (PendingNodes, Node annotations, cordons), so planning again after a
//! restart yields the same next step.
//!
//! A rollout pairs every outdated or invalid node (a *donor*) with a new
//! machine (its *heir*). The heir is created within `maxSurge`; only when it is
//! Ready and attested for the desired image is the donor cordoned, drained
//! through the Eviction API and deleted. Safety invariants (checked by the
//! property tests in this module):
//!
//! - actions never bring the available nodes below `replicas - maxUnavailable`
//!   (nor lower them further when the world already did);
//! - a node is deleted only when its heir is Ready and attested;
//! - pods leave only through `Evict` actions, never by deletion.

use std::collections::{BTreeMap, BTreeSet};

/// Seconds since the Unix epoch; the planner's notion of time.
pub type Seconds = i64;

/// How many join attempts a slot gets before the pool is blocked.
pub const DEFAULT_MAX_JOIN_ATTEMPTS: u32 = 3;
/// Default first retry delay after a failed join.
pub const JOIN_RETRY_BACKOFF: Seconds = 10;

/// A count or a percentage of `replicas` (`IntOrString` in the API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// Parses `IntOrString` values: `3`, `"3"`, `"10%"`.
    pub fn parse(value: &str) -> Option<Self> {
        match value.strip_suffix('%') {
            Some(p) => p.trim().parse().ok().map(Amount::Percent),
            None => value.trim().parse().ok().map(Amount::Count),
        }
    }

    /// Resolves against `replicas`; percentages round up for surge (`up`) and
    /// down for unavailability, as Deployments do.
    pub fn resolve(self, replicas: u32, up: bool) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => {
                let scaled = u64::from(replicas) * u64::from(p);
                let value = if up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                u32::try_from(value).unwrap_or(u32::MAX)
            }
        }
    }
}

/// The desired state of a pool, resolved from its NodeVersion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub pool: String,
    pub image: String,
    pub kubernetes_version: String,
    pub replicas: u32,
    pub control_plane: bool,
    pub max_surge: Amount,
    pub max_unavailable: Amount,
    pub drain_timeout: Seconds,
    pub join_deadline: Seconds,
    pub max_join_attempts: u32,
    /// First retry delay after a failed join; doubled per further failure.
    pub join_retry_backoff: Seconds,
    pub delete_empty_dir_data: bool,
    pub evict_unmanaged_pods: bool,
}

impl Desired {
    /// New machines that may exist beyond `replicas` (at least 1, at most 1
    /// for control-plane pools: a donor never leaves before its heir is
    /// Ready, so a rollout without surge could not progress).
    pub fn surge(&self) -> u32 {
        if self.control_plane {
            1
        } else {
            self.max_surge.resolve(self.replicas, true).max(1)
        }
    }

    /// Nodes that may be unavailable (0 for control-plane pools).
    pub fn unavailable(&self) -> u32 {
        if self.control_plane {
            0
        } else {
            self.max_unavailable
                .resolve(self.replicas, false)
                .min(self.replicas)
        }
    }

    /// The fewest available nodes the planner's actions may leave.
    pub fn min_available(&self) -> u32 {
        self.replicas - self.unavailable()
    }
}

/// A pod on a node that is being drained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// Owned by a DaemonSet: skipped (the DaemonSet controller owns it).
    pub daemon_set: bool,
    /// A static pod mirrored by the kubelet: skipped.
    pub mirror: bool,
    /// Uses an emptyDir volume: evicted only with `deleteEmptyDirData`.
    pub empty_dir: bool,
    /// Has a controller owner: without one it is evicted only with
    /// `evictUnmanagedPods` (nothing would recreate it).
    pub managed: bool,
    /// Already terminating (deletionTimestamp set): wait for it to go.
    pub terminating: bool,
    /// Already finished (Succeeded/Failed): nothing to protect, evicted freely.
    pub finished: bool,
}

impl PodInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What was observed of one Node of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeObs {
    pub name: String,
    /// Ready condition True.
    pub ready: bool,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// deletionTimestamp set.
    pub deleting: bool,
    /// kubelet version reported in `status.nodeInfo`.
    pub kubelet_version: String,
    /// Image of a valid (trusted, unexpired) NodeAttestation, if any.
    pub attested_image: Option<String>,
    /// A NodeAttestation exists but expired or is untrusted.
    pub attestation_invalid: bool,
    /// `heir-of` annotation.
    pub heir_of: Option<String>,
    /// `donor-for` annotation.
    pub donor_for: Option<String>,
    /// Drain start (annotation written with the cordon).
    pub drain_started: Option<Seconds>,
    /// Labels that are not reserved (copied from donor to heir).
    pub labels: BTreeMap<String, String>,
    /// Pods bound to the node (only needed for donors being drained).
    pub pods: Vec<PodInfo>,
}

/// A PendingNode of the pool with goal Join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingObs {
    /// Node name of the machine (also the PendingNode name).
    pub name: String,
    pub image: String,
    /// The donor this machine replaces, if it is a heir.
    pub donor: Option<String>,
    pub deadline: Seconds,
    /// Attempt number of this machine for its slot (1 = first).
    pub attempts: u32,
    /// Failed (deadline passed, machine deleted) and when.
    pub failed_at: Option<Seconds>,
}

/// Everything observed of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Observed {
    pub now: Seconds,
    pub nodes: Vec<NodeObs>,
    pub pending: Vec<PendingObs>,
    /// A control-plane pool is still rolling: a worker pool starts no new
    /// replacements until it is done.
    pub control_plane_rolling: bool,
    /// When the first valid attestation of the pool expires (the executor
    /// wakes up then: re-attestation expiry needs no event).
    pub earliest_expiry: Option<Seconds>,
}

/// Why a pool cannot progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// A slot exhausted its join attempts.
    JoinsFailing {
        donor: Option<String>,
        attempts: u32,
    },
    /// A drain exceeded its timeout; these pods remain.
    DrainTimeout { node: String, pods: Vec<String> },
    /// Pods that policy forbids evicting (emptyDir / unmanaged without opt-in).
    PodsNotEvictable { node: String, pods: Vec<String> },
    /// etcd (issue 9): a control-plane pool may not change because the
    /// operator cannot take its machines out of etcd (what is missing).
    EtcdUnavailable { reason: String },
    /// etcd (issue 9): a control-plane donor waits to leave etcd (its heir's
    /// member has not joined, or quorum is at risk).
    EtcdQuorumWait { node: String, reason: String },
}

/// A node's place in the rollout.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PoolStatus {
    pub up_to_date: Vec<String>,
    pub outdated: Vec<String>,
    pub donors: Vec<String>,
    pub heirs: Vec<String>,
    pub pending: Vec<String>,
    pub invalid: Vec<String>,
    pub blocked: Vec<Blocked>,
    /// Pods the current drains wait for (`namespace/name`).
    pub blocking_pods: Vec<String>,
    /// Nodes still to be replaced or joins still to happen.
    pub progressing: bool,
}

/// One step for the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Record a PendingNode and ask the provider for a machine.
    CreateMachine {
        name: String,
        image: String,
        donor: Option<String>,
        attempt: u32,
        deadline: Seconds,
    },
    /// Annotate heir and donor with each other.
    PairHeir { heir: String, donor: String },
    /// Copy the donor's non-reserved labels to the heir.
    CopyLabels {
        to: String,
        labels: BTreeMap<String, String>,
    },
    /// Mark the node unschedulable; with `start_drain` also record when its
    /// drain started (the drain timeout counts from then).
    Cordon { node: String, start_drain: bool },
    /// Evict one pod through the Eviction API.
    Evict {
        node: String,
        namespace: String,
        pod: String,
    },
    /// Remove a control-plane node from etcd membership.
    LeaveControlPlane { node: String },
    /// Ask the provider to delete the machine.
    DeleteMachine { name: String },
    /// Delete the Node object.
    DeleteNode { node: String },
    /// The machine missed its join deadline: it is deleted (machine and any
    /// Node) and its PendingNode marked Failed.
    MarkFailed { name: String, reason: String },
    /// Forget a PendingNode (joined, or a superseded failure).
    ForgetPending { name: String },
    /// Write the pool status.
    UpdateStatus(PoolStatus),
}

/// Labels the planner never copies from donor to heir.
pub fn is_reserved_label(key: &str) -> bool {
    key.starts_with("confidential.dev/")
        || key.starts_with("kubernetes.io/")
        || key.starts_with("node.kubernetes.io/")
        || key.starts_with("node-role.kubernetes.io/")
        || key.starts_with("beta.kubernetes.io/")
        || key.starts_with("topology.kubernetes.io/")
        || key.starts_with("node-restriction.kubernetes.io/")
}

/// Whether a node is fully current: Ready, attested for the desired image,
/// the desired kubelet version.
fn up_to_date(desired: &Desired, node: &NodeObs) -> bool {
    node.ready && current(desired, node)
}

/// Attested for the desired image with the desired kubelet version.
fn current(desired: &Desired, node: &NodeObs) -> bool {
    node.attested_image.as_deref() == Some(desired.image.as_str())
        && !node.attestation_invalid
        && node.kubelet_version == desired.kubernetes_version
}

/// Counts towards the availability budget: Ready, schedulable, trusted.
pub fn available(node: &NodeObs) -> bool {
    node.ready
        && !node.cordoned
        && !node.deleting
        && node.attested_image.is_some()
        && !node.attestation_invalid
}

/// Backoff before attempt `next` (2, 3, ...) of a slot.
pub fn retry_delay(base: Seconds, next_attempt: u32) -> Seconds {
    let exp = next_attempt.saturating_sub(2).min(10);
    base * (1 << exp)
}

/// The name of a new machine: pool, time and an index, avoiding `taken`.
fn fresh_name(pool: &str, now: Seconds, taken: &BTreeSet<String>) -> String {
    let stem: String = pool.chars().take(40).collect();
    (0u32..)
        .map(|i| format!("{stem}-{now:x}{i:x}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| format!("{stem}-{now:x}"))
}

/// Plans the next actions for one pool. The last action is always
/// `UpdateStatus`.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Action> {
    let now = observed.now;
    let mut actions = Vec::new();
    let mut status = PoolStatus::default();
    let nodes: BTreeMap<&str, &NodeObs> = observed
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let live = |name: &str| nodes.get(name).is_some_and(|n| !n.deleting);
    let mut taken: BTreeSet<String> = nodes.keys().map(|s| (*s).to_owned()).collect();
    taken.extend(observed.pending.iter().map(|p| p.name.clone()));
    let workers_wait = observed.control_plane_rolling && !desired.control_plane;

    // The latest PendingNode of every donor's slot.
    let mut latest_for_donor: BTreeMap<&str, &PendingObs> = BTreeMap::new();
    for p in &observed.pending {
        if let Some(d) = p.donor.as_deref()
            && latest_for_donor
                .get(d)
                .is_none_or(|q| p.attempts > q.attempts)
        {
            latest_for_donor.insert(d, p);
        }
    }
    // Names of machines with a PendingNode (failed or not): never donors.
    let mut joining: BTreeSet<&str> = BTreeSet::new();
    // Heirs-to-be whose donor is alive: they do not occupy a slot.
    let mut pending_heirs: BTreeSet<&str> = BTreeSet::new();

    for p in &observed.pending {
        let superseded = p
            .donor
            .as_deref()
            .and_then(|d| latest_for_donor.get(d))
            .is_some_and(|q| q.name != p.name);
        let donor_gone = p.donor.as_deref().is_some_and(|d| !live(d));
        let node = nodes.get(p.name.as_str()).copied();
        if p.failed_at.is_some() {
            if node.is_some() {
                joining.insert(p.name.as_str());
            }
            if superseded || donor_gone {
                actions.push(Action::ForgetPending {
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
                Some(d) => !live(d) || node.is_some_and(|n| n.heir_of.is_some()),
                None => true,
            };
            if paired {
                actions.push(Action::ForgetPending {
                    name: p.name.clone(),
                });
            } else {
                pending_heirs.insert(p.name.as_str());
            }
            continue;
        }
        joining.insert(p.name.as_str());
        if !donor_gone && p.donor.is_some() {
            pending_heirs.insert(p.name.as_str());
        }
        if now > p.deadline {
            actions.push(Action::MarkFailed {
                name: p.name.clone(),
                reason: format!(
                    "machine {} did not join and attest for {} within the join deadline",
                    p.name, desired.image
                ),
            });
        } else {
            status.pending.push(p.name.clone());
        }
    }

    // Classify nodes.
    let mut donors: Vec<&NodeObs> = Vec::new();
    let mut surplus: Vec<&NodeObs> = Vec::new();
    for n in nodes.values() {
        if n.deleting {
            continue;
        }
        let valid = n.attested_image.is_some() && !n.attestation_invalid;
        if up_to_date(desired, n) {
            status.up_to_date.push(n.name.clone());
        } else if joining.contains(n.name.as_str()) {
            // A machine of this rollout that has not joined (or failed).
        } else if n.heir_of.as_deref().is_some_and(live) && current(desired, n) {
            // A paired heir that is not Ready right now: wait for it.
        } else if n.heir_of.as_deref().is_some_and(live) {
            // A heir whose attestation lapsed before its donor left: its
            // donor gets another heir, and it is drained and removed.
            status.invalid.push(n.name.clone());
            surplus.push(n);
        } else if !valid {
            status.invalid.push(n.name.clone());
            donors.push(n);
        } else if !current(desired, n) {
            status.outdated.push(n.name.clone());
            donors.push(n);
        }
    }
    // Unavailable donors (invalid, NotReady) first: replacing them costs no
    // availability.
    donors.sort_by_key(|n| (available(n), n.name.clone()));

    // Invalid (untrusted, expired) nodes are cordoned at once: they are not
    // available anyway, so the budget does not change.
    for n in &donors {
        let valid = n.attested_image.is_some() && !n.attestation_invalid;
        if !valid && !n.cordoned {
            actions.push(Action::Cordon {
                node: n.name.clone(),
                start_drain: false,
            });
        }
    }

    let mut available_now = observed.nodes.iter().filter(|n| available(n)).count() as u32;
    // Untrusted machines (invalid, being replaced) do not count against the
    // surge: they are no capacity, and replacing them must not wait for the
    // rollout they would otherwise block.
    let machines = observed
        .nodes
        .iter()
        .filter(|n| !n.deleting && (!n.attestation_invalid || joining.contains(n.name.as_str())))
        .count() as u32
        + observed
            .pending
            .iter()
            .filter(|p| p.failed_at.is_none() && !nodes.contains_key(p.name.as_str()))
            .count() as u32;
    let mut creatable = (desired.replicas + desired.surge()).saturating_sub(machines);
    let mut create = |donor: Option<String>, attempt: u32, actions: &mut Vec<Action>| {
        let name = fresh_name(&desired.pool, now, &taken);
        taken.insert(name.clone());
        actions.push(Action::CreateMachine {
            name,
            image: desired.image.clone(),
            donor,
            attempt,
            deadline: now + desired.join_deadline,
        });
    };

    // Pairing: a joined heir is paired with the donor its machine was made
    // for, unless that donor is available, the budget forbids cordoning it,
    // and an unavailable donor without a heir could take the heir instead
    // (otherwise an invalid node would hold the budget and the surge forever).
    // A heir whose attestation lapsed is no heir: it is replaced itself.
    let paired_with = |d: &NodeObs| {
        nodes.values().copied().find(|h| {
            !h.deleting
                && current(desired, h)
                && (h.heir_of.as_deref() == Some(d.name.as_str())
                    || d.donor_for.as_deref() == Some(h.name.as_str()))
        })
    };
    let mut new_pairs: BTreeMap<&str, &NodeObs> = BTreeMap::new();
    let mut budget = available_now;
    for p in &observed.pending {
        let Some(d) = p.donor.as_deref() else {
            continue;
        };
        let Some(heir) = nodes.get(p.name.as_str()).copied() else {
            continue;
        };
        if p.failed_at.is_some()
            || heir.heir_of.is_some()
            || heir.deleting
            || !up_to_date(desired, heir)
            || !live(d)
        {
            continue;
        }
        let intended = nodes.get(d).copied();
        let intended_free = intended.is_some_and(|dn| {
            paired_with(dn).is_none() && !new_pairs.contains_key(dn.name.as_str())
        });
        let affordable = intended.is_some_and(|dn| {
            !available(dn) || budget.saturating_sub(1) >= desired.min_available()
        });
        let needy = donors.iter().copied().find(|x| {
            !available(x)
                && paired_with(x).is_none()
                && !new_pairs.contains_key(x.name.as_str())
                && latest_for_donor
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

    // A slot whose join failed keeps its surge while it backs off, so
    // failures are retried in place instead of spreading over other donors;
    // once a slot has used all its attempts the pool creates nothing more.
    let failed_slot = |d: &&NodeObs| {
        latest_for_donor
            .get(d.name.as_str())
            .filter(|p| p.failed_at.is_some())
            .map(|p| p.attempts)
    };
    let mut reserved = donors
        .iter()
        .filter_map(failed_slot)
        .filter(|a| *a < desired.max_join_attempts)
        .count() as u32;
    let pool_blocked = donors
        .iter()
        .filter_map(failed_slot)
        .any(|a| a >= desired.max_join_attempts);

    for donor in &donors {
        status.donors.push(donor.name.clone());
        let latest = latest_for_donor.get(donor.name.as_str()).copied();
        let heir = paired_with(donor)
            .or_else(|| new_pairs.get(donor.name.as_str()).copied())
            .or_else(|| {
                latest
                    .filter(|p| p.failed_at.is_none())
                    .and_then(|p| nodes.get(p.name.as_str()).copied())
                    // A joined machine not paired with this donor went to
                    // another one: this donor needs a new machine.
                    .filter(|h| !up_to_date(desired, h))
            });
        let latest = latest.filter(|p| {
            p.failed_at.is_some()
                || nodes
                    .get(p.name.as_str())
                    .is_none_or(|h| !up_to_date(desired, h))
        });
        if let Some(heir) = heir.filter(|h| up_to_date(desired, h) && !h.deleting) {
            if heir.heir_of.as_deref() != Some(donor.name.as_str())
                || donor.donor_for.as_deref() != Some(heir.name.as_str())
            {
                actions.push(Action::PairHeir {
                    heir: heir.name.clone(),
                    donor: donor.name.clone(),
                });
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
            }
            status.heirs.push(heir.name.clone());
            let hold = surplus
                .iter()
                .any(|x| x.heir_of.as_deref() == Some(donor.name.as_str()));
            drain_or_delete(
                desired,
                now,
                donor,
                hold,
                &mut available_now,
                &mut actions,
                &mut status,
            );
            continue;
        }
        if let Some(heir) = heir {
            // A heir exists but is not Ready and attested yet: wait.
            status.heirs.push(heir.name.clone());
            continue;
        }
        match latest {
            Some(p) if p.failed_at.is_none() => status.heirs.push(p.name.clone()),
            Some(p) => {
                if p.attempts >= desired.max_join_attempts {
                    status.blocked.push(Blocked::JoinsFailing {
                        donor: Some(donor.name.clone()),
                        attempts: p.attempts,
                    });
                } else if !workers_wait
                    && !pool_blocked
                    && creatable > 0
                    && now
                        >= p.failed_at.unwrap_or(now)
                            + retry_delay(desired.join_retry_backoff, p.attempts + 1)
                {
                    creatable -= 1;
                    reserved = reserved.saturating_sub(1);
                    create(Some(donor.name.clone()), p.attempts + 1, &mut actions);
                }
            }
            None => {
                if !workers_wait && !pool_blocked && creatable > reserved {
                    creatable -= 1;
                    create(Some(donor.name.clone()), 1, &mut actions);
                }
            }
        }
    }

    // Scale down: more up-to-date nodes than replicas once nothing else is
    // in flight (a heir whose attestation lapsed, was replaced, and then
    // recovered leaves one machine too many). Extra nodes leave like surplus
    // heirs (cordon, drain through evictions, delete) within the budget; a
    // node already on its way out is picked again, so the choice is stable.
    let in_flight = !donors.is_empty()
        || !surplus.is_empty()
        || !status.pending.is_empty()
        || !joining.is_empty();
    let excess = status
        .up_to_date
        .len()
        .saturating_sub(desired.replicas as usize);
    if !in_flight && excess > 0 {
        let mut extra: Vec<&NodeObs> = nodes
            .values()
            .copied()
            .filter(|n| !n.deleting && up_to_date(desired, n))
            .collect();
        extra.sort_by_key(|n| (!n.cordoned, n.heir_of.is_some(), n.name.clone()));
        for n in extra.into_iter().take(excess) {
            status.up_to_date.retain(|u| u != &n.name);
            surplus.push(n);
        }
    }

    for x in &surplus {
        drain_or_delete(
            desired,
            now,
            x,
            false,
            &mut available_now,
            &mut actions,
            &mut status,
        );
    }

    // Scale up: slots without a node (new pools, nodes that vanished).
    let failed_names: BTreeSet<&str> = observed
        .pending
        .iter()
        .filter(|p| p.failed_at.is_some())
        .map(|p| p.name.as_str())
        .collect();
    let occupied = observed
        .nodes
        .iter()
        .filter(|n| {
            !n.deleting
                && !n.heir_of.as_deref().is_some_and(live)
                && !pending_heirs.contains(n.name.as_str())
                && !failed_names.contains(n.name.as_str())
        })
        .count() as u32
        + observed
            .pending
            .iter()
            .filter(|p| {
                p.donor.is_none() && p.failed_at.is_none() && !nodes.contains_key(p.name.as_str())
            })
            .count() as u32;
    let mut failures: Vec<&PendingObs> = observed
        .pending
        .iter()
        .filter(|p| p.donor.is_none() && p.failed_at.is_some())
        .collect();
    failures.sort_by_key(|p| std::cmp::Reverse(p.attempts));
    let mut failures = failures.into_iter();
    let mut missing = desired.replicas.saturating_sub(occupied);
    while missing > 0 && creatable > reserved && !pool_blocked {
        let previous = failures.next();
        let attempt = previous.map_or(1, |p| p.attempts + 1);
        if let Some(p) = previous {
            if p.attempts >= desired.max_join_attempts {
                status.blocked.push(Blocked::JoinsFailing {
                    donor: None,
                    attempts: p.attempts,
                });
                break;
            }
            if now < p.failed_at.unwrap_or(now) + retry_delay(desired.join_retry_backoff, attempt) {
                break;
            }
            actions.push(Action::ForgetPending {
                name: p.name.clone(),
            });
        }
        missing -= 1;
        creatable -= 1;
        create(None, attempt, &mut actions);
    }

    status.up_to_date.sort();
    status.heirs.sort();
    status.heirs.dedup();
    status.pending.sort();
    status.progressing = !status.outdated.is_empty()
        || !status.invalid.is_empty()
        || !status.pending.is_empty()
        || !actions.is_empty();
    actions.push(Action::UpdateStatus(status));
    actions
}

/// The donor has a Ready, attested heir (or is a surplus machine): cordon
/// within the budget, evict, and delete once its pods are gone, unless
/// `hold` (a lapsed heir of it still drains).
fn drain_or_delete(
    desired: &Desired,
    now: Seconds,
    donor: &NodeObs,
    hold: bool,
    available_now: &mut u32,
    actions: &mut Vec<Action>,
    status: &mut PoolStatus,
) {
    if !donor.cordoned {
        let loses = u32::from(available(donor));
        if loses == 0 || available_now.saturating_sub(loses) >= desired.min_available() {
            *available_now -= loses;
            actions.push(Action::Cordon {
                node: donor.name.clone(),
                start_drain: true,
            });
        }
        return;
    }
    if donor.drain_started.is_none() {
        // Cordoned early (invalid) or a crash between cordon and record.
        actions.push(Action::Cordon {
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
            actions.push(Action::Evict {
                node: donor.name.clone(),
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
            });
        } else {
            refused.push(pod.key());
        }
    }
    if !refused.is_empty() {
        status.blocked.push(Blocked::PodsNotEvictable {
            node: donor.name.clone(),
            pods: refused,
        });
    }
    if remaining.is_empty() && !hold {
        if desired.control_plane {
            actions.push(Action::LeaveControlPlane {
                node: donor.name.clone(),
            });
        }
        actions.push(Action::DeleteMachine {
            name: donor.name.clone(),
        });
        actions.push(Action::DeleteNode {
            node: donor.name.clone(),
        });
        return;
    }
    if remaining.is_empty() {
        return;
    }
    if donor
        .drain_started
        .is_some_and(|t| now - t > desired.drain_timeout)
    {
        status.blocked.push(Blocked::DrainTimeout {
            node: donor.name.clone(),
            pods: remaining.clone(),
        });
    }
    status.blocking_pods.extend(remaining);
}
