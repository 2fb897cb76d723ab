//! Wire types of the join protocol between `confidential-bootstrapper` and
//! the gate, shared here because neither binary depends on the other.
//!
//! TPM join is two requests on one aTLS connection: `POST /v1/join` carries
//! the evidence (nonce = the channel's join nonce); the gate verifies it and
//! answers with a credential challenge for the AK; `POST /v1/join/activate`
//! carries the activated credential, and only then does the gate write
//! anything to the cluster and hand out secrets. SEV-SNP evidence is signed by
//! the chip key itself and needs no activation. `/v1/rejoin` works the same
//! way for a node that is still attested.

use serde::{Deserialize, Serialize};

use crate::evidence::EvidenceEnvelope;
use crate::tpm::Challenge;
use crate::wire::b64;

pub const PATH_JOIN: &str = "/v1/join";
pub const PATH_REJOIN: &str = "/v1/rejoin";
pub const PATH_ACTIVATE: &str = "/v1/join/activate";
pub const PATH_ATTEST: &str = "/v1/attest";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    pub node_name: String,
    /// UUID of the node's state disk; its key is derived from it.
    pub disk_uuid: String,
    /// NodeVersion (pool) the node boots for; the gate's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `host:port` where the cluster reaches this node's `/v1/attest`
    /// (e.g. a host port forwarded into a VM); recorded in the
    /// NodeAttestation. Absent: the Node's InternalIP and the gate's
    /// `--reattest-port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_endpoint: Option<String>,
    pub evidence: EvidenceEnvelope,
}

/// First answer: prove the AK lives in the TPM that owns the EK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinChallenge {
    pub challenge: Challenge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivateRequest {
    #[serde(with = "b64")]
    pub credential: Vec<u8>,
}

/// The answer to an accepted (re)join.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    pub node_name: String,
    /// `<id>.<secret>`; single use, short TTL, bound to `node_name`.
    /// Empty on rejoin.
    pub bootstrap_token: String,
    /// API server URL.
    pub api_server: String,
    /// PEM of the cluster CA.
    pub ca_pem: String,
    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo (kubeadm's format).
    pub ca_pin: String,
    #[serde(with = "b64")]
    pub disk_key: Vec<u8>,
    /// Hex cluster ID the node extends into its PCR.
    pub cluster_id: String,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("node_name", &self.node_name)
            .field("api_server", &self.api_server)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused: `reason` is stable (a metric label), `message`
/// is for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub reason: String,
    pub message: String,
}

/// `/v1/attest` request: the caller's purpose is fixed, the node answers with
/// evidence bound to the caller's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestResponse {
    pub node_name: String,
    pub evidence: EvidenceEnvelope,
}

/// Recovery (`kubectl confidential recover`): a rebooted node that cannot
/// reach the gate serves these on its own aTLS listener. The admin's tool
/// asks [`PATH_RECOVER`] first (no body) and gets a [`RecoveryOffer`]: the
/// node's evidence bound to that connection (purpose
/// [`crate::atls::PURPOSE_NODE_RECOVER`]). Only when the tool judged it
/// against local trusted input does it send a credential challenge
/// ([`JoinChallenge`] to [`PATH_RECOVER_ACTIVATE`], answered with an
/// [`ActivateRequest`]), and only when the AK proved to live in the
/// certified TPM does it send [`RecoveryKeys`] to [`PATH_RECOVER_KEYS`].
pub const PATH_RECOVER: &str = "/v1/recover";
pub const PATH_RECOVER_ACTIVATE: &str = "/v1/recover/activate";
pub const PATH_RECOVER_KEYS: &str = "/v1/recover/keys";

/// The node's first answer on a recovery connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryOffer {
    /// The node's name and its evidence, as `/v1/attest` answers.
    #[serde(flatten)]
    pub attestation: AttestResponse,
    /// UUID of the state disk to unlock; its key is derived from it and the
    /// attesting key's identity.
    pub disk_uuid: String,
}

/// What the admin's tool sends once the node is verified and activated:
/// what the gate would have handed it on rejoin.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryKeys {
    #[serde(with = "b64")]
    pub disk_key: Vec<u8>,
    /// Hex cluster ID the node must already hold.
    pub cluster_id: String,
}

impl std::fmt::Debug for RecoveryKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryKeys")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

/// The node's answer to accepted keys: its state is unlocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryDone {
    pub node_name: String,
    /// What was unlocked (`LUKS2 /dev/vdb`, `key file ...`, `no state disk`).
    pub unlocked: String,
}
