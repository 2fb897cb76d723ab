//! The join client: authenticate the gate, attest to it over aTLS, and
//! validate its answer before anything of it is used.
//!
//! The gate is authenticated by its pinned key inside the TLS handshake: a
//! server presenting any other key is refused before the node sends evidence
//! or a request body, with an error naming the expected and presented pins.
//! The answer (token, CA, API server, disk key, cluster ID) is checked into a
//! [`Joined`] value as a whole before any of it reaches the TPM, the disk or
//! a file, so a malformed answer changes nothing on the node.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use confidential_attestation::atls::{self, AtlsClient, AtlsError, PURPOSE_JOIN};
use confidential_attestation::evidence::EvidenceEnvelope;
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, JoinRequest, JoinResponse, PATH_ACTIVATE, PATH_JOIN,
    PATH_REJOIN, Refused,
};
use hyper::StatusCode;
use thiserror::Error;

use crate::args::{Config, GatePin};
use crate::evidence::EvidenceSource;

/// Why one join attempt failed.
#[derive(Debug, Error)]
pub enum JoinError {
    #[error(
        "{endpoint} is not the cluster's gate: it presented key pin {presented}, --gate-pin expects {expected}; nothing was sent to it (check --gate-pin, or who answers on this address)"
    )]
    GateNotAuthenticated {
        endpoint: String,
        expected: GatePin,
        presented: String,
    },
    #[error("connecting to the gate at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: AtlsError,
    },
    #[error("the gate refused the join ({}): {}", .0.reason, .0.message)]
    Refused(Refused),
    #[error("the gate answered {status}: {body}")]
    Unexpected { status: StatusCode, body: String },
    #[error("the gate's answer is invalid: {0}")]
    InvalidAnswer(String),
}

/// Every attempt failed without reaching the gate: connections failed, or
/// what answered presented another key. The node may then serve recovery
/// (`--recovery-listen`); a gate that answered and refused is not this.
#[derive(Debug, Error)]
#[error("no gate could be reached at {endpoints} in {attempts} attempt(s)")]
pub struct GateUnreachable {
    pub endpoints: String,
    pub attempts: u32,
}

/// Whether a failed attempt never reached the gate.
fn never_reached_the_gate(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<JoinError>(),
        Some(JoinError::Connect { .. } | JoinError::GateNotAuthenticated { .. })
    )
}

/// What the kubelet needs from a first join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletBootstrap {
    /// `https://host:port` of the API server.
    pub api_server: String,
    /// `host:port` of the API server (kubeadm's form).
    pub api_endpoint: String,
    pub ca_pem: String,
    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo.
    pub ca_pin: String,
    /// `<id>.<secret>` bootstrap token.
    pub token: String,
}

/// A validated join answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Joined {
    pub node_name: String,
    pub cluster_id: [u8; 32],
    pub disk_key: [u8; 32],
    /// `None` on rejoin: the kubelet already has its credentials.
    pub kubelet: Option<KubeletBootstrap>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("node_name", &self.node_name)
            .field("cluster_id", &hex::encode(self.cluster_id))
            .finish_non_exhaustive()
    }
}

/// The request this node sends with `evidence`.
pub fn join_request(config: &Config, evidence: EvidenceEnvelope) -> JoinRequest {
    JoinRequest {
        node_name: config.node_name.clone(),
        disk_uuid: config.disk_uuid.clone(),
        pool: config.pool.clone(),
        attestation_endpoint: config.attest_advertise.as_ref().map(|e| e.to_string()),
        evidence,
    }
}

fn invalid(what: impl Into<String>) -> JoinError {
    JoinError::InvalidAnswer(what.into())
}

