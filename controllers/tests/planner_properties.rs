//! Property tests of the rollout planner over random fleets and histories:
//! the planner is driven against the simulated world (`confidential_testenv::world::World`), with
//! crashes between actions (only a prefix of a plan applied), nodes going
//! NotReady, attestations expiring and machines that never attest. The safety
//! invariants of DESIGN.md are checked at every step, and progress at the end.

use confidential_controllers::planner::{
    Action, Amount, Blocked, DEFAULT_MAX_JOIN_ATTEMPTS, Desired, JOIN_RETRY_BACKOFF, NodeObs,
    Observed, available, plan,
};
use confidential_testenv::world::{World, WorldConfig};
use proptest::prelude::*;

fn desired(replicas: u32, surge: Amount, unavailable: Amount, control_plane: bool) -> Desired {
    Desired {
        pool: "workers".into(),
        image: "node:v2".into(),
        kubernetes_version: "v1.35.4".into(),
        replicas,
        control_plane,
        max_surge: surge,
        max_unavailable: unavailable,
        drain_timeout: 120,
        join_deadline: 60,
        max_join_attempts: DEFAULT_MAX_JOIN_ATTEMPTS,
        join_retry_backoff: JOIN_RETRY_BACKOFF,
        delete_empty_dir_data: false,
        evict_unmanaged_pods: false,
    }
}

fn amount() -> impl Strategy<Value = Amount> {
    prop_oneof![
        (0u32..4).prop_map(Amount::Count),
        (0u32..60).prop_map(Amount::Percent),
    ]
}

/// A fault injected at a step.
#[derive(Clone, Debug)]
enum Fault {
    /// The controller crashes after applying this many actions of the plan.
    Crash(usize),
    /// The node at this index goes NotReady for some ticks.
    NotReady(usize, u32),
    /// The attestation of the node at this index expires.
    Expire(usize),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => (0usize..6).prop_map(Fault::Crash),
        1 => (0usize..20, 1u32..6).prop_map(|(i, t)| Fault::NotReady(i, t)),
        1 => (0usize..20).prop_map(Fault::Expire),
    ]
}

/// The heir that makes deleting or draining `donor` safe, if any: a node
/// Ready and attested for the desired image, paired with the donor in the
/// observation or by a PairHeir earlier in the same plan.
fn has_ready_heir(desired: &Desired, obs: &Observed, actions: &[Action], donor: &str) -> bool {
    // A heir whose attestation lapsed while its donor still runs is surplus:
    // it leaves without a heir of its own (it never held a slot).
    let surplus = obs.nodes.iter().any(|n| {
        n.name == donor
            && n.heir_of
                .as_deref()
                .is_some_and(|d| obs.nodes.iter().any(|x| x.name == d))
            && (n.attestation_invalid
                || n.attested_image.as_deref() != Some(desired.image.as_str()))
    });
    if surplus {
        return true;
    }
    let ready = |n: &NodeObs| {
        n.ready
            && !n.deleting
            && n.attested_image.as_deref() == Some(desired.image.as_str())
            && !n.attestation_invalid
    };
    // Scale down: an extra node may leave when the pool keeps `replicas`
    // Ready nodes attested for the desired image without it.
    let others = obs
        .nodes
        .iter()
        .filter(|n| n.name != donor && ready(n))
        .count();
    if others >= desired.replicas as usize {
        return true;
    }
    obs.nodes
        .iter()
        .any(|n| ready(n) && n.heir_of.as_deref() == Some(donor))
        || actions.iter().any(|a| match a {
            Action::PairHeir { heir, donor: d } => {
                d == donor && obs.nodes.iter().any(|n| &n.name == heir && ready(n))
            }
            _ => false,
        })
}

