//! Nodes: a Node may be created only for a machine that attested, and a
//! node's own credentials may change it only while its attestation holds.
//!
//! Who sends the write decides which rule applies ([`Actor`]):
//! - the node itself (user `system:node:<name>`, the kubelet): its Node (and
//!   `nodes/status`) only while a NodeAttestation for it exists, is `Trusted`
//!   and unexpired, its image still has signed measurements in an
//!   AttestationPolicy and the attested PCR values match them (`warnOnly`
//!   mismatches become warnings), and identity labels equal what the
//!   attestation recorded. A revoked or expired node therefore cannot post
//!   status (nor renew its Lease, see [`super::lease`]), and the
//!   node-lifecycle controller marks it NotReady.
//! - another node, or a member of `system:nodes` without a node user name:
//!   refused (the NodeRestriction admission plugin refuses the first too).
//! - everyone else (kube-controller-manager, the scheduler, admins, our
//!   operator): may update any Node, so an expired node can still be marked
//!   NotReady, tainted and cordoned. Only the identity labels (node image,
//!   node pool) are fixed for everyone.
//! - creating a Node needs a valid attestation whoever sends it.

use std::collections::BTreeMap;

use confidential_api::keys::{IDENTITY_LABELS, LABEL_NODE_IMAGE, LABEL_NODE_POOL};
use serde::Deserialize;

use super::Decision;

/// The group every node credential carries.
pub const NODES_GROUP: &str = "system:nodes";
/// The user-name prefix of node credentials.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// Who sends a Node or Lease write, as the Node authorizer reads the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A node's own credentials: user `system:node:<name>`. Held to the
    /// node rules even without the `system:nodes` group (stricter than the
    /// Node authorizer, never looser).
    Node(String),
    /// In group `system:nodes` without a node user name: no node may be
    /// changed by it.
    NamelessNode,
    /// Anyone else: the control plane, admins, our operator.
    Other,
}

impl Actor {
    /// Classifies an authenticated user.
    pub fn of(username: &str, groups: &[String]) -> Self {
        match username.strip_prefix(NODE_USER_PREFIX) {
            Some(node) => Actor::Node(node.to_owned()),
            None if groups.iter().any(|g| g == NODES_GROUP) => Actor::NamelessNode,
            None => Actor::Other,
        }
    }

    /// The refusal for a node credential acting on `target` that is not its
    /// own; `None` for the node itself and for non-node users.
    pub fn refuse_foreign(&self, kind: &str, target: &str) -> Option<Decision> {
        match self {
            Actor::Node(own) if own != target => Some(Decision::deny(
                "other_node",
                format!(
                    "node {own} may not change the {kind} of node {target}; a node's credentials act only on its own objects"
                ),
            )),
            Actor::NamelessNode => Some(Decision::deny(
                "other_node",
                format!(
                    "a member of group {NODES_GROUP} whose user name is not {NODE_USER_PREFIX}<node> may not change the {kind} of node {target}"
                ),
            )),
            _ => None,
        }
    }
}

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

pub use super::standing::{Attestations, Standing, latest_attestation};