/// Checks the gate's answer for this node: its name, a 32-byte cluster ID
/// and disk key, and on a first join an https API server, a PEM CA, a
/// kubeadm CA pin and a well-formed bootstrap token.
pub fn validate_answer(
    resp: JoinResponse,
    node_name: &str,
    rejoin: bool,
) -> Result<Joined, JoinError> {
    if resp.node_name != node_name {
        return Err(invalid(format!(
            "it names node {:?}, this node is {node_name:?}",
            resp.node_name
        )));
    }
    let cluster_id = hex::decode(&resp.cluster_id)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| invalid("the cluster ID is not 32 hex-encoded bytes"))?;
    let disk_key = <[u8; 32]>::try_from(resp.disk_key.as_slice()).map_err(|_| {
        invalid(format!(
            "the disk key is {} bytes, not 32",
            resp.disk_key.len()
        ))
    })?;
    let kubelet = if rejoin {
        None
    } else {
        let api_endpoint = resp
            .api_server
            .strip_prefix("https://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|host_port| !host_port.is_empty() && !host_port.contains(['/', '@', ' ']))
            .ok_or_else(|| {
                invalid(format!(
                    "API server {:?} is not https://host[:port]",
                    resp.api_server
                ))
            })?
            .to_owned();
        if !resp.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(invalid("the cluster CA is not a PEM certificate"));
        }
        let pin_ok = resp
            .ca_pin
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !pin_ok {
            return Err(invalid("the CA pin is not sha256:<64 hex digits>"));
        }
        if !valid_bootstrap_token(&resp.bootstrap_token) {
            return Err(invalid("the bootstrap token is not <6>.<16> of [a-z0-9]"));
        }
        Some(KubeletBootstrap {
            api_server: resp.api_server.clone(),
            api_endpoint,
            ca_pem: resp.ca_pem.clone(),
            ca_pin: resp.ca_pin.clone(),
            token: resp.bootstrap_token.clone(),
        })
    };
    Ok(Joined {
        node_name: resp.node_name,
        cluster_id,
        disk_key,
        kubelet,
    })
}

/// Kubernetes bootstrap token format: `[a-z0-9]{6}.[a-z0-9]{16}`.
fn valid_bootstrap_token(token: &str) -> bool {
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    token
        .split_once('.')
        .is_some_and(|(id, secret)| ok(id, 6) && ok(secret, 16))
}

fn answer_error(status: StatusCode, body: &[u8]) -> JoinError {
    match serde_json::from_slice::<Refused>(body) {
        Ok(r) => JoinError::Refused(r),
        Err(_) => JoinError::Unexpected {
            status,
            body: String::from_utf8_lossy(body).chars().take(512).collect(),
        },
    }
}

