//! Nodes: a Node may be created or updated only by a machine that attested.
//!
//! Rules, in order: identity labels (node image, node pool) may not change on
//! update; a NodeAttestation for the node name must exist, be `Trusted` and not
//! expired; the attested image must still have signed measurements in an
//! AttestationPolicy and the attested PCR values must match them (`warnOnly`
//! mismatches become warnings); identity labels present on the Node must equal
//! what the attestation recorded.

use std::collections::BTreeMap;
use std::sync::Arc;

use confidential_api::keys::{IDENTITY_LABELS, LABEL_NODE_IMAGE, LABEL_NODE_POOL};
use confidential_api::{AttestationPolicy, NodeAttestation, Verdict};
use confidential_attestation::measurements::{parse_pcr_index, parse_pcr_value};
use serde::Deserialize;

use super::Decision;
use crate::verify::{ImageTrust, TrustCache};

/// The parts of a Node the decision reads.
#[derive(Deserialize, Debug, Default, Clone)]
pub struct NodeMeta {
    #[serde(default)]
    pub metadata: Meta,
}

/// Name and labels.
#[derive(Deserialize, Debug, Default, Clone)]
pub struct Meta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

impl NodeMeta {
    fn label(&self, key: &str) -> Option<&str> {
        self.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
    }
}

/// The label-safe form of an image reference (label values cannot hold `/`
/// or `:`); one mapping shared with the operator and the nodes.
pub use confidential_api::keys::image_label_value;

/// The latest attestation (by `attestedAt`) recorded for `node_name`.
pub fn latest_attestation<'a>(
    node_name: &str,
    attestations: &'a [Arc<NodeAttestation>],
) -> Option<&'a NodeAttestation> {
    attestations
        .iter()
        .filter(|a| a.spec.node_name == node_name)
        .max_by_key(|a| a.spec.attested_at.0)
        .map(AsRef::as_ref)
}

