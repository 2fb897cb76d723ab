//! Examples of the pure parts: quorum math, which member leaves, when to
//! wait, the flags, and holding a control-plane pool without etcd access.

use super::*;
use crate::planner::{Amount, PoolStatus};

fn member(id: u64, name: &str, healthy: bool) -> MemberHealth {
    MemberHealth {
        member: Member {
            id: MemberId(id),
            name: name.to_owned(),
            peer_urls: vec![format!("https://10.0.0.{id}:2380")],
            client_urls: if name.is_empty() {
                vec![]
            } else {
                vec![format!("https://10.0.0.{id}:2379")]
            },
            learner: false,
        },
        healthy,
    }
}

fn learner(id: u64, name: &str) -> MemberHealth {
    let mut m = member(id, name, true);
    m.member.learner = true;
    m
}

#[test]
fn quorum_is_a_strict_majority() {
    let table = [
        (1, 1, 0),
        (2, 2, 0),
        (3, 2, 1),
        (4, 3, 1),
        (5, 3, 2),
        (6, 4, 2),
        (7, 4, 3),
    ];
    for (voters, q, tolerance) in table {
        assert_eq!(quorum(voters), q, "quorum of {voters}");
        assert_eq!(fault_tolerance(voters), tolerance, "tolerance of {voters}");
    }
    assert_eq!(fault_tolerance(0), 0);
}

#[test]
fn removes_the_donor_once_its_heir_is_a_healthy_member() {
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-b", true),
        member(3, "cp-c", true),
        member(4, "cp-heir", true),
    ];
    assert_eq!(
        decide_removal("cp-a", &members, 3),
        Removal::Remove(MemberId(1))
    );
    // The donor's own health does not matter: the others carry quorum.
    let members = [
        member(1, "cp-a", false),
        member(2, "cp-b", true),
        member(3, "cp-c", true),
        member(4, "cp-heir", true),
    ];
    assert_eq!(
        decide_removal("cp-a", &members, 3),
        Removal::Remove(MemberId(1))
    );
}

#[test]
fn waits_while_the_heir_has_not_joined_etcd() {
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-b", true),
        member(3, "cp-c", true),
    ];
    assert_eq!(
        decide_removal("cp-a", &members, 3),
        Removal::Wait(WaitReason::HeirNotJoined {
            node: "cp-a".into(),
            remaining: 2,
            wanted: 3
        })
    );
}

#[test]
fn waits_while_the_heir_was_added_but_has_not_started() {
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-b", true),
        member(3, "cp-c", true),
        member(4, "", false),
    ];
    let Removal::Wait(WaitReason::OthersUnhealthy {
        remaining,
        healthy,
        quorum,
        unhealthy,
        ..
    }) = decide_removal("cp-a", &members, 3)
    else {
        panic!("removed while the heir had not started");
    };
    assert_eq!((remaining, healthy, quorum), (3, 2, 2));
    assert!(unhealthy.contains("not started"), "{unhealthy}");
}

#[test]
fn waits_while_another_member_is_unhealthy() {
    // Three voters, one failing: removing a healthy one would leave two
    // voters with one healthy, below the quorum of two.
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-b", false),
        member(3, "cp-c", true),
        member(4, "cp-heir", true),
    ];
    let decision = decide_removal("cp-a", &members, 3);
    assert!(
        matches!(&decision, Removal::Wait(WaitReason::OthersUnhealthy { unhealthy, .. }) if unhealthy == "cp-b"),
        "{decision:?}"
    );
    // Each other member, one by one.
    for sick in ["cp-c", "cp-heir"] {
        let members: Vec<MemberHealth> = members
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.healthy = m.member.name != sick;
                m
            })
            .collect();
        assert!(
            matches!(
                decide_removal("cp-a", &members, 3),
                Removal::Wait(WaitReason::OthersUnhealthy { .. })
            ),
            "removed cp-a while {sick} was unhealthy"
        );
    }
}

