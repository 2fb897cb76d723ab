//! Prometheus metrics of the webhook: reviews by kind, verdict and reason, and
//! a latency histogram with sub-millisecond buckets, rendered in the
//! OpenMetrics text format on `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a review.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub kind: String,
    pub verdict: &'static str,
    pub reason: &'static str,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Upper bounds of the latency buckets, in seconds (25 µs .. 1 s).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_15, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002_5,
    0.005, 0.01, 0.025, 0.1, 0.25, 1.0,
];

/// The webhook's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reviews: Family<ReviewLabels, Counter>,
    latency: Family<KindLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_more(|_| {})
    }

    /// The webhook's metrics plus whatever `register` adds to the same
    /// registry (the gate's other parts: re-attestation), so one `/metrics`
    /// serves them all.
    pub fn with_more(register: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix("confidential_webhook");
        register(&mut registry);
        let reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "admission_reviews",
            "Admission reviews answered, by kind, verdict and reason",
            reviews.clone(),
        );
        let latency = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS)
        });
        registry.register(
            "admission_review_duration_seconds",
            "Time to decide one admission review, from body received to response serialised",
            latency.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reviews,
            latency,
        }
    }

    /// Records one answered review.
    pub fn record(&self, kind: &str, allowed: bool, reason: &'static str, elapsed: Duration) {
        self.reviews
            .get_or_create(&ReviewLabels {
                kind: kind.to_owned(),
                verdict: if allowed { "allowed" } else { "denied" },
                reason,
            })
            .inc();
        self.latency
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Renders the OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