/// Decides a CREATE or UPDATE of a Node (or of its status).
pub fn validate(
    new: &NodeMeta,
    old: Option<&NodeMeta>,
    attestations: &[Arc<NodeAttestation>],
    policies: &[Arc<AttestationPolicy>],
    trust: &TrustCache,
    now: jiff::Timestamp,
) -> Decision {
    let Some(name) = new.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        return Decision::deny("invalid", "Node without metadata.name");
    };
    if let Some(old) = old {
        for key in IDENTITY_LABELS {
            let (before, after) = (old.label(key), new.label(key));
            if before.is_some() && before != after {
                return Decision::deny(
                    "identity_changed",
                    format!(
                        "node {name}: label {key} is fixed by the node's attestation and may not change ({} -> {})",
                        before.unwrap_or("<none>"),
                        after.unwrap_or("<removed>")
                    ),
                );
            }
        }
    }
    let Some(att) = latest_attestation(name, attestations) else {
        return Decision::deny(
            "unattested",
            format!(
                "node {name} has no NodeAttestation: the machine has not proved by remote attestation that it booted a measured image"
            ),
        );
    };
    if att.spec.verdict != Verdict::Trusted {
        return Decision::deny(
            "untrusted",
            format!(
                "node {name}: its attestation verdict is {:?}",
                att.spec.verdict
            ),
        );
    }
    if att.spec.expires_at.0 <= now {
        return Decision::deny(
            "expired",
            format!(
                "node {name}: its attestation expired at {}; the node must re-attest",
                att.spec.expires_at.0
            ),
        );
    }
    let image = att.spec.image.as_str();
    let expected = match trust.image_trust(image, policies) {
        ImageTrust::Trusted { measurements, .. } => measurements,
        ImageTrust::NotListed => {
            return Decision::deny(
                "image_not_trusted",
                format!(
                    "node {name}: its image {image} has no measurements in any AttestationPolicy"
                ),
            );
        }
        ImageTrust::Untrusted(reasons) => {
            return Decision::deny(
                "image_not_trusted",
                format!(
                    "node {name}: the measurements of its image {image} are not signed by a trusted publisher: {}",
                    reasons.join("; ")
                ),
            );
        }
    };
    let mut measured = BTreeMap::new();
    for (index, value) in &att.spec.measurements {
        let parsed = parse_pcr_index(index).and_then(|pcr| Ok((pcr, parse_pcr_value(pcr, value)?)));
        match parsed {
            Ok((pcr, value)) => {
                measured.insert(pcr, value);
            }
            Err(e) => {
                return Decision::deny(
                    "measurement_mismatch",
                    format!("node {name}: its attestation records an invalid measurement: {e}"),
                );
            }
        }
    }
    let warnings = match expected.compare(&measured) {
        Ok(warnings) => warnings
            .into_iter()
            .map(|w| format!("node {name}: {w}"))
            .collect(),
        Err(e) => {
            return Decision::deny(
                "measurement_mismatch",
                format!(
                    "node {name}: attested measurements do not match the policy for {image}: {e}"
                ),
            );
        }
    };
    if let Some(label) = new.label(LABEL_NODE_IMAGE)
        && label != image
        && label != image_label_value(image)
    {
        return Decision::deny(
            "identity_mismatch",
            format!(
                "node {name}: label {LABEL_NODE_IMAGE}={label} but the machine attested image {image}"
            ),
        );
    }
    if let Some(label) = new.label(LABEL_NODE_POOL)
        && Some(label) != att.spec.pool.as_deref()
    {
        return Decision::deny(
            "identity_mismatch",
            format!(
                "node {name}: label {LABEL_NODE_POOL}={label} but the machine attested pool {}",
                att.spec.pool.as_deref().unwrap_or("<none>")
            ),
        );
    }
    Decision::allow("attested").with_warnings(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::fixtures::*;
    use confidential_api::NodeAttestationSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn node(name: &str, labels: &[(&str, &str)]) -> NodeMeta {
        NodeMeta {
            metadata: Meta {
                name: Some(name.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
            },
        }
    }

    fn trusted_policy() -> Vec<Arc<AttestationPolicy>> {
        vec![policy(vec![signed_entry(IMAGE, &signing_key(1))])]
    }

    fn decide(new: &NodeMeta, old: Option<&NodeMeta>, atts: &[Arc<NodeAttestation>]) -> Decision {
        validate(
            new,
            old,
            atts,
            &trusted_policy(),
            &TrustCache::default(),
            now(),
        )
    }

    fn with_spec(f: impl FnOnce(&mut NodeAttestationSpec)) -> Vec<Arc<NodeAttestation>> {
        let mut att = (*attestation("n1", 3600)).clone();
        f(&mut att.spec);
        vec![Arc::new(att)]
    }

    #[test]
    fn unattested_node_is_refused_by_name() {
        let d = decide(&node("n1", &[]), None, &[attestation("other", 3600)]);
        assert!(!d.allowed);
        assert_eq!(d.reason, "unattested");
        assert!(d.message.contains("node n1"), "{}", d.message);
    }

    #[test]
    fn attested_node_is_admitted_with_matching_labels() {
        let n = node(
            "n1",
            &[(LABEL_NODE_IMAGE, IMAGE), (LABEL_NODE_POOL, "workers")],
        );
        let d = decide(&n, None, &[attestation("n1", 3600)]);
        assert!(d.allowed, "{}", d.message);
        assert_eq!(d.reason, "attested");
        assert!(d.warnings.is_empty());
    }

    #[test]
    fn expired_attestation_is_refused() {
        let d = decide(&node("n1", &[]), None, &[attestation("n1", -1)]);
        assert!(!d.allowed);
        assert_eq!(d.reason, "expired");
        assert!(d.message.contains("re-attest"));
    }

    #[test]
    fn latest_attestation_wins() {
        let old = attestation("n1", -100);
        let mut newer = (*attestation("n1", 3600)).clone();
        newer.metadata.name = Some("n1-2".into());
        newer.spec.attested_at = Time(now());
        let d = decide(&node("n1", &[]), None, &[old, Arc::new(newer)]);
        assert!(d.allowed, "{}", d.message);
    }

    #[test]
    fn untrusted_verdict_is_refused() {
        let atts = with_spec(|s| s.verdict = Verdict::Untrusted);
        assert_eq!(decide(&node("n1", &[]), None, &atts).reason, "untrusted");
    }

    #[test]
    fn image_without_signed_measurements_is_refused() {
        let atts = with_spec(|s| s.image = "ghcr.io/acme/node-image:v9".into());
        let d = decide(&node("n1", &[]), None, &atts);
        assert_eq!(d.reason, "image_not_trusted");
        // Signed by a key that is not the publisher's.
        let policies = vec![policy(vec![signed_entry(IMAGE, &signing_key(2))])];
        let d = validate(
            &node("n1", &[]),
            None,
            &[attestation("n1", 60)],
            &policies,
            &TrustCache::default(),
            now(),
        );
        assert_eq!(d.reason, "image_not_trusted");
        assert!(d.message.contains("signature"), "{}", d.message);
    }

    #[test]
    fn enforced_pcr_mismatch_refuses_warn_only_warns() {
        let atts = with_spec(|s| {
            s.measurements.insert("4".into(), "00".repeat(32));
        });
        let d = decide(&node("n1", &[]), None, &atts);
        assert_eq!(d.reason, "measurement_mismatch");
        assert!(d.message.contains("PCR 4") || d.message.contains('4'));
        let atts = with_spec(|s| {
            s.measurements.insert("9".into(), "00".repeat(32));
        });
        let d = decide(&node("n1", &[]), None, &atts);
        assert!(d.allowed, "{}", d.message);
        assert_eq!(d.warnings.len(), 1);
    }

    #[test]
    fn image_label_may_hold_the_label_safe_form() {
        assert_eq!(image_label_value(IMAGE), "ghcr.io_acme_node-image_v1.2.0");
        let n = node("n1", &[(LABEL_NODE_IMAGE, &image_label_value(IMAGE))]);
        assert!(decide(&n, None, &[attestation("n1", 60)]).allowed);
        // Long references keep their tag end, as the operator labels them.
        let long = format!("ghcr.io/{}/node-image:v1.2.0", "a".repeat(80));
        let attestations = with_spec(|s| s.image = long.clone());
        let policies = vec![policy(vec![signed_entry(&long, &signing_key(1))])];
        let n = node("n1", &[(LABEL_NODE_IMAGE, &image_label_value(&long))]);
        let d = validate(
            &n,
            None,
            &attestations,
            &policies,
            &TrustCache::default(),
            now(),
        );
        assert!(d.allowed, "{}", d.message);
        assert!(image_label_value(&long).ends_with("node-image_v1.2.0"));
    }

    #[test]
    fn labels_must_match_the_attestation() {
        let d = decide(
            &node("n1", &[(LABEL_NODE_IMAGE, "ghcr.io/evil/image:v1")]),
            None,
            &[attestation("n1", 60)],
        );
        assert_eq!(d.reason, "identity_mismatch");
        let d = decide(
            &node("n1", &[(LABEL_NODE_POOL, "control-plane")]),
            None,
            &[attestation("n1", 60)],
        );
        assert_eq!(d.reason, "identity_mismatch");
    }

    #[test]
    fn identity_labels_may_not_change_on_update() {
        let old = node("n1", &[(LABEL_NODE_POOL, "workers")]);
        let new = node("n1", &[(LABEL_NODE_POOL, "other")]);
        let d = decide(&new, Some(&old), &[attestation("n1", 60)]);
        assert_eq!(d.reason, "identity_changed");
        let removed = node("n1", &[]);
        let d = decide(&removed, Some(&old), &[attestation("n1", 60)]);
        assert_eq!(d.reason, "identity_changed");
        assert!(d.message.contains("<removed>"));
        // Other labels may change.
        let new = node("n1", &[(LABEL_NODE_POOL, "workers"), ("team", "a")]);
        assert!(decide(&new, Some(&old), &[attestation("n1", 60)]).allowed);
    }

    #[test]
    fn node_without_name_is_refused() {
        let d = decide(&NodeMeta::default(), None, &[]);
        assert_eq!(d.reason, "invalid");
    }
}
