//! Label, annotation and field-manager names shared by all components.
//!
//! Keeping them in one place is what lets the webhook, the controllers and the
//! CLI agree on what a node's identity labels are.

/// Label on a Node: the node image the machine booted (set from its attestation).
pub const LABEL_NODE_IMAGE: &str = "confidential.dev/node-image";
/// Label on a Node: the node pool (NodeVersion name) the machine belongs to.
pub const LABEL_NODE_POOL: &str = "confidential.dev/node-pool";
/// Labels that the attestation fixes; updates may not change them.
pub const IDENTITY_LABELS: [&str; 2] = [LABEL_NODE_IMAGE, LABEL_NODE_POOL];

/// Annotation on a NodeVersion that allows changing it while a rollout runs.
pub const ANNOTATION_FORCE: &str = "confidential.dev/force";
/// Annotation on a Node: the donor this heir replaces.
pub const ANNOTATION_HEIR_OF: &str = "confidential.dev/heir-of";
/// Annotation on a Node: the heir that replaces this donor.
pub const ANNOTATION_DONOR_FOR: &str = "confidential.dev/donor-for";

/// Namespace the components run in.
pub const NAMESPACE: &str = "confidential-system";
/// Field manager used for server-side apply by our components.
pub const FIELD_MANAGER: &str = "kubectl-confidential";

/// Annotation on a bootstrap token Secret (`kube-system/bootstrap-token-<id>`):
/// the node name attested for the machine the join endpoint issued the token
/// to. The controllers approve a kubelet client CSR submitted with that token
/// only for this node name.
pub const ANNOTATION_TOKEN_NODE_NAME: &str = "confidential.dev/node-name";
/// The group of the bootstrap tokens the join endpoint issues
/// (`auth-extra-groups` on the token Secret). Deliberately *not* kubeadm's
/// `system:bootstrappers:kubeadm:default-node-token`: `kubeadm init` binds
/// that group to automatic approval of node client CSRs, which would let
/// kube-controller-manager approve a CSR for any node name before our
/// approver decides. It still starts with `system:bootstrappers:`, which the
/// API server requires of a bootstrap token's extra groups.
pub const BOOTSTRAP_TOKEN_GROUP: &str = "system:bootstrappers:confidential:attested-node";
/// The group kubeadm binds to automatic node-client CSR approval; a cluster
/// where it is bound that way is reported by `init` and `status`.
pub const KUBEADM_AUTOAPPROVE_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
/// Annotation on a PendingNode: the donor Node its machine replaces.
pub const ANNOTATION_PENDING_DONOR: &str = "confidential.dev/donor";
/// Taint (effect `NoExecute`) the operator puts on a node whose
/// NodeAttestation expired or failed (verdict not trusted): pods that do not
/// tolerate it leave at once, nothing new is scheduled there, and the node is
/// cordoned, drained and replaced. A node once revoked stays revoked.
pub const TAINT_UNATTESTED: &str = "confidential.dev/unattested";
/// Annotation on a Node: when its drain started (RFC 3339), set with the cordon.
pub const ANNOTATION_DRAIN_STARTED: &str = "confidential.dev/drain-started";

/// The value of [`LABEL_NODE_IMAGE`] for an image reference. Label values
/// allow only `[A-Za-z0-9._-]` and 63 characters, so other characters become
/// `_` and the *last* 63 characters are kept (the tag or digest is the part
/// that tells images apart), trimmed to start and end alphanumerically.
/// The webhook, the operator and the node's kubelet must all use this one
/// mapping, or the webhook would see an identity-label mismatch.
pub fn image_label_value(image: &str) -> String {
    let mapped: String = image
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let start = mapped.len().saturating_sub(63);
    mapped[start..]
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// Whether `name` is a valid Node name (a DNS-1123 subdomain: lowercase
/// alphanumerics, `-` and `.`, labels starting and ending alphanumerically,
/// at most 253 characters). The gate, the CSR approver and the admission
/// rules must agree on this one definition.
pub fn is_valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::image_label_value;

    #[test]
    fn image_label_values_are_valid_and_keep_the_tag() {
        assert_eq!(
            image_label_value("registry.example/node:v1.2"),
            "registry.example_node_v1.2"
        );
        let long = format!("registry.example/{}/node:v9", "a".repeat(80));
        let value = image_label_value(&long);
        assert!(value.len() <= 63 && value.ends_with("node_v9"), "{value}");
        assert_eq!(image_label_value("/x:"), "x");
    }
}
