//! Fuzz target: arbitrary bytes as the body of `POST /validate` and
//! `POST /mutate`. The handler
//! must answer every input with a review or a 400 and never panic; when it
//! answers with a review, the answer must be valid JSON.

#![no_main]

use confidential_api::{ImagePolicy, ImagePolicySpec};
use confidential_webhook::handler::{Reply, Webhook};
use confidential_webhook::metrics::Metrics;
use confidential_webhook::state::{Snapshot, Stores};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn webhook() -> &'static Webhook {
    static WEBHOOK: OnceLock<Webhook> = OnceLock::new();
    WEBHOOK.get_or_init(|| {
        let policy = ImagePolicy::new(
            "fuzz",
            ImagePolicySpec {
                allowed_repositories: vec!["ghcr.io/acme/*".into()],
                exempt_namespaces: vec!["kube-system".into()],
                ..Default::default()
            },
        );
        let (stores, _writers) = Stores::fixed(Snapshot {
            image_policies: vec![policy],
            ..Default::default()
        });
        Webhook::new(stores, Metrics::new())
    })
}

fuzz_target!(|data: &[u8]| {
    for reply in [webhook().review(data), webhook().mutate(data)] {
        if let Reply::Review(bytes) = reply {
            let parsed = serde_json::from_slice::<serde_json::Value>(&bytes);
            assert!(parsed.is_ok(), "answer is not JSON");
        }
    }
});
