//! Prometheus metrics of the node operator, served on `/metrics`: nodes by
//! rollout state per pool, rollout durations, evictions by outcome, failed
//! joins, reconcile errors.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolState {
    pub pool: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pool {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: String,
}

/// All metrics; cheap to share.
pub struct Metrics {
    pub nodes: Family<PoolState, Gauge>,
    pub rollout_duration: Family<Pool, Histogram>,
    pub evictions: Family<Outcome, Counter>,
    pub failed_joins: Family<Pool, Counter>,
    pub reconcile_errors: Counter,
    pub csr_decisions: Family<Outcome, Counter>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("confidential_controllers");
        let nodes = Family::<PoolState, Gauge>::default();
        let rollout_duration = Family::<Pool, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(10.0, 2.0, 12))
        });
        let evictions = Family::<Outcome, Counter>::default();
        let failed_joins = Family::<Pool, Counter>::default();
        let reconcile_errors = Counter::default();
        let csr_decisions = Family::<Outcome, Counter>::default();
        registry.register("nodes", "Nodes by pool and rollout state", nodes.clone());
        registry.register(
            "rollout_duration_seconds",
            "Duration of finished rollouts",
            rollout_duration.clone(),
        );
        registry.register("evictions", "Evictions by outcome", evictions.clone());
        registry.register(
            "failed_joins",
            "Machines that missed their join deadline",
            failed_joins.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        registry.register(
            "csr_decisions",
            "Kubelet CSRs approved or denied",
            csr_decisions.clone(),
        );
        Arc::new(Self {
            nodes,
            rollout_duration,
            evictions,
            failed_joins,
            reconcile_errors,
            csr_decisions,
            registry,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