#[test]
fn never_removes_the_last_voter() {
    assert_eq!(
        decide_removal("cp-a", &[member(1, "cp-a", true)], 0),
        Removal::Wait(WaitReason::LastMember {
            node: "cp-a".into()
        })
    );
    // A learner next to it does not vote either.
    assert_eq!(
        decide_removal("cp-a", &[member(1, "cp-a", true), learner(2, "cp-b")], 0),
        Removal::Wait(WaitReason::LastMember {
            node: "cp-a".into()
        })
    );
}

#[test]
fn a_learner_leaves_at_once_and_never_counts_as_a_voter() {
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-b", true),
        member(3, "cp-c", true),
        learner(4, "cp-heir"),
    ];
    assert_eq!(
        decide_removal("cp-heir", &members, 3),
        Removal::Remove(MemberId(4))
    );
    // A heir still learning does not make the donor removable.
    assert!(matches!(
        decide_removal("cp-a", &members, 3),
        Removal::Wait(WaitReason::HeirNotJoined { remaining: 2, .. })
    ));
}

#[test]
fn a_node_without_a_member_has_left() {
    let members = [member(1, "cp-b", true), member(2, "cp-c", true)];
    assert_eq!(decide_removal("cp-a", &members, 2), Removal::NotAMember);
    assert_eq!(decide_removal("cp-a", &[], 3), Removal::NotAMember);
}

#[test]
fn identifies_an_unstarted_member_by_its_peer_host() {
    let mut unstarted = member(4, "", false);
    unstarted.member.peer_urls = vec!["https://cp-d.example:2380".into()];
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-b", true),
        member(3, "cp-c", true),
        unstarted,
    ];
    assert_eq!(
        decide_removal("cp-d.example", &members, 3),
        Removal::Remove(MemberId(4))
    );
}

#[test]
fn two_candidates_make_it_wait_instead_of_guessing() {
    // A member named after the node and another peering from a host of that
    // name: removing the wrong one would cut a live voter.
    let mut other = member(2, "cp-b", true);
    other.member.peer_urls = vec!["https://cp-a:2380".into()];
    let members = [member(1, "cp-a", true), other, member(3, "cp-c", true)];
    assert!(matches!(
        decide_removal("cp-a", &members, 1),
        Removal::Wait(WaitReason::Ambiguous { .. })
    ));
    // Names are compared exactly: a prefix is not a match.
    let members = [
        member(1, "cp-a", true),
        member(2, "cp-a2", true),
        member(3, "cp-c", true),
        member(4, "cp-d", true),
    ];
    assert_eq!(
        decide_removal("cp-a", &members, 3),
        Removal::Remove(MemberId(1))
    );
}

#[test]
fn etcds_own_quorum_guard_means_wait() {
    for refusal in [
        "etcdserver: unhealthy cluster",
        "etcdserver: re-configuration failed due to not enough started members",
    ] {
        assert!(is_reconfiguration_refusal(refusal), "{refusal}");
    }
    for error in ["etcdserver: member not found", "permission denied", ""] {
        assert!(!is_reconfiguration_refusal(error), "{error}");
    }
}

#[test]
fn url_hosts() {
    assert_eq!(url_host("https://10.0.0.1:2380"), "10.0.0.1");
    assert_eq!(url_host("https://cp-a:2380/x"), "cp-a");
    assert_eq!(url_host("https://[fd00::1]:2380"), "fd00::1");
    assert_eq!(url_host("https://user@cp-a:2380"), "cp-a");
    assert_eq!(url_host("cp-a"), "cp-a");
}

fn flags(endpoints: &[&str], ca: bool, cert: bool, key: bool) -> EtcdFlags {
    EtcdFlags {
        endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
        ca_file: ca.then(|| "/etc/etcd/ca.crt".into()),
        cert_file: cert.then(|| "/etc/etcd/client.crt".into()),
        key_file: key.then(|| "/etc/etcd/client.key".into()),
    }
}

