//! The watched state the decisions read: reflector stores of NodeAttestation,
//! AttestationPolicy, NodeVersion and ImagePolicy, kept current by kube-runtime
//! watches. A review or a join reads these caches and makes no API call.
//!
//! A cache is only as good as its watch: each watch records when it started
//! failing, and the state stops being ready once one has failed for longer
//! than a bound (`/readyz` drops, joins answer "not ready"), so a gate cut
//! off from the API server stops serving a frozen view. A failing watch
//! retries with backoff (at most [`MAX_WATCH_BACKOFF`] apart); one quiet for
//! longer than that has recovered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confidential_api::{AttestationPolicy, ImagePolicy, NodeAttestation, NodeVersion};
use futures::StreamExt;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// How long a watch may fail before the state is no longer ready.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);
/// Longest pause between two errors of a failing watch (kube-runtime's
/// default backoff tops out at 30 s), with margin.
pub const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(45);

/// A watch's ongoing failure: when it began and the latest error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub since: Instant,
    pub last: Instant,
}

/// Whether a watch with `failure` has been failing for longer than
/// `stale_after` at `now` (and has not gone quiet, i.e. recovered).
pub fn failing_too_long(failure: Option<Failure>, now: Instant, stale_after: Duration) -> bool {
    failure.is_some_and(|f| {
        now.saturating_duration_since(f.last) <= MAX_WATCH_BACKOFF
            && now.saturating_duration_since(f.since) >= stale_after
    })
}

/// Failures of the watches, by kind.
#[derive(Debug, Default)]
struct Health {
    failures: Mutex<HashMap<String, Failure>>,
}

impl Health {
    fn failed(&self, kind: &str, now: Instant) {
        if let Ok(mut failures) = self.failures.lock() {
            failures
                .entry(kind.to_owned())
                .and_modify(|f| f.last = now)
                .or_insert(Failure {
                    since: now,
                    last: now,
                });
        }
    }

    fn succeeded(&self, kind: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(kind);
        }
    }

    fn any_failing_too_long(&self, now: Instant, stale_after: Duration) -> bool {
        // A poisoned lock means a panic while recording: not trustworthy.
        match self.failures.lock() {
            Ok(failures) => failures
                .values()
                .any(|f| failing_too_long(Some(*f), now, stale_after)),
            Err(_) => true,
        }
    }
}

/// Read handles of the four caches, whether all have synced, and whether
/// their watches are healthy.
#[derive(Clone)]
pub struct Stores {
    pub attestations: Store<NodeAttestation>,
    pub attestation_policies: Store<AttestationPolicy>,
    pub node_versions: Store<NodeVersion>,
    pub image_policies: Store<ImagePolicy>,
    ready: Arc<AtomicBool>,
    health: Arc<Health>,
    stale_after: Duration,
}

/// Write handles of the four caches.
pub struct Writers {
    pub attestations: Writer<NodeAttestation>,
    pub attestation_policies: Writer<AttestationPolicy>,
    pub node_versions: Writer<NodeVersion>,
    pub image_policies: Writer<ImagePolicy>,
    health: Arc<Health>,
}

/// Fixed contents for [`Stores::fixed`] (tests, fuzzing, benchmarks).
#[derive(Default, Clone)]
pub struct Snapshot {
    pub attestations: Vec<NodeAttestation>,
    pub attestation_policies: Vec<AttestationPolicy>,
    pub node_versions: Vec<NodeVersion>,
    pub image_policies: Vec<ImagePolicy>,
}

