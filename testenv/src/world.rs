//! A pure, discrete-time model of a node pool that applies planner actions:
//! machines join after a delay (or never), evicted pods terminate after a
//! delay and are recreated elsewhere, a PodDisruptionBudget refuses evictions
//! that would leave too few running pods. The operator's property tests
//! drive the planner against it (thousands of rollouts per second, with
//! crashes and faults between actions). Test code: it lives in the test
//! environment, never in the shipped operator.

use std::collections::BTreeMap;

use confidential_controllers::planner::{
    Action, Desired, NodeObs, Observed, PendingObs, PodInfo, Seconds,
};

/// Knobs of the simulated world.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// Seconds from machine creation to a Ready, attested Node.
    pub join_delay: Seconds,
    /// Seconds an evicted pod takes to terminate.
    pub drain_delay: Seconds,
    /// Machines never attest (the "never attests" fault).
    pub never_attest: bool,
    /// Workload pods in the pool.
    pub pods: u32,
    /// PDB `minAvailable` of the workload.
    pub min_available: u32,
}

/// A pod of the simulated workload.
#[derive(Clone, Debug)]
pub struct SimPod {
    pub name: String,
    pub node: String,
    /// Running and Ready (false while starting).
    pub running: bool,
    /// Set when evicted: the time it is gone.
    pub gone_at: Option<Seconds>,
}

/// The simulated world.
#[derive(Clone, Debug)]
pub struct World {
    pub config: WorldConfig,
    pub now: Seconds,
    pub nodes: BTreeMap<String, NodeObs>,
    pub pending: BTreeMap<String, PendingObs>,
    /// Machines: name -> (image, join time or never).
    pub machines: BTreeMap<String, (String, Option<Seconds>)>,
    pub pods: Vec<SimPod>,
    /// Every action ever applied, for assertions.
    pub log: Vec<(Seconds, Action)>,
    pub evictions: u32,
    pub refused_evictions: u32,
    next_pod: u32,
}

impl World {
    /// A pool of `replicas` Ready nodes attested for `image`, with the
    /// workload spread over them.
    pub fn new(config: WorldConfig, desired: &Desired, image: &str, replicas: u32) -> Self {
        let mut world = World {
            config,
            now: 0,
            nodes: BTreeMap::new(),
            pending: BTreeMap::new(),
            machines: BTreeMap::new(),
            pods: Vec::new(),
            log: Vec::new(),
            evictions: 0,
            refused_evictions: 0,
            next_pod: 0,
        };
        for i in 0..replicas {
            let name = format!("old-{i:04}");
            world
                .machines
                .insert(name.clone(), (image.to_owned(), Some(0)));
            world.nodes.insert(
                name.clone(),
                NodeObs {
                    name: name.clone(),
                    ready: true,
                    kubelet_version: desired.kubernetes_version.clone(),
                    attested_image: Some(image.to_owned()),
                    labels: BTreeMap::from([("team".to_owned(), format!("t{}", i % 3))]),
                    ..Default::default()
                },
            );
        }
        for _ in 0..world.config.pods {
            world.spawn_pod(true);
        }
        world
    }

    fn spawn_pod(&mut self, running: bool) {
        // Least-loaded schedulable Ready node.
        let target = self
            .nodes
            .values()
            .filter(|n| n.ready && !n.cordoned && !n.deleting)
            .min_by_key(|n| {
                (
                    self.pods
                        .iter()
                        .filter(|p| p.node == n.name && p.gone_at.is_none())
                        .count(),
                    n.name.clone(),
                )
            })
            .map(|n| n.name.clone());
        if let Some(node) = target {
            self.next_pod += 1;
            self.pods.push(SimPod {
                name: format!("app-{}", self.next_pod),
                node,
                running,
                gone_at: None,
            });
        }
    }

    /// What the controller would observe now.
    pub fn observe(&self) -> Observed {
        let nodes = self
            .nodes
            .values()
            .map(|n| {
                let mut n = n.clone();
                n.pods = self
                    .pods
                    .iter()
                    .filter(|p| p.node == n.name)
                    .map(|p| PodInfo {
                        namespace: "app".into(),
                        name: p.name.clone(),
                        daemon_set: false,
                        mirror: false,
                        empty_dir: false,
                        managed: true,
                        terminating: p.gone_at.is_some(),
                        finished: false,
                    })
                    .collect();
                n
            })
            .collect();
        Observed {
            now: self.now,
            nodes,
            pending: self.pending.values().cloned().collect(),
            control_plane_rolling: false,
            earliest_expiry: None,
        }
    }

    /// Running pods not terminating.
    pub fn running_pods(&self) -> u32 {
        self.pods
            .iter()
            .filter(|p| p.running && p.gone_at.is_none())
            .count() as u32
    }