#[test]
fn etcd_flags_are_all_or_nothing() {
    assert!(!flags(&[], false, false, false).validate().unwrap_or(true));
    assert!(
        flags(&["https://10.0.0.1:2379"], true, true, true)
            .validate()
            .unwrap_or(false)
    );
    for (f, missing) in [
        (flags(&[], true, true, true), "--etcd-endpoints"),
        (
            flags(&["https://a:2379"], false, true, true),
            "--etcd-ca-file",
        ),
        (
            flags(&["https://a:2379"], true, false, true),
            "--etcd-cert-file",
        ),
        (
            flags(&["https://a:2379"], true, true, false),
            "--etcd-key-file",
        ),
    ] {
        let err = f
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(&format!("missing {missing}")), "{err}");
    }
}

#[test]
fn etcd_endpoints_must_be_https() {
    for bad in ["http://10.0.0.1:2379", "10.0.0.1:2379", "https://"] {
        let err = flags(&["https://ok:2379", bad], true, true, true)
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not an https:// URL"), "{bad}: {err}");
    }
}

#[test]
fn missing_flag_files_are_named() {
    let err = flags(&["https://a:2379"], true, true, true)
        .load()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("--etcd-ca-file /etc/etcd/ca.crt"), "{err}");
}

fn desired(control_plane: bool) -> Desired {
    Desired {
        pool: "cp".into(),
        image: "img:v2".into(),
        kubernetes_version: "v1.35.4".into(),
        replicas: 3,
        control_plane,
        max_surge: Amount::Count(1),
        max_unavailable: Amount::Count(0),
        drain_timeout: 600,
        join_deadline: 600,
        max_join_attempts: 3,
        join_retry_backoff: 5,
        delete_empty_dir_data: false,
        evict_unmanaged_pods: false,
    }
}

fn roll() -> Vec<Action> {
    vec![
        Action::LeaveControlPlane {
            node: "cp-a".into(),
        },
        Action::DeleteMachine {
            name: "cp-a".into(),
        },
        Action::UpdateStatus(PoolStatus {
            progressing: true,
            ..PoolStatus::default()
        }),
    ]
}

#[test]
fn a_control_plane_pool_without_etcd_access_changes_nothing_and_says_why() {
    let held = hold_without_membership(&desired(true), Err(NO_ETCD_ACCESS.into()), roll());
    let [Action::UpdateStatus(status)] = held.as_slice() else {
        panic!("actions kept: {held:?}");
    };
    assert!(status.progressing);
    assert_eq!(
        status.blocked,
        vec![Blocked::EtcdUnavailable {
            reason: NO_ETCD_ACCESS.into()
        }]
    );
}

#[test]
fn an_untrusted_control_plane_node_is_still_cordoned_without_etcd_access() {
    let mut actions = vec![Action::Cordon {
        node: "cp-b".into(),
        start_drain: false,
    }];
    actions.extend(roll());
    let held = hold_without_membership(&desired(true), Err(NO_ETCD_ACCESS.into()), actions);
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(
        held[0],
        Action::Cordon {
            node: "cp-b".into(),
            start_drain: false
        }
    );
    assert!(matches!(&held[1], Action::UpdateStatus(s) if s.blocked.len() == 1));
    // Only fencing to do: nothing is held, nothing is blocked.
    let fence = vec![
        Action::Cordon {
            node: "cp-b".into(),
            start_drain: false,
        },
        Action::UpdateStatus(PoolStatus::default()),
    ];
    assert_eq!(
        hold_without_membership(&desired(true), Err("x".into()), fence.clone()),
        fence
    );
}

#[test]
fn only_control_plane_pools_with_work_are_held() {
    assert_eq!(
        hold_without_membership(&desired(true), Ok(()), roll()),
        roll()
    );
    assert_eq!(
        hold_without_membership(&desired(false), Err("x".into()), roll()),
        roll()
    );
    let settled = vec![Action::UpdateStatus(PoolStatus::default())];
    assert_eq!(
        hold_without_membership(&desired(true), Err("x".into()), settled.clone()),
        settled
    );
}