/// Checks one plan against the safety invariants before it is applied.
fn check_plan(desired: &Desired, obs: &Observed, actions: &[Action]) -> Result<(), TestCaseError> {
    prop_assert!(matches!(actions.last(), Some(Action::UpdateStatus(_))));
    // Every node whose attestation expired is revoked (tainted, cordoned)
    // by this plan unless it already is.
    for n in obs
        .nodes
        .iter()
        .filter(|n| !n.deleting && n.attestation_invalid && !(n.revoked && n.cordoned))
    {
        prop_assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Revoke { node, .. } if node == &n.name)),
            "{} expired but was not revoked",
            n.name
        );
    }
    let mut left_control_plane = Vec::new();
    for action in actions {
        match action {
            Action::DeleteNode { node } => {
                prop_assert!(
                    has_ready_heir(desired, obs, actions, node),
                    "deleted {node} without a Ready, attested heir"
                );
                let n = obs.nodes.iter().find(|n| &n.name == node);
                let pods: Vec<_> = n
                    .map(|n| {
                        n.pods
                            .iter()
                            .filter(|p| !p.daemon_set && !p.mirror)
                            .map(|p| p.key())
                            .collect()
                    })
                    .unwrap_or_default();
                prop_assert!(pods.is_empty(), "deleted {node} with pods {pods:?}");
                if desired.control_plane {
                    prop_assert!(left_control_plane.contains(node));
                }
            }
            Action::DeleteMachine { name } => {
                let is_node = obs.nodes.iter().any(|n| &n.name == name);
                if is_node {
                    prop_assert!(has_ready_heir(desired, obs, actions, name));
                }
            }
            Action::Cordon {
                node,
                start_drain: true,
            } => {
                prop_assert!(
                    has_ready_heir(desired, obs, actions, node),
                    "drain of {node} started without a Ready heir"
                );
            }
            Action::Evict { node, .. } => {
                let n = obs.nodes.iter().find(|n| &n.name == node);
                prop_assert!(
                    n.is_some_and(|n| n.cordoned),
                    "evicted from uncordoned {node}"
                );
                prop_assert!(has_ready_heir(desired, obs, actions, node));
            }
            Action::LeaveControlPlane { node } => {
                // etcd (issue 9): a worker pool never leaves the control plane.
                prop_assert!(
                    desired.control_plane,
                    "worker pool asked {node} to leave etcd"
                );
                left_control_plane.push(node.clone());
            }
            _ => {}
        }
    }
    Ok(())
}

fn available_count(world: &World) -> u32 {
    world.nodes.values().filter(|n| available(n)).count() as u32
}

/// Runs the planner against the world for up to `steps` ticks, injecting
/// `faults` at their steps. Returns the step at which the pool was rolled.
fn drive(
    desired: &Desired,
    world: &mut World,
    faults: &[(usize, Fault)],
    steps: usize,
) -> Result<Option<usize>, TestCaseError> {
    let mut not_ready_until: Vec<(String, usize)> = Vec::new();
    for step in 0..steps {
        // The world changes between plans (never between a plan and its
        // execution: that race is the API server's optimistic concurrency's
        // to catch, not the planner's).
        let mut apply = usize::MAX;
        for (at, fault) in faults {
            if *at != step {
                continue;
            }
            let names: Vec<String> = world.nodes.keys().cloned().collect();
            match fault {
                Fault::Crash(n) => apply = apply.min(*n),
                Fault::NotReady(i, t) if !names.is_empty() => {
                    let name = &names[i % names.len()];
                    if let Some(n) = world.nodes.get_mut(name) {
                        n.ready = false;
                    }
                    not_ready_until.push((name.clone(), step + *t as usize));
                }
                Fault::Expire(i) if !names.is_empty() => {
                    if let Some(n) = world.nodes.get_mut(&names[i % names.len()]) {
                        n.attestation_invalid = true;
                    }
                }
                _ => {}
            }
        }
        let obs = world.observe();
        let actions = plan(desired, &obs);
        check_plan(desired, &obs, &actions)?;
        let apply = apply.min(actions.len());
        let before = available_count(world);
        for action in &actions[..apply] {
            world.apply(action);
        }
        let after = available_count(world);
        prop_assert!(
            after >= before.min(desired.min_available()),
            "available nodes fell from {before} to {after} (minimum {})",
            desired.min_available()
        );
        let machines = world
            .machines
            .keys()
            .filter(|m| !world.nodes.get(*m).is_some_and(|n| n.attestation_invalid))
            .count() as u32;
        prop_assert!(
            machines <= desired.replicas + desired.surge(),
            "{machines} machines exceed replicas {} + surge {}",
            desired.replicas,
            desired.surge()
        );
        not_ready_until.retain(|(name, until)| {
            if *until <= step {
                if let Some(n) = world.nodes.get_mut(name) {
                    n.ready = true;
                }
                false
            } else {
                true
            }
        });
        if world.rolled(desired) && faults.iter().all(|(at, _)| *at < step) {
            return Ok(Some(step));
        }
        world.tick(desired, 5);
    }
    Ok(None)
}

