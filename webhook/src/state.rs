//! The watched state the decisions read: reflector stores of NodeAttestation,
//! AttestationPolicy, NodeVersion and ImagePolicy, kept current by kube-runtime
//! watches. A review reads these caches and makes no API call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use confidential_api::{AttestationPolicy, ImagePolicy, NodeAttestation, NodeVersion};
use futures::StreamExt;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// Read handles of the four caches, and whether all have synced.
#[derive(Clone)]
pub struct Stores {
    pub attestations: Store<NodeAttestation>,
    pub attestation_policies: Store<AttestationPolicy>,
    pub node_versions: Store<NodeVersion>,
    pub image_policies: Store<ImagePolicy>,
    ready: Arc<AtomicBool>,
}

/// Write handles of the four caches.
pub struct Writers {
    pub attestations: Writer<NodeAttestation>,
    pub attestation_policies: Writer<AttestationPolicy>,
    pub node_versions: Writer<NodeVersion>,
    pub image_policies: Writer<ImagePolicy>,
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
        (
            Self {
                attestations,
                attestation_policies,
                node_versions,
                image_policies,
                ready: Arc::new(AtomicBool::new(false)),
            },
            Writers {
                attestations: w1,
                attestation_policies: w2,
                node_versions: w3,
                image_policies: w4,
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

    /// Whether every cache has completed its initial list.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
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

async fn run_watch<K>(api: Api<K>, writer: Writer<K>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if let Err(e) = event {
            tracing::warn!(%kind, error = %e, "watch error; retrying with backoff");
        }
    }
}

/// Runs the four watches until the process ends.
pub async fn watch(client: Client, writers: Writers) {
    tokio::join!(
        run_watch(
            Api::<NodeAttestation>::all(client.clone()),
            writers.attestations
        ),
        run_watch(
            Api::<AttestationPolicy>::all(client.clone()),
            writers.attestation_policies
        ),
        run_watch(
            Api::<NodeVersion>::all(client.clone()),
            writers.node_versions
        ),
        run_watch(Api::<ImagePolicy>::all(client), writers.image_policies),
    );
}
