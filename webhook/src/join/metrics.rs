//! Join metrics: `join_refusals_total{reason}` and `join_accepted_total{kind}`,
//! registered into the gate's registry. Labels come from closed enums, so the
//! series stay bounded whatever callers send.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::decide::Reason;
use confidential_attestation::evidence::EvidenceKind;

type Labels = Vec<(String, String)>;

/// Join metrics.
#[derive(Default, Clone)]
pub struct JoinMetrics {
    refusals: Family<Labels, Counter>,
    accepted: Family<Labels, Counter>,
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

impl JoinMetrics {
    /// Registers `join_refusals_total{reason}` and `join_accepted_total{kind}`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "join_refusals",
            "Refused joins by reason",
            self.refusals.clone(),
        );
        registry.register(
            "join_accepted",
            "Accepted joins by kind",
            self.accepted.clone(),
        );
    }

    pub fn count_refusal(&self, reason: Reason) {
        self.refusals
            .get_or_create(&label("reason", reason.label()))
            .inc();
    }

    pub fn count_accepted(&self, kind: EvidenceKind) {
        self.accepted
            .get_or_create(&label("kind", kind.name()))
            .inc();
    }

    /// Refusals counted for the reason labelled `reason`.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refusals.get_or_create(&label("reason", reason)).get()
    }

    /// Accepted joins counted for `kind`.
    pub fn accepted(&self, kind: EvidenceKind) -> u64 {
        self.accepted
            .get_or_create(&label("kind", kind.name()))
            .get()
    }
}
