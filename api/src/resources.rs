//! The custom resources. Spec is what a user or the gate declares; status is
//! what the controllers observed. Every status carries `conditions` and
//! `observedGeneration`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// AttestationPolicy
// ---------------------------------------------------------------------------

/// What the cluster trusts: evidence kinds, trust roots, and the signed
/// measurements of every node image that may join.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[kube(
    group = "confidential.dev",
    version = "v1alpha1",
    kind = "AttestationPolicy",
    shortname = "attpol",
    status = "AttestationPolicyStatus",
    printcolumn = r#"{"name":"Kinds","type":"string","jsonPath":".spec.evidenceKinds"}"#,
    printcolumn = r#"{"name":"Reattest","type":"string","jsonPath":".spec.reattestationInterval"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AttestationPolicySpec {
    /// Evidence kinds a node may present.
    pub evidence_kinds: Vec<EvidenceKind>,
    /// Trust roots for vTPM evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmTrust>,
    /// Trust roots and minimum TCB for SEV-SNP evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snp: Option<SnpTrust>,
    /// Keys of the publishers whose measurement signatures are trusted.
    #[serde(default)]
    pub publishers: Vec<PublisherKey>,
    /// Node images that may run, each with its signed expected measurements.
    #[serde(default)]
    pub images: Vec<MeasuredImage>,
    /// How long an attestation stays valid, as a Go-style duration ("24h").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reattestation_interval: Option<String>,
}

/// A kind of evidence a machine can present.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EvidenceKind {
    /// A TPM 2.0 quote signed by an attestation key certified through the EK.
    Tpm,
    /// An AMD SEV-SNP attestation report with its VCEK chain.
    SevSnp,
}

/// Trust roots for TPM evidence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct TpmTrust {
    /// PEM certificates of the CAs that issue EK certificates.
    pub ek_ca_certificates: Vec<String>,
}

/// Trust roots for SEV-SNP evidence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnpTrust {
    /// PEM of the AMD root key certificate (ARK) to pin.
    pub ark_certificate: String,
    /// PEM of the AMD signing key certificate (ASK), signed by the ARK.
    pub ask_certificate: String,
    /// The lowest reported TCB that is accepted.
    #[serde(default)]
    pub minimum_tcb: SnpTcb,
}

/// An SEV-SNP TCB version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnpTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

/// A publisher of node images and the key it signs measurements with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublisherKey {
    /// Name the images refer to.
    pub name: String,
    /// ECDSA P-256 public key, PEM (as `cosign generate-key-pair` writes it).
    pub public_key: String,
}

/// A node image with its expected measurements and the publisher signature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeasuredImage {
    /// Image reference, e.g. `ghcr.io/acme/node-image:v1.2.0`.
    pub image: String,
    /// Expected PCR values by PCR index ("0".."23").
    pub measurements: BTreeMap<String, Measurement>,
    /// Expected SEV-SNP launch values, for images that run on SEV-SNP;
    /// signed together with `measurements`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snp: Option<SnpLaunch>,
    /// Publisher (name in `publishers`) whose key signed the measurements.
    pub publisher: String,
    /// Base64 ECDSA signature over the canonical measurement file, as
    /// `cosign sign-blob --key` writes it.
    pub signature: String,
}

/// What the secure processor reports about an SEV-SNP guest booted from the
/// image. A guest that allows debugging is always refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnpLaunch {
    /// Lower-case hex of the 48-byte launch measurement.
    pub measurement: String,
    /// The VMPL attestation reports are requested from (0 without an SVSM).
    #[serde(default)]
    pub vmpl: u32,
    /// Accept guests launched with SMT allowed (guest policy bit 16).
    #[serde(default)]
    pub allow_smt: bool,
    /// Accept guests launched with a migration agent (guest policy bit 18).
    #[serde(default)]
    pub allow_migration_agent: bool,
}

/// One expected PCR value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Lower-case hex of the expected PCR value.
    pub expected: String,
    /// A mismatch is reported but does not refuse the node.
    #[serde(default)]
    pub warn_only: bool,
}

/// Observed state of an AttestationPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AttestationPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------
// NodeVersion
// ---------------------------------------------------------------------------

