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
/// Annotation on a PendingNode: the donor Node its machine replaces.
pub const ANNOTATION_PENDING_DONOR: &str = "confidential.dev/donor";
/// Annotation on a Node: when its drain started (RFC 3339), set with the cordon.
pub const ANNOTATION_DRAIN_STARTED: &str = "confidential.dev/drain-started";