fn fill<K>(writer: &mut Writer<K>, objects: Vec<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

impl Stores {
    /// Empty, unsynced caches and their writers.
    pub fn new() -> (Self, Writers) {
        let (attestations, w1) = reflector::store();
        let (attestation_policies, w2) = reflector::store();
        let (node_versions, w3) = reflector::store();
        let (image_policies, w4) = reflector::store();
        let health = Arc::new(Health::default());
        (
            Self {
                attestations,
                attestation_policies,
                node_versions,
                image_policies,
                ready: Arc::new(AtomicBool::new(false)),
                health: health.clone(),
                stale_after: DEFAULT_STALE_AFTER,
            },
            Writers {
                attestations: w1,
                attestation_policies: w2,
                node_versions: w3,
                image_policies: w4,
                health,
            },
        )
    }

    /// Synced caches with fixed contents and no watch. The writers are
    /// returned so a caller can apply further events.
    pub fn fixed(snapshot: Snapshot) -> (Self, Writers) {
        let (stores, mut writers) = Self::new();
        fill(&mut writers.attestations, snapshot.attestations);
        fill(
            &mut writers.attestation_policies,
            snapshot.attestation_policies,
        );
        fill(&mut writers.node_versions, snapshot.node_versions);
        fill(&mut writers.image_policies, snapshot.image_policies);
        stores.ready.store(true, Ordering::Release);
        (stores, writers)
    }

    /// The same caches, considered stale after a watch failed for `bound`.
    pub fn with_stale_after(mut self, bound: Duration) -> Self {
        self.stale_after = bound;
        self
    }

    /// Whether every cache has completed its initial list and no watch has
    /// been failing for longer than the staleness bound.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self
                .health
                .any_failing_too_long(Instant::now(), self.stale_after)
    }

    /// Waits until every cache has synced, then marks the state ready.
    pub async fn wait_ready(&self) {
        // Errors mean a writer was dropped: the watch task ended, and readiness
        // must then stay false.
        let all = futures::future::try_join4(
            self.attestations.wait_until_ready(),
            self.attestation_policies.wait_until_ready(),
            self.node_versions.wait_until_ready(),
            self.image_policies.wait_until_ready(),
        )
        .await;
        if all.is_ok() {
            self.ready.store(true, Ordering::Release);
        }
    }
}

async fn run_watch<K>(api: Api<K>, writer: Writer<K>, health: Arc<Health>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => health.succeeded(&kind),
            Err(e) => {
                health.failed(&kind, Instant::now());
                tracing::warn!(%kind, error = %e, "watch error; retrying with backoff");
            }
        }
    }
}

/// Runs the four watches until the process ends.
pub async fn watch(client: Client, writers: Writers) {
    let health = writers.health;
    tokio::join!(
        run_watch(
            Api::<NodeAttestation>::all(client.clone()),
            writers.attestations,
            health.clone(),
        ),
        run_watch(
            Api::<AttestationPolicy>::all(client.clone()),
            writers.attestation_policies,
            health.clone(),
        ),
        run_watch(
            Api::<NodeVersion>::all(client.clone()),
            writers.node_versions,
            health.clone(),
        ),
        run_watch(
            Api::<ImagePolicy>::all(client),
            writers.image_policies,
            health,
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_is_stale_only_while_it_keeps_failing_past_the_bound() {
        let t0 = Instant::now();
        let bound = Duration::from_secs(60);
        let s = |secs| Duration::from_secs(secs);
        assert!(!failing_too_long(None, t0 + s(600), bound));
        let failing = |last| {
            Some(Failure {
                since: t0,
                last: t0 + s(last),
            })
        };
        // Failing for less than the bound: still ready.
        assert!(!failing_too_long(failing(50), t0 + s(59), bound));
        // Failing for longer, errors still coming: stale.
        assert!(failing_too_long(failing(70), t0 + s(80), bound));
        // Quiet for longer than the backoff: the watch recovered.
        assert!(!failing_too_long(
            failing(70),
            t0 + s(70) + MAX_WATCH_BACKOFF + s(1),
            bound
        ));
    }

    #[test]
    fn stores_follow_their_watch_health() {
        let (stores, _writers) = Stores::fixed(Snapshot::default());
        let stores = stores.with_stale_after(Duration::ZERO);
        assert!(stores.is_ready());
        stores.health.failed("NodeAttestation", Instant::now());
        assert!(!stores.is_ready(), "a failing watch past the bound");
        stores.health.succeeded("NodeAttestation");
        assert!(stores.is_ready(), "an event after the failure clears it");
    }
}