/// The desired node image and Kubernetes version of a node pool, and how to
/// roll the pool to it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "confidential.dev",
    version = "v1alpha1",
    kind = "NodeVersion",
    shortname = "nv",
    status = "NodeVersionStatus",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Kubernetes","type":"string","jsonPath":".spec.kubernetesVersion"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"UpToDate","type":"integer","jsonPath":".status.upToDateCount"}"#,
    printcolumn = r#"{"name":"Outdated","type":"integer","jsonPath":".status.outdatedCount"}"#,
    printcolumn = r#"{"name":"Progressing","type":"string","jsonPath":".status.conditions[?(@.type==\"RolloutProgressing\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeVersionSpec {
    /// Node image every machine of the pool should boot.
    pub image: String,
    /// Kubernetes version of the kubelets, e.g. `v1.35.4`.
    pub kubernetes_version: String,
    /// Number of nodes in the pool.
    pub replicas: i32,
    /// Whether the pool holds control-plane nodes (rolled first, one at a time).
    #[serde(default)]
    pub control_plane: bool,
    /// How nodes are replaced.
    #[serde(default)]
    pub strategy: RolloutStrategy,
}

/// How a rollout replaces nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// New machines created at a time above `replicas` (count or percent; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<IntOrString>,
    /// Nodes that may be unavailable during the rollout (count or percent; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Seconds to wait for a drain before the timeout outcome (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_seconds: Option<i64>,
    /// Seconds a new machine has to join and attest (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_deadline_seconds: Option<i64>,
    /// Evict pods that use emptyDir volumes.
    #[serde(default)]
    pub delete_empty_dir_data: bool,
    /// Evict pods without a controller (they will not be recreated).
    #[serde(default)]
    pub evict_unmanaged_pods: bool,
}

/// Observed state of a node pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeVersionStatus {
    #[serde(default)]
    pub up_to_date: Vec<String>,
    #[serde(default)]
    pub outdated: Vec<String>,
    #[serde(default)]
    pub donors: Vec<String>,
    #[serde(default)]
    pub heirs: Vec<String>,
    #[serde(default)]
    pub pending: Vec<String>,
    #[serde(default)]
    pub invalid: Vec<String>,
    #[serde(default)]
    pub up_to_date_count: i32,
    #[serde(default)]
    pub outdated_count: i32,
    /// Pods that block the current drain, as `namespace/name`.
    #[serde(default)]
    pub blocking_pods: Vec<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------
// NodeAttestation
// ---------------------------------------------------------------------------

/// The record of one successful (or refused) attestation of a node. Written
/// only by the gate; read by the webhook and the controllers.
///
/// Printer columns: `Expires` (like `PendingNode`'s `Deadline`) is a future
/// time, so it is a `string` column in `date-time` format: kubectl renders
/// `date` columns as an age, which is `<invalid>` for a time in the future.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "confidential.dev",
    version = "v1alpha1",
    kind = "NodeAttestation",
    shortname = "natt",
    status = "NodeAttestationStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".spec.verdict"}"#,
    printcolumn = r#"{"name":"Attested","type":"date","jsonPath":".spec.attestedAt"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","format":"date-time","jsonPath":".spec.expiresAt"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeAttestationSpec {
    pub node_name: String,
    pub evidence_kind: EvidenceKind,
    /// Node image whose measurements the evidence matched.
    pub image: String,
    /// Node pool (NodeVersion name) the machine joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Measured values by PCR index, lower-case hex.
    #[serde(default)]
    pub measurements: BTreeMap<String, String>,
    /// SHA-256 of the attestation key's public area, hex.
    pub ak_fingerprint: String,
    /// UUID of the node's state disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_uuid: Option<String>,
    /// `host:port` of the node's aTLS attestation endpoint (`/v1/attest`,
    /// served by the bootstrapper with `--attest-listen`), recorded by the
    /// join path from what the node announced on its attested channel. The
    /// gate re-verifies the node there; when unset it uses the Node's
    /// `InternalIP` and the gate's `--reattest-port`. The address is only a
    /// hint: whoever answers there must quote with the AK recorded in
    /// `akFingerprint`, so pointing it elsewhere can only fail the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_endpoint: Option<String>,
    /// When the node first proved this identity (its join or rejoin).
    pub attested_at: Time,
    /// Until when the attestation is valid. The gate's re-attestation moves
    /// it to `lastVerified + reattestationInterval` on every success and
    /// never on a failure.
    pub expires_at: Time,
    /// The node is attested, and its own credentials may act, only while
    /// the verdict is `Trusted` and `expiresAt` lies in the future. Any other
    /// verdict (`Revoked`) means "not valid": the admission rule
    /// refuses the node's kubelet, the operator taints it `NoExecute`,
    /// cordons, drains and replaces it.
    pub verdict: Verdict,
    /// Mismatches of `warnOnly` measurements and other non-fatal findings.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The outcome of an attestation. Only `Trusted` is valid.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Verdict {
    /// Evidence verified; valid until `expiresAt`. (Refused evidence is
    /// not recorded: the machine gets no NodeAttestation at all.)
    Trusted,
    /// The node failed re-attestation, or could not be reached, for longer
    /// than the gate's grace period (`status.revokedAt`, the `Revoked`
    /// condition says why). Final: only a new attested join replaces it.
    Revoked,
}