/// Environment variable replaying one run's random cases.
const SEED_ENV: &str = "PLANNER_PROPTEST_SEED";

/// A new seed per run (so every CI run explores new cases), printed so a
/// failure can be replayed with `PLANNER_PROPTEST_SEED=<seed>`. Cases that
/// failed once are kept in planner_properties.proptest-regressions and
/// replayed first on every run.
fn seed() -> proptest::test_runner::RngSeed {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            // Fold the clock into 64 bits with the process id.
            (nanos as u64) ^ ((nanos >> 64) as u64) ^ u64::from(std::process::id()).rotate_left(32)
        });
    eprintln!("planner property tests: seed {seed} (replay with {SEED_ENV}={seed})");
    proptest::test_runner::RngSeed::Fixed(seed)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 192,
        rng_seed: seed(),
        ..ProptestConfig::default()
    })]

    /// Safety at every step and eventual completion, under crashes between
    /// actions, nodes flapping NotReady and attestations expiring.
    #[test]
    fn rollouts_are_safe_and_finish_under_faults(
        replicas in 1u32..12,
        surge in amount(),
        unavailable in amount(),
        control_plane in any::<bool>(),
        join_delay in 1i64..40,
        drain_delay in 0i64..30,
        pods in 0u32..16,
        slack in 1u32..4,
        faults in proptest::collection::vec((0usize..120, fault()), 0..12),
    ) {
        let desired = desired(replicas, surge, unavailable, control_plane);
        let config = WorldConfig {
            join_delay,
            drain_delay,
            never_attest: false,
            pods,
            min_available: pods.saturating_sub(slack),
        };
        let mut world = World::new(config, &desired, "node:v1", replicas);
        let done = drive(&desired, &mut world, &faults, 3000)?;
        prop_assert!(done.is_some(), "rollout did not finish: nodes {:?} pending {:?}",
            world.nodes.keys().collect::<Vec<_>>(), world.pending.keys().collect::<Vec<_>>());
        prop_assert_eq!(world.running_pods() + world.pods.iter().filter(|p| !p.running).count() as u32,
            world.pods.len() as u32);
    }

    /// Machines that never attest: the old nodes are never touched, every
    /// slot is retried a bounded number of times, then the pool is blocked.
    #[test]
    fn heirs_that_never_attest_block_the_pool_without_touching_donors(
        replicas in 1u32..8,
        surge in amount(),
        pods in 0u32..8,
    ) {
        let desired = desired(replicas, surge, Amount::Count(0), false);
        let config = WorldConfig { join_delay: 5, drain_delay: 5, never_attest: true, pods, min_available: 0 };
        let mut world = World::new(config, &desired, "node:v1", replicas);
        let done = drive(&desired, &mut world, &[], 600)?;
        prop_assert!(done.is_none());
        for (_, action) in &world.log {
            let touches_old = match action {
                Action::Cordon { node, .. } | Action::Evict { node, .. } | Action::DeleteNode { node } => node.starts_with("old-"),
                Action::DeleteMachine { name } => name.starts_with("old-"),
                _ => false,
            };
            prop_assert!(!touches_old, "touched an old node: {action:?}");
        }
        let creates = world.log.iter().filter(|(_, a)| matches!(a, Action::CreateMachine { .. })).count();
        // Failures are retried in place and stop the pool: at most one
        // slot per surge machine uses its attempts.
        prop_assert!(creates <= (desired.surge() * DEFAULT_MAX_JOIN_ATTEMPTS) as usize,
            "{creates} machines created");
        let actions = plan(&desired, &world.observe());
        let Some(Action::UpdateStatus(status)) = actions.last() else {
            return Err(TestCaseError::fail("no status"));
        };
        prop_assert!(status.blocked.iter().any(|b| matches!(b, Blocked::JoinsFailing { attempts, .. } if *attempts == DEFAULT_MAX_JOIN_ATTEMPTS)),
            "not blocked: {status:?}");
        prop_assert_eq!(world.nodes.len(), replicas as usize);
    }
}