/// Connects to `endpoint`, accepting only the pinned gate key.
async fn connect(endpoint: &str, pin: GatePin) -> Result<AtlsClient, JoinError> {
    let config = atls::client_config(Some(pin.0)).map_err(|source| JoinError::Connect {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    AtlsClient::connect(endpoint, config)
        .await
        .map_err(|source| match source.pin_mismatch() {
            Some(mismatch) => JoinError::GateNotAuthenticated {
                endpoint: endpoint.to_owned(),
                expected: pin,
                presented: mismatch
                    .presented
                    .map_or_else(|| "(unparsable certificate)".to_owned(), hex::encode),
            },
            None => JoinError::Connect {
                endpoint: endpoint.to_owned(),
                source,
            },
        })
}

/// One join attempt on `endpoint`.
async fn join_once(
    config: &Config,
    source: &EvidenceSource,
    endpoint: &str,
) -> Result<JoinResponse> {
    // Nothing is produced or sent before the handshake authenticated the gate.
    let mut client = connect(endpoint, config.gate_pin).await?;
    let evidence = source.evidence(client.nonce(PURPOSE_JOIN)).await?;
    let path = if config.rejoin {
        PATH_REJOIN
    } else {
        PATH_JOIN
    };
    let request = serde_json::to_vec(&join_request(config, evidence))?;
    let (status, body) = client.post(path, request).await?;
    let body = match status {
        StatusCode::OK => body,
        StatusCode::ACCEPTED => {
            let challenge: JoinChallenge = serde_json::from_slice(&body)
                .map_err(|e| invalid(format!("credential challenge: {e}")))?;
            let credential = source.activate(challenge.challenge).await?;
            let (status, body) = client
                .post(
                    PATH_ACTIVATE,
                    serde_json::to_vec(&ActivateRequest { credential })?,
                )
                .await?;
            if status != StatusCode::OK {
                return Err(answer_error(status, &body).into());
            }
            body
        }
        other => return Err(answer_error(other, &body).into()),
    };
    Ok(serde_json::from_slice(&body).map_err(|e| invalid(format!("join response: {e}")))?)
}

/// Joins through the endpoints in order, retrying with backoff (the policy
/// or the network may change) until `max_attempts` rounds failed.
pub async fn join(config: &Config, source: &EvidenceSource) -> Result<Joined> {
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    let mut reached_the_gate = false;
    loop {
        attempt += 1;
        let mut last = None;
        for endpoint in &config.endpoints {
            let result = join_once(config, source, endpoint).await.and_then(|resp| {
                validate_answer(resp, &config.node_name, config.rejoin).map_err(Into::into)
            });
            match result {
                Ok(joined) => return Ok(joined),
                Err(e) => {
                    tracing::warn!(%endpoint, attempt, error = %format!("{e:#}"), "join failed");
                    reached_the_gate |= !never_reached_the_gate(&e);
                    last = Some(e);
                }
            }
        }
        if config.max_attempts != 0 && attempt >= config.max_attempts {
            let last = last.unwrap_or_else(|| anyhow!("no endpoint"));
            if !reached_the_gate {
                return Err(last.context(GateUnreachable {
                    endpoints: config.endpoints.join(","),
                    attempts: attempt,
                }));
            }
            return Err(last).context(format!("joining failed after {attempt} attempt(s)"));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::args::{DiskTarget, EvidenceConfig, KubeletStart};

    pub(crate) fn config() -> Config {
        Config {
            endpoints: vec!["127.0.0.1:1".into()],
            gate_pin: GatePin([1; 32]),
            node_name: "node-a".into(),
            pool: Some("pool".into()),
            disk_uuid: "00000000-0000-4000-8000-000000000001".into(),
            evidence: EvidenceConfig::Snp { vcek: None },
            disk: DiskTarget::None,
            rejoin: false,
            kubelet: KubeletStart::Kubeadm,
            max_attempts: 1,
            attest_listen: None,
            attest_advertise: None,
            joined_file: None,
            recovery_listen: None,
            cluster_id_state: "/nonexistent/cluster-id".into(),
        }
    }

    fn response() -> JoinResponse {
        JoinResponse {
            node_name: "node-a".into(),
            bootstrap_token: "abcdef.0123456789abcdef".into(),
            api_server: "https://10.0.0.1:6443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            disk_key: vec![7; 32],
            cluster_id: hex::encode([9u8; 32]),
        }
    }

    #[tokio::test]
    async fn no_listener_at_any_endpoint_means_the_gate_is_unreachable() {
        let source = EvidenceSource::Snp { vcek: None };
        let err = join(&config(), &source).await.expect_err("nobody listens");
        let unreachable = err
            .downcast_ref::<GateUnreachable>()
            .expect("typed as unreachable");
        assert_eq!(unreachable.attempts, 1);
        assert!(format!("{err:#}").contains("127.0.0.1:1"), "{err:#}");
        assert!(!never_reached_the_gate(&anyhow!(JoinError::Refused(
            Refused {
                reason: "pcr-mismatch".into(),
                message: "no".into()
            }
        ))));
    }

    #[test]
    fn valid_answer_is_accepted() {
        let joined = validate_answer(response(), "node-a", false).expect("valid");
        assert_eq!(joined.cluster_id, [9; 32]);
        assert_eq!(joined.disk_key, [7; 32]);
        let kubelet = joined.kubelet.expect("first join");
        assert_eq!(kubelet.api_endpoint, "10.0.0.1:6443");
        let rejoined = validate_answer(
            JoinResponse {
                bootstrap_token: String::new(),
                ..response()
            },
            "node-a",
            true,
        )
        .expect("rejoin needs no token");
        assert_eq!(rejoined.kubelet, None);
    }

    #[test]
    fn every_bad_answer_is_refused_one_by_one() {
        type Tamper = fn(&mut JoinResponse);
        let cases: Vec<(Tamper, &str)> = vec![
            (|r| r.node_name = "victim".into(), "names node \"victim\""),
            (|r| r.cluster_id = "00".into(), "cluster ID"),
            (|r| r.cluster_id = "zz".repeat(32), "cluster ID"),
            (|r| r.disk_key = vec![1; 16], "disk key is 16 bytes"),
            (|r| r.disk_key = Vec::new(), "disk key is 0 bytes"),
            (
                |r| r.api_server = "http://10.0.0.1:6443".into(),
                "is not https",
            ),
            (|r| r.api_server = "https://".into(), "is not https"),
            (
                |r| r.api_server = "https://evil@10.0.0.1/x".into(),
                "is not https",
            ),
            (|r| r.ca_pem = "garbage".into(), "not a PEM certificate"),
            (|r| r.ca_pin = "ab".repeat(32), "CA pin"),
            (|r| r.ca_pin = "sha256:xyz".into(), "CA pin"),
            (|r| r.bootstrap_token = String::new(), "bootstrap token"),
            (
                |r| r.bootstrap_token = "abcdef.0123456789abcdeF".into(),
                "bootstrap token",
            ),
            (
                |r| r.bootstrap_token = "abcdef.0123 --x".into(),
                "bootstrap token",
            ),
        ];
        for (tamper, expected) in cases {
            let mut resp = response();
            tamper(&mut resp);
            let err = validate_answer(resp, "node-a", false).expect_err(expected);
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }
}