/// Observed state of a NodeAttestation, written by the gate's continuous
/// re-attestation.
///
/// Conditions: `Verified` (True after a successful re-verification; False
/// with the failure's reason, e.g. `PcrMismatch`, `AkMismatch`,
/// `Unreachable`, while failures last) and `Revoked` (True once the verdict
/// became `Revoked`, reason `GracePeriodExceeded`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeAttestationStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When the gate last verified fresh, channel-bound evidence of this
    /// node against the policy in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<Time>,
    /// Re-attestations that failed in a row since the last success.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// The first failure of the current run of failures; cleared by a
    /// success. The node is revoked once failures last longer than the
    /// gate's grace period from this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<Time>,
    /// Reason of the last failure (the `Verified` condition's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_reason: Option<String>,
    /// When the gate revoked the attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
}

// ---------------------------------------------------------------------------
// PendingNode
// ---------------------------------------------------------------------------

/// A machine being created to join a pool, until its Node joined (then the
/// record is deleted) or its join failed.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "confidential.dev",
    version = "v1alpha1",
    kind = "PendingNode",
    shortname = "pn",
    status = "PendingNodeStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Goal","type":"string","jsonPath":".spec.goal"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Deadline","type":"string","format":"date-time","jsonPath":".spec.deadline"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PendingNodeSpec {
    pub node_name: String,
    /// NodeVersion (pool) the machine belongs to.
    pub pool: String,
    pub goal: PendingGoal,
    /// Provider's identifier of the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// Node image the machine boots.
    pub image: String,
    /// When the goal must be reached.
    pub deadline: Time,
}

/// What a pending machine is meant to do. Only joining is recorded: a
/// machine leaves with its Node (cordon, drain, delete), which needs no
/// record of its own.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PendingGoal {
    Join,
}

/// Where a pending machine stands: created and not yet joined, or failed
/// (its record is deleted once its Node joined).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum PendingState {
    #[default]
    Creating,
    Failed,
}

/// Observed state of a PendingNode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PendingNodeStatus {
    #[serde(default)]
    pub state: PendingState,
    /// Join attempts made for this machine's slot.
    #[serde(default)]
    pub attempts: i32,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

// ---------------------------------------------------------------------------
// ImagePolicy
// ---------------------------------------------------------------------------

/// Which container images are measured (digest-pinned and allowed) in which
/// namespaces.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[kube(
    group = "confidential.dev",
    version = "v1alpha1",
    kind = "ImagePolicy",
    shortname = "imgpol",
    status = "ImagePolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImagePolicySpec {
    /// `Enforce` refuses; `Warn` admits with a warning.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Allowed image digests (`sha256:<64 hex>`), in any repository.
    #[serde(default)]
    pub allowed_digests: Vec<String>,
    /// Repositories (exact, or a prefix ending in `/*`) whose images are
    /// allowed when pinned by digest.
    #[serde(default)]
    pub allowed_repositories: Vec<String>,
    /// Known digests of tagged references (`nginx:1.27` -> `sha256:...`),
    /// used to tell users what to pin.
    #[serde(default)]
    pub tag_digests: BTreeMap<String, String>,
    /// Namespaces the policy covers; empty means all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces the policy never covers (default `kube-system`).
    #[serde(default = "default_exempt_namespaces")]
    pub exempt_namespaces: Vec<String>,
}

fn default_exempt_namespaces() -> Vec<String> {
    vec!["kube-system".to_owned()]
}

/// Whether a policy refuses or only warns.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum PolicyMode {
    #[default]
    Enforce,
    Warn,
}

/// Observed state of an ImagePolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImagePolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