/// A PDB that allows no disruption: the drain never finishes, the donor is
/// never deleted, and after the drain timeout the status names the pods.
#[test]
fn a_blocking_pdb_times_out_into_a_blocked_status_and_nothing_is_deleted() {
    let desired = desired(3, Amount::Count(1), Amount::Count(0), false);
    let config = WorldConfig {
        join_delay: 10,
        drain_delay: 5,
        never_attest: false,
        pods: 3,
        min_available: 3,
    };
    let mut world = World::new(config, &desired, "node:v1", 3);
    for _ in 0..200 {
        let actions = plan(&desired, &world.observe());
        for a in &actions {
            world.apply(a);
        }
        world.tick(&desired, 5);
    }
    assert!(
        !world
            .log
            .iter()
            .any(|(_, a)| matches!(a, Action::DeleteNode { .. })),
        "a node was deleted although its pods could not be evicted"
    );
    assert_eq!(world.evictions, 0);
    assert!(world.refused_evictions > 0);
    let actions = plan(&desired, &world.observe());
    let Some(Action::UpdateStatus(status)) = actions.last() else {
        panic!("no status")
    };
    assert!(
        status
            .blocked
            .iter()
            .any(|b| matches!(b, Blocked::DrainTimeout { pods, .. } if !pods.is_empty())),
        "{status:?}"
    );
    assert!(!status.blocking_pods.is_empty());
}

/// Percentages resolve as Deployments do: surge rounds up, unavailability
/// down; control-plane pools go one at a time with no unavailability.
#[test]
fn amounts_resolve_like_deployments() {
    assert_eq!(Amount::parse("10%"), Some(Amount::Percent(10)));
    assert_eq!(Amount::parse("3"), Some(Amount::Count(3)));
    assert_eq!(Amount::parse("x"), None);
    assert_eq!(Amount::Percent(10).resolve(100, true), 10);
    assert_eq!(Amount::Percent(10).resolve(5, true), 1);
    assert_eq!(Amount::Percent(10).resolve(5, false), 0);
    let mut d = desired(10, Amount::Count(4), Amount::Count(2), true);
    assert_eq!((d.surge(), d.unavailable()), (1, 0));
    d.control_plane = false;
    assert_eq!((d.surge(), d.unavailable()), (4, 2));
    d.max_surge = Amount::Count(0);
    assert_eq!(d.surge(), 1, "a rollout needs at least one new machine");
}

/// Pods that policy forbids evicting (emptyDir, unmanaged) are not evicted
/// and are reported; DaemonSet and mirror pods are ignored by the drain.
#[test]
fn drain_skips_daemonsets_and_refuses_unmanaged_and_emptydir_without_opt_in() {
    use confidential_controllers::planner::PodInfo;
    let d = desired(1, Amount::Count(1), Amount::Count(0), false);
    let pod = |name: &str, ds: bool, mirror: bool, empty_dir: bool, managed: bool| PodInfo {
        namespace: "ns".into(),
        name: name.into(),
        daemon_set: ds,
        mirror,
        empty_dir,
        managed,
        terminating: false,
        finished: false,
    };
    let donor = NodeObs {
        name: "old".into(),
        ready: true,
        cordoned: true,
        kubelet_version: d.kubernetes_version.clone(),
        attested_image: Some("node:v1".into()),
        donor_for: Some("new".into()),
        drain_started: Some(0),
        pods: vec![
            pod("ds", true, false, false, true),
            pod("mirror", false, true, false, false),
            pod("scratch", false, false, true, true),
            pod("bare", false, false, false, false),
            pod("web", false, false, false, true),
        ],
        ..Default::default()
    };
    let heir = NodeObs {
        name: "new".into(),
        ready: true,
        kubelet_version: d.kubernetes_version.clone(),
        attested_image: Some(d.image.clone()),
        heir_of: Some("old".into()),
        ..Default::default()
    };
    let obs = Observed {
        now: 10,
        nodes: vec![donor, heir],
        pending: vec![],
        control_plane_rolling: false,
        earliest_expiry: None,
    };
    let actions = plan(&d, &obs);
    let evicted: Vec<&str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Evict { pod, .. } => Some(pod.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(evicted, vec!["web"]);
    let Some(Action::UpdateStatus(status)) = actions.last() else {
        panic!("no status")
    };
    assert!(status.blocked.iter().any(|b| matches!(b,
        Blocked::PodsNotEvictable { pods, .. } if pods == &vec!["ns/scratch".to_owned(), "ns/bare".to_owned()])));
    let mut opt_in = d.clone();
    opt_in.delete_empty_dir_data = true;
    opt_in.evict_unmanaged_pods = true;
    let evicted = plan(&opt_in, &obs)
        .iter()
        .filter(|a| matches!(a, Action::Evict { .. }))
        .count();
    assert_eq!(evicted, 3);
}
