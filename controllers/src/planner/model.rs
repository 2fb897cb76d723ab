//! The planner's data: the desired state of a pool (resolved from its
//! NodeVersion), what was observed of it, the actions it asks for and the
//! status it reports, plus the small predicates every phase shares (is a
//! node up to date, trusted, available). No I/O.

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
    /// Carries the `confidential.dev/unattested` NoExecute taint: revoked
    /// once, it is replaced even if a later attestation succeeds.
    pub revoked: bool,
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
    /// When the first valid attestation of the pool expires (the reconciler
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

/// One step for the reconciler, which carries it out idempotently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A PendingNode whose machine has not registered yet: ask the provider
    /// for its machine again (creation is idempotent), so a crash between
    /// recording the PendingNode and asking the provider loses no machine.
    EnsureMachine { name: String, image: String },
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
    /// The node's attestation expired or failed: taint it `NoExecute`
    /// (`confidential.dev/unattested`) and cordon it. It is then drained and
    /// replaced like any invalid node.
    Revoke { node: String, reason: String },
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
pub(super) fn up_to_date(desired: &Desired, node: &NodeObs) -> bool {
    node.ready && current(desired, node)
}

/// Attested for the desired image with the desired kubelet version.
pub(super) fn current(desired: &Desired, node: &NodeObs) -> bool {
    node.attested_image.as_deref() == Some(desired.image.as_str())
        && trusted(node)
        && node.kubelet_version == desired.kubernetes_version
}

/// Holds a valid attestation and was never revoked.
pub fn trusted(node: &NodeObs) -> bool {
    node.attested_image.is_some() && !node.attestation_invalid && !node.revoked
}

/// Counts towards the availability budget: Ready, schedulable, trusted.
pub fn available(node: &NodeObs) -> bool {
    node.ready && !node.cordoned && !node.deleting && trusted(node)
}

/// Backoff before attempt `next` (2, 3, ...) of a slot.
pub fn retry_delay(base: Seconds, next_attempt: u32) -> Seconds {
    let exp = next_attempt.saturating_sub(2).min(10);
    base * (1 << exp)
}

/// The name of a new machine: pool, time and an index, avoiding `taken`.
pub(super) fn fresh_name(pool: &str, now: Seconds, taken: &BTreeSet<String>) -> String {
    let stem: String = pool.chars().take(40).collect();
    (0u32..)
        .map(|i| format!("{stem}-{now:x}{i:x}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| format!("{stem}-{now:x}"))
}
