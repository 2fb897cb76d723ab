//! Metrics of continuous re-attestation, registered into the gate's
//! `/metrics` registry: `reattestation_total{result}` (one per node and
//! sweep: `verified`, `failed`, `unreachable`, `revoked`, `conflict`),
//! `reattestation_failures_total{reason}`, and the per-node duration
//! histogram `reattestation_duration_seconds` (connect, quote, verify, write).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of `reattestation_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of `reattestation_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Upper bounds of the duration buckets, in seconds (5 ms .. 30 s): a TPM
/// quote alone takes tens of milliseconds, an unreachable node the timeout.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Re-attestation metrics (cheap to clone; clones share the values).
#[derive(Clone)]
pub struct ReattestMetrics {
    pub results: Family<ResultLabels, Counter>,
    pub failures: Family<ReasonLabels, Counter>,
    pub duration: Histogram,
}

impl Default for ReattestMetrics {
    fn default() -> Self {
        Self {
            results: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

impl ReattestMetrics {
    /// Registers the metrics into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "reattestation",
            "Node re-attestations by result",
            self.results.clone(),
        );
        registry.register(
            "reattestation_failures",
            "Failed node re-attestations by reason",
            self.failures.clone(),
        );
        registry.register(
            "reattestation_duration_seconds",
            "Time to re-attest one node: connect, quote, verify, record",
            self.duration.clone(),
        );
    }

    /// Re-attestations counted with `result`.
    pub fn count(&self, result: &'static str) -> u64 {
        self.results.get_or_create(&ResultLabels { result }).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_render_with_their_names() {
        let metrics = ReattestMetrics::default();
        let mut registry = Registry::with_prefix("confidential_webhook");
        metrics.register(&mut registry);
        metrics
            .results
            .get_or_create(&ResultLabels { result: "verified" })
            .inc();
        metrics.duration.observe(0.02);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains("confidential_webhook_reattestation_total{result=\"verified\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("confidential_webhook_reattestation_duration_seconds_count 1"),
            "{text}"
        );
        assert_eq!(metrics.count("verified"), 1);
    }
}