/// Decides a CREATE (`old` is `None`) or UPDATE of a Node (or of its
/// status) sent by `actor`.
pub fn validate(
    new: &NodeMeta,
    old: Option<&NodeMeta>,
    actor: &Actor,
    state: &Attestations<'_>,
) -> Decision {
    let Some(name) = new.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        return Decision::deny("invalid", "Node without metadata.name");
    };
    if let Some(refusal) = actor.refuse_foreign("Node", name) {
        return refusal;
    }
    let own = matches!(actor, Actor::Node(_));
    if let Some(old) = old {
        for key in IDENTITY_LABELS {
            let (before, after) = (old.label(key), new.label(key));
            // The node may add an identity label (checked against its
            // attestation below); nobody may change or remove one.
            if before != after && !(own && before.is_none()) {
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
        if !own {
            return Decision::allow("not_node_credentials");
        }
    }
    let Standing {
        attestation: att,
        warnings,
    } = match state.standing(name) {
        Ok(standing) => standing,
        Err(refusal) => return refusal,
    };
    let image = att.spec.image.as_str();
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
    use crate::verify::TrustCache;
    use confidential_api::{AttestationPolicy, NodeAttestation, NodeAttestationSpec, Verdict};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::sync::Arc;

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

    fn decide_as(
        actor: &Actor,
        new: &NodeMeta,
        old: Option<&NodeMeta>,
        atts: &[Arc<NodeAttestation>],
    ) -> Decision {
        let policies = trusted_policy();
        let trust = TrustCache::default();
        let state = Attestations {
            attestations: atts,
            policies: &policies,
            trust: &trust,
            now: now(),
        };
        validate(new, old, actor, &state)
    }

    /// Decided for the node's own credentials (the kubelet of `n1`).
    fn decide(new: &NodeMeta, old: Option<&NodeMeta>, atts: &[Arc<NodeAttestation>]) -> Decision {
        decide_as(&Actor::Node("n1".into()), new, old, atts)
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
        let atts = with_spec(|s| s.verdict = Verdict::Revoked);
        assert_eq!(decide(&node("n1", &[]), None, &atts).reason, "untrusted");
    }

    #[test]
    fn image_without_signed_measurements_is_refused() {
        let atts = with_spec(|s| s.image = "ghcr.io/acme/node-image:v9".into());
        let d = decide(&node("n1", &[]), None, &atts);
        assert_eq!(d.reason, "image_not_trusted");
        // Signed by a key that is not the publisher's.
        let policies = vec![policy(vec![signed_entry(IMAGE, &signing_key(2))])];
        let trust = TrustCache::default();
        let state = Attestations {
            attestations: &[attestation("n1", 60)],
            policies: &policies,
            trust: &trust,
            now: now(),
        };
        let d = validate(&node("n1", &[]), None, &Actor::Node("n1".into()), &state);
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
        let trust = TrustCache::default();
        let state = Attestations {
            attestations: &attestations,
            policies: &policies,
            trust: &trust,
            now: now(),
        };
        let d = validate(&n, None, &Actor::Node("n1".into()), &state);
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

    fn user(name: &str, groups: &[&str]) -> Actor {
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        Actor::of(name, &groups)
    }

    #[test]
    fn users_are_classified_as_the_node_authorizer_reads_them() {
        assert_eq!(
            user("system:node:n1", &["system:nodes", "system:authenticated"]),
            Actor::Node("n1".into())
        );
        // Named like a node without the group: still held to the node rule.
        assert_eq!(user("system:node:n1", &[]), Actor::Node("n1".into()));
        assert_eq!(user("mallory", &["system:nodes"]), Actor::NamelessNode);
        for other in [
            "system:serviceaccount:kube-system:node-controller",
            "system:kube-scheduler",
            "system:serviceaccount:confidential-system:confidential-controllers",
            "admin",
            "system:nodes",
        ] {
            assert_eq!(user(other, &["system:masters"]), Actor::Other, "{other}");
        }
    }

    /// Every user against every attestation state, on create and update.
    #[test]
    fn each_user_and_attestation_state() {
        let valid = vec![attestation("n1", 3600)];
        let expired = vec![attestation("n1", -1)];
        let untrusted = with_spec(|s| s.verdict = Verdict::Revoked);
        let missing: Vec<Arc<NodeAttestation>> = vec![attestation("n2", 3600)];
        let states: [(&str, &[Arc<NodeAttestation>]); 4] = [
            ("valid", &valid),
            ("expired", &expired),
            ("untrusted", &untrusted),
            ("unattested", &missing),
        ];
        let actors = [
            ("own kubelet", Actor::Node("n1".into())),
            ("another node", Actor::Node("n2".into())),
            ("nameless node", Actor::NamelessNode),
            (
                "node-lifecycle controller",
                user("system:serviceaccount:kube-system:node-controller", &[]),
            ),
            ("admin", user("admin", &["system:masters"])),
        ];
        let old = node("n1", &[(LABEL_NODE_POOL, "workers")]);
        // A cordon plus a label, as an operator or admin sends it.
        let new = node("n1", &[(LABEL_NODE_POOL, "workers"), ("team", "a")]);
        for (state, atts) in states {
            for (who, actor) in &actors {
                let foreign = matches!(actor, Actor::NamelessNode)
                    || matches!(actor, Actor::Node(n) if n != "n1");
                let own = matches!(actor, Actor::Node(n) if n == "n1");
                for (operation, old) in [("create", None), ("update", Some(&old))] {
                    let d = decide_as(actor, &new, old, atts);
                    let expected_reason = if foreign {
                        "other_node"
                    } else if operation == "update" && !own {
                        "not_node_credentials"
                    } else if state == "valid" {
                        "attested"
                    } else {
                        state
                    };
                    assert_eq!(
                        d.reason, expected_reason,
                        "{who} {operation} with {state} attestation: {}",
                        d.message
                    );
                    assert_eq!(
                        d.allowed,
                        matches!(expected_reason, "attested" | "not_node_credentials"),
                        "{who} {operation} with {state} attestation"
                    );
                }
            }
        }
    }

    #[test]
    fn refusals_of_foreign_node_credentials_name_both_nodes() {
        let d = decide_as(
            &Actor::Node("n2".into()),
            &node("n1", &[]),
            Some(&node("n1", &[])),
            &[attestation("n1", 60), attestation("n2", 60)],
        );
        assert!(!d.allowed);
        assert!(
            d.message
                .contains("node n2 may not change the Node of node n1"),
            "{}",
            d.message
        );
    }

    #[test]
    fn nobody_changes_identity_labels_but_the_node_may_add_them() {
        let atts = [attestation("n1", 3600)];
        let bare = node("n1", &[]);
        let pooled = node("n1", &[(LABEL_NODE_POOL, "workers")]);
        let admin = user("admin", &["system:masters"]);
        // An admin may neither add, change nor remove one.
        assert_eq!(
            decide_as(&admin, &pooled, Some(&bare), &atts).reason,
            "identity_changed"
        );
        assert_eq!(
            decide_as(&admin, &bare, Some(&pooled), &atts).reason,
            "identity_changed"
        );
        // The node may add one matching its attestation, not another.
        assert!(decide(&pooled, Some(&bare), &atts).allowed);
        let wrong = node("n1", &[(LABEL_NODE_POOL, "control-plane")]);
        assert_eq!(
            decide(&wrong, Some(&bare), &atts).reason,
            "identity_mismatch"
        );
    }
}