    /// Applies one action as the reconciler (`reconciler::execute`) and the
    /// real cluster would.
    pub fn apply(&mut self, action: &Action) {
        self.log.push((self.now, action.clone()));
        match action {
            Action::CreateMachine {
                name,
                image,
                donor,
                attempt,
                deadline,
            } => {
                self.pending.insert(
                    name.clone(),
                    PendingObs {
                        name: name.clone(),
                        image: image.clone(),
                        donor: donor.clone(),
                        deadline: *deadline,
                        attempts: *attempt,
                        failed_at: None,
                    },
                );
                let join = (!self.config.never_attest).then_some(self.now + self.config.join_delay);
                self.machines.insert(name.clone(), (image.clone(), join));
            }
            Action::EnsureMachine { name, image } => {
                if self.pending.contains_key(name) && !self.machines.contains_key(name) {
                    let join =
                        (!self.config.never_attest).then_some(self.now + self.config.join_delay);
                    self.machines.insert(name.clone(), (image.clone(), join));
                }
            }
            Action::PairHeir { heir, donor } => {
                if let Some(h) = self.nodes.get_mut(heir) {
                    h.heir_of = Some(donor.clone());
                }
                if let Some(d) = self.nodes.get_mut(donor) {
                    d.donor_for = Some(heir.clone());
                }
            }
            Action::CopyLabels { to, labels } => {
                if let Some(n) = self.nodes.get_mut(to) {
                    n.labels.extend(labels.clone());
                }
            }
            Action::Cordon { node, start_drain } => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.cordoned = true;
                    if *start_drain && n.drain_started.is_none() {
                        n.drain_started = Some(self.now);
                    }
                }
            }
            Action::Revoke { node, .. } => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.cordoned = true;
                    n.revoked = true;
                }
            }
            Action::Evict { pod, .. } => {
                let running = self.running_pods();
                let Some(index) = self.pods.iter().position(|p| &p.name == pod) else {
                    return;
                };
                if self.pods[index].gone_at.is_some() {
                    return;
                }
                let counts = self.pods[index].running;
                if counts && running.saturating_sub(1) < self.config.min_available {
                    self.refused_evictions += 1;
                    return;
                }
                self.evictions += 1;
                self.pods[index].gone_at = Some(self.now + self.config.drain_delay);
                // The Deployment controller creates a replacement at once.
                self.spawn_pod(false);
            }
            Action::LeaveControlPlane { .. } => {}
            Action::DeleteMachine { name } => {
                self.machines.remove(name);
            }
            Action::DeleteNode { node } => {
                if self.nodes.remove(node).is_some() {
                    // Pods left on a deleted Node would be garbage collected;
                    // the planner never lets that happen (asserted in tests).
                    self.pods.retain(|p| &p.node != node);
                }
            }
            Action::MarkFailed { name, .. } => {
                self.machines.remove(name);
                self.nodes.remove(name);
                if let Some(p) = self.pending.get_mut(name) {
                    p.failed_at = Some(self.now);
                }
            }
            Action::ForgetPending { name } => {
                self.pending.remove(name);
            }
            Action::UpdateStatus(_) => {}
        }
    }

    /// Advances time: machines join, pods terminate and start.
    pub fn tick(&mut self, desired: &Desired, seconds: Seconds) {
        self.now += seconds;
        let now = self.now;
        for (name, (image, join)) in &self.machines {
            if join.is_some_and(|t| t <= now) && !self.nodes.contains_key(name) {
                self.nodes.insert(
                    name.clone(),
                    NodeObs {
                        name: name.clone(),
                        ready: true,
                        kubelet_version: desired.kubernetes_version.clone(),
                        attested_image: Some(image.clone()),
                        ..Default::default()
                    },
                );
            }
        }
        self.pods.retain(|p| p.gone_at.is_none_or(|t| t > now));
        for p in &mut self.pods {
            p.running = true;
        }
        let pending_pods = self.config.pods as usize
            - self
                .pods
                .iter()
                .filter(|p| p.gone_at.is_none())
                .count()
                .min(self.config.pods as usize);
        for _ in 0..pending_pods {
            self.spawn_pod(false);
        }
    }

    /// Whether the pool runs `replicas` up-to-date nodes and nothing else.
    pub fn rolled(&self, desired: &Desired) -> bool {
        self.nodes.len() == desired.replicas as usize
            && self.nodes.values().all(|n| {
                n.ready
                    && n.attested_image.as_deref() == Some(desired.image.as_str())
                    && !n.cordoned
            })
            && self.pending.is_empty()
    }
}
