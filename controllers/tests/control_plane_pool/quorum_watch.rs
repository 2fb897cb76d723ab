//! A watcher that samples the etcd cluster continuously during a roll and
//! records every loss:
//! - quorum: no linearizable member list, or fewer healthy voters than a
//!   quorum, for longer than an election may take;
//! - fault tolerance: fewer started voting members than the pool's replicas
//!   (a donor removed before its heir joined);
//! - a member lost without removal: a voting member whose process is down
//!   while a member list read after that still names it.
//!
//! It also reports what it saw (samples, most voters at once, the longest
//! time without a quorum read), so a test can prove the heir's member was
//! added before the donor's was removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use confidential_controllers::etcd::{EtcdMembership, quorum};
use confidential_testenv::etcd::EtcdCluster;
use tokio::task::JoinHandle;

/// Longer than a few election timeouts of the test cluster (2 s each): a
/// removed leader costs one election, which is not a loss of quorum.
const ELECTION_GRACE: Duration = Duration::from_secs(12);

/// What the watcher saw.
#[derive(Debug, Default)]
pub struct QuorumReport {
    pub violations: Vec<String>,
    pub samples: u32,
    pub max_voters: usize,
    pub min_started_voters: usize,
    pub longest_without_quorum: Duration,
}

pub struct QuorumWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<QuorumReport>,
}

impl QuorumWatch {
    pub fn start(
        membership: EtcdMembership,
        etcd: Arc<tokio::sync::Mutex<EtcdCluster>>,
        replicas: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = QuorumReport {
                min_started_voters: usize::MAX,
                ..QuorumReport::default()
            };
            let mut last_quorum = Instant::now();
            let mut degraded_since: Option<Instant> = None;
            while !flag.load(Ordering::Relaxed) {
                report.samples += 1;
                sample(
                    &membership,
                    &etcd,
                    replicas,
                    &mut report,
                    &mut last_quorum,
                    &mut degraded_since,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            report
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> anyhow::Result<QuorumReport> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

async fn sample(
    membership: &EtcdMembership,
    etcd: &tokio::sync::Mutex<EtcdCluster>,
    replicas: usize,
    report: &mut QuorumReport,
    last_quorum: &mut Instant,
    degraded_since: &mut Option<Instant>,
) {
    let members = match membership.members().await {
        Ok(members) => members,
        Err(err) => {
            let without = last_quorum.elapsed();
            report.longest_without_quorum = report.longest_without_quorum.max(without);
            if without > ELECTION_GRACE {
                report
                    .violations
                    .push(format!("no quorum for {without:?}: {err}"));
                *last_quorum = Instant::now();
            }
            return;
        }
    };
    report.longest_without_quorum = report.longest_without_quorum.max(last_quorum.elapsed());
    *last_quorum = Instant::now();
    let voters: Vec<_> = members.iter().filter(|m| !m.member.learner).collect();
    let started: Vec<_> = voters.iter().filter(|m| m.member.started()).collect();
    report.max_voters = report.max_voters.max(voters.len());
    report.min_started_voters = report.min_started_voters.min(started.len());
    if started.len() < replicas {
        report.violations.push(format!(
            "only {} started voting members ({}), the pool wants {replicas}",
            started.len(),
            started
                .iter()
                .map(|m| m.member.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let healthy = voters.iter().filter(|m| m.healthy).count();
    if healthy < quorum(voters.len()) {
        let since = *degraded_since.get_or_insert_with(Instant::now);
        if since.elapsed() > ELECTION_GRACE {
            report.violations.push(format!(
                "only {healthy} of {} voters healthy for {:?}",
                voters.len(),
                since.elapsed()
            ));
            *degraded_since = None;
        }
    } else {
        *degraded_since = None;
    }
    let down: Vec<String> = {
        let mut etcd = etcd.lock().await;
        started
            .iter()
            .map(|m| m.member.name.clone())
            .filter(|name| !etcd.running(name))
            .collect()
    };
    if down.is_empty() {
        return;
    }
    // The process may have exited because it was just removed: only a
    // list read after seeing it down counts.
    match membership.client().member_list().await {
        Ok(again) => {
            for name in down {
                if again.iter().any(|m| m.name == name) {
                    report.violations.push(format!(
                        "etcd member {name} is down while still a voting member"
                    ));
                }
            }
        }
        Err(err) => report.violations.push(format!(
            "members {down:?} down and no quorum to re-read the list: {err}"
        )),
    }
}
