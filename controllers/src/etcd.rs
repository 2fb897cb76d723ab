//! etcd membership of control-plane pools: before the operator deletes a
//! control-plane donor, its etcd member is removed, and only when that keeps
//! quorum with the pool's full strength. Replacing a control-plane machine
//! without this leaves a dead voting member behind: after two such
//! replacements a three-member etcd has lost quorum and the cluster stops.
//!
//! The order of a control-plane replacement: the heir machine adds its own
//! member right before its etcd starts (as `kubeadm join --control-plane`
//! does: only the machine knows its peer URL, and a member added long before
//! it starts counts against quorum while it cannot vote); the operator waits
//! until the heir's member is started and healthy, removes the donor's
//! member, and only then deletes the donor's machine and Node.
//!
//! The decision ([`decide_removal`]) is pure: it takes the members and their
//! health and says which member to remove or why to wait. Members are
//! identified by the node's name (kubeadm names a member after its node) or
//! by the host of a peer URL; two candidates make the operator wait rather
//! than guess.

mod client;

use std::path::PathBuf;

pub use client::EtcdClient;

use crate::planner::{Action, Blocked, Desired};

/// Errors talking to etcd or configuring access to it.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("etcd at {endpoint} refused the request ({status}): {message}")]
    Refused {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("no etcd endpoint configured")]
    NoEndpoints,
    #[error("unexpected etcd answer: {0}")]
    Malformed(String),
    #[error("etcd TLS setup: {0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
}

/// A member id (etcd's uint64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(pub u64);

impl std::fmt::Display for MemberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A member of the etcd cluster. `name` is empty until the member started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: MemberId,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// Learners replicate but do not vote; they never count for quorum.
    pub learner: bool,
}

impl Member {
    /// Started members have a name (and client URLs).
    pub fn started(&self) -> bool {
        !self.name.is_empty()
    }

    fn label(&self) -> String {
        if self.started() {
            self.name.clone()
        } else {
            format!(
                "{} (added, not started: {})",
                self.id,
                self.peer_urls.join(",")
            )
        }
    }
}

/// A member and whether it answered its health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberHealth {
    pub member: Member,
    pub healthy: bool,
}

/// How many voters must agree: a strict majority.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// How many voters may fail while the rest keep quorum.
pub fn fault_tolerance(voters: usize) -> usize {
    voters.saturating_sub(quorum(voters))
}

/// Why a donor's member may not be removed yet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitReason {
    #[error("several etcd members could be {node}'s ({candidates}); refusing to guess")]
    Ambiguous { node: String, candidates: String },
    #[error(
        "removing {node}'s etcd member would leave {remaining} voting members while other members are not healthy ({unhealthy}); {healthy} of them healthy, quorum of {remaining} is {quorum}"
    )]
    OthersUnhealthy {
        node: String,
        remaining: usize,
        healthy: usize,
        quorum: usize,
        unhealthy: String,
    },
    #[error(
        "removing {node}'s etcd member would leave {remaining} voting members, the pool wants {wanted}: waiting for its heir's member to join etcd"
    )]
    HeirNotJoined {
        node: String,
        remaining: usize,
        wanted: usize,
    },
    #[error("{node}'s etcd member is the last voting member")]
    LastMember { node: String },
}

/// What to do with a donor's member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Remove this member.
    Remove(MemberId),
    /// The node has no member (never had one, or already removed).
    NotAMember,
    /// Removing it now would cost quorum or fault tolerance.
    Wait(WaitReason),
}

/// The host of a URL (`https://host:port/...`), IPv6 brackets removed.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Whether `member` is `node`'s: named after it, or peering from it.
fn belongs_to(member: &Member, node: &str) -> bool {
    member.name == node || member.peer_urls.iter().any(|u| url_host(u) == node)
}

/// Decides whether `node`'s member may leave a cluster whose control-plane
/// pool wants `replicas` voters. It may when every other voter is started
/// and healthy and at least `replicas` of them (at least one) remain: the
/// heir has joined, and nothing else is already failing.
pub fn decide_removal(node: &str, members: &[MemberHealth], replicas: usize) -> Removal {
    let candidates: Vec<&MemberHealth> = members
        .iter()
        .filter(|m| belongs_to(&m.member, node))
        .collect();
    let donor = match candidates.as_slice() {
        [] => return Removal::NotAMember,
        [one] => *one,
        many => {
            return Removal::Wait(WaitReason::Ambiguous {
                node: node.to_owned(),
                candidates: many
                    .iter()
                    .map(|m| m.member.label())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    if donor.member.learner {
        // A learner never votes: removing it cannot cost quorum.
        return Removal::Remove(donor.member.id);
    }
    let voters: Vec<&MemberHealth> = members
        .iter()
        .filter(|m| m.member.id != donor.member.id && !m.member.learner)
        .collect();
    let remaining = voters.len();
    if remaining == 0 {
        return Removal::Wait(WaitReason::LastMember {
            node: node.to_owned(),
        });
    }
    let unhealthy: Vec<String> = voters
        .iter()
        .filter(|m| !m.healthy || !m.member.started())
        .map(|m| m.member.label())
        .collect();
    if !unhealthy.is_empty() {
        return Removal::Wait(WaitReason::OthersUnhealthy {
            node: node.to_owned(),
            remaining,
            healthy: remaining - unhealthy.len(),
            quorum: quorum(remaining),
            unhealthy: unhealthy.join(", "),
        });
    }
    if remaining < replicas {
        return Removal::Wait(WaitReason::HeirNotJoined {
            node: node.to_owned(),
            remaining,
            wanted: replicas,
        });
    }
    Removal::Remove(donor.member.id)
}

/// Whether etcd refused a membership change with its own quorum guard
/// (`--strict-reconfig-check`): members connected for less than its health
/// interval do not count as active yet. Worth waiting for, not an error.
pub fn is_reconfiguration_refusal(message: &str) -> bool {
    [
        "unhealthy cluster",
        "not enough started members",
        "re-configuration failed",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// The outcome of asking a node to leave the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leave {
    /// The node is no longer an etcd member: its machine may go.
    Left,
    /// Not yet; the reason is shown to users (condition, Event).
    Wait(String),
}

/// How the operator reaches etcd (from `--etcd-*` flags).
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// `https://host:port` client URLs.
    pub endpoints: Vec<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The operator's `--etcd-*` flags as given.
#[derive(Clone, Debug, Default)]
pub struct EtcdFlags {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdFlags {
    /// Checks the flags: none (no etcd access: control-plane pools will not
    /// roll) or all of them, every endpoint `https://`.
    pub fn validate(&self) -> Result<bool, EtcdError> {
        let given = [
            ("--etcd-endpoints", !self.endpoints.is_empty()),
            ("--etcd-ca-file", self.ca_file.is_some()),
            ("--etcd-cert-file", self.cert_file.is_some()),
            ("--etcd-key-file", self.key_file.is_some()),
        ];
        let missing: Vec<&str> = given.iter().filter(|(_, g)| !g).map(|(f, _)| *f).collect();
        if missing.len() == given.len() {
            return Ok(false);
        }
        if !missing.is_empty() {
            return Err(EtcdError::Config(format!(
                "etcd access needs all of --etcd-endpoints, --etcd-ca-file, --etcd-cert-file and --etcd-key-file; missing {}",
                missing.join(", ")
            )));
        }
        if let Some(bad) = self
            .endpoints
            .iter()
            .find(|e| !e.starts_with("https://") || url_host(e).is_empty())
        {
            return Err(EtcdError::Config(format!(
                "etcd endpoint {bad:?} is not an https:// URL (etcd member management needs TLS with a client certificate)"
            )));
        }
        Ok(true)
    }

    /// Reads the files the flags name; `None` when no flag is given.
    pub fn load(&self) -> Result<Option<EtcdSettings>, EtcdError> {
        if !self.validate()? {
            return Ok(None);
        }
        let read = |flag: &str, path: &Option<PathBuf>| {
            let path = path.as_ref().ok_or_else(|| {
                EtcdError::Config(format!("{flag} is required with --etcd-endpoints"))
            })?;
            std::fs::read_to_string(path)
                .map_err(|e| EtcdError::Config(format!("{flag} {}: {e}", path.display())))
        };
        Ok(Some(EtcdSettings {
            endpoints: self.endpoints.clone(),
            ca_pem: read("--etcd-ca-file", &self.ca_file)?,
            cert_pem: read("--etcd-cert-file", &self.cert_file)?,
            key_pem: read("--etcd-key-file", &self.key_file)?,
        }))
    }
}

/// What the operator tells users when it has no etcd access.
pub const NO_ETCD_ACCESS: &str = "the operator has no etcd access, so it cannot take control-plane machines out of etcd: start it with --etcd-endpoints, --etcd-ca-file, --etcd-cert-file and --etcd-key-file";

/// The operator's side of control-plane membership: decides and removes.
#[derive(Clone)]
pub struct EtcdMembership {
    client: EtcdClient,
}

impl EtcdMembership {
    pub fn new(settings: &EtcdSettings) -> Result<Self, EtcdError> {
        Ok(Self {
            client: EtcdClient::new(settings)?,
        })
    }

    /// The client (for callers that also add members or watch health).
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    /// The members with their health, read with quorum.
    pub async fn members(&self) -> Result<Vec<MemberHealth>, EtcdError> {
        let members = self.client.member_list().await?;
        let health =
            futures::future::join_all(members.iter().map(|m| self.client.healthy(m))).await;
        Ok(members
            .into_iter()
            .zip(health)
            .map(|(member, healthy)| MemberHealth { member, healthy })
            .collect())
    }

    /// Removes `node`'s member when that keeps quorum and `replicas` voters;
    /// otherwise says why it waits. Idempotent: a node without a member has
    /// left.
    pub async fn leave(&self, node: &str, replicas: u32) -> Result<Leave, EtcdError> {
        let members = self.members().await?;
        let replicas = usize::try_from(replicas).unwrap_or(usize::MAX);
        match decide_removal(node, &members, replicas) {
            Removal::NotAMember => {
                tracing::info!(%node, "no etcd member for this node; nothing to remove");
                Ok(Leave::Left)
            }
            Removal::Wait(reason) => {
                tracing::info!(%node, %reason, "etcd member removal waits");
                Ok(Leave::Wait(reason.to_string()))
            }
            Removal::Remove(id) => match self.client.member_remove(id).await {
                Ok(after) => {
                    tracing::info!(%node, member = %id, remaining = after.len(), "removed etcd member");
                    Ok(Leave::Left)
                }
                Err(EtcdError::Refused { message, .. }) if is_reconfiguration_refusal(&message) => {
                    tracing::info!(%node, %message, "etcd refuses the removal yet");
                    Ok(Leave::Wait(format!(
                        "etcd refuses to remove {node}'s member yet: {message}"
                    )))
                }
                Err(err) => Err(err),
            },
        }
    }
}

/// Whether an action starts or completes a replacement, which for a
/// control-plane machine ends in removing its etcd member. Exhaustive on
/// purpose: a new action must be classified here.
fn replaces_machines(action: &Action) -> bool {
    match action {
        Action::CreateMachine { .. }
        | Action::EnsureMachine { .. }
        | Action::PairHeir { .. }
        | Action::Cordon {
            start_drain: true, ..
        }
        | Action::Evict { .. }
        | Action::LeaveControlPlane { .. }
        | Action::DeleteMachine { .. }
        | Action::DeleteNode { .. }
        | Action::MarkFailed { .. } => true,
        // Fencing an untrusted node, bookkeeping and status stay possible.
        Action::Cordon {
            start_drain: false, ..
        }
        | Action::Revoke { .. }
        | Action::CopyLabels { .. }
        | Action::ForgetPending { .. }
        | Action::UpdateStatus(_) => false,
    }
}

/// A control-plane pool replaces no machine while the provider cannot take
/// them out of etcd: those actions are held and the pool is blocked saying
/// what is missing. Cordoning an untrusted node still happens. Worker pools
/// pass unchanged.
pub fn hold_without_membership(
    desired: &Desired,
    membership: Result<(), String>,
    actions: Vec<Action>,
) -> Vec<Action> {
    let Err(reason) = membership else {
        return actions;
    };
    if !desired.control_plane || !actions.iter().any(replaces_machines) {
        return actions;
    }
    actions
        .into_iter()
        .filter(|a| !replaces_machines(a))
        .map(|a| match a {
            Action::UpdateStatus(mut status) => {
                status.blocked.push(Blocked::EtcdUnavailable {
                    reason: reason.clone(),
                });
                Action::UpdateStatus(status)
            }
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests;
