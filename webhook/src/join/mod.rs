//! The attested join and rejoin endpoints of the gate, on their own aTLS
//! listener (not the admission server's TLS: the node cannot know a cluster
//! CA before it joined, and attestation is bound to *this* TLS channel).
//!
//! A join is accepted only when, in order: the request parses; the node's
//! pool (NodeVersion) wants an image that the AttestationPolicy lists with a
//! measurement file signed by a trusted publisher; the evidence verifies
//! against the policy's trust roots, is bound to this connection's exporter,
//! and its PCRs match the image's measurements (warnOnly honoured); the node
//! name is not held by a different AK of a node that still exists; and, for
//! TPM evidence, the node activated the credential challenge on the same
//! connection (AK proven to live next to the certified EK). Only then does
//! the gate write the NodeAttestation and a single-use, short-TTL bootstrap
//! token bound to the node name, and answer with the secrets. Every refusal
//! answers `{reason, message}` and counts in `join_refusals_total{reason}`;
//! nothing is written before the last check passed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use confidential_api::keys::ANNOTATION_TOKEN_NODE_NAME;
use confidential_api::{
    AttestationPolicy, EvidenceKind, NodeAttestation, NodeAttestationSpec, NodeVersion,
    Verdict as ApiVerdict,
};
use confidential_attestation::atls::{self, AtlsPeer, PURPOSE_JOIN};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, JoinRequest, JoinResponse, PATH_ACTIVATE, PATH_JOIN,
    PATH_REJOIN, Refused,
};
use confidential_attestation::snp::{SnpTrust, Tcb};
use confidential_attestation::tpm::{make_credential, parse_certificates};
use confidential_attestation::verify::{TrustPolicy, Verdict, verify_evidence};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::Rng;
use tokio::net::TcpListener;

/// Flags of the join listener (flattened into the gate's flags).
#[derive(clap::Args, Debug, Clone)]
pub struct JoinArgs {
    /// Address of the aTLS join listener; join is off when unset.
    #[arg(long = "join-listen", env = "CONFIDENTIAL_JOIN_LISTEN")]
    pub join_listen: Option<SocketAddr>,
    /// JSON file `{"secret": "<hex>", "salt": "<hex>"}`: the cluster master secret.
    #[arg(
        long = "join-master-secret-file",
        env = "CONFIDENTIAL_JOIN_MASTER_SECRET_FILE"
    )]
    pub master_secret_file: Option<PathBuf>,
    /// API server URL handed to joining nodes.
    #[arg(long = "join-api-server", env = "CONFIDENTIAL_JOIN_API_SERVER")]
    pub api_server: Option<String>,
    /// PEM of the cluster CA handed to joining nodes.
    #[arg(long = "join-ca-file", env = "CONFIDENTIAL_JOIN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Name of the AttestationPolicy to enforce.
    #[arg(long = "join-policy", default_value = "default")]
    pub policy: String,
    /// NodeVersion used when a node names no pool.
    #[arg(long = "join-default-pool", default_value = "default")]
    pub default_pool: String,
    /// Lifetime of issued bootstrap tokens.
    #[arg(long = "join-token-ttl-seconds", default_value_t = 900)]
    pub token_ttl_seconds: u64,
}

#[derive(serde::Deserialize)]
struct MasterFile {
    secret: String,
    salt: String,
}

/// Reads a master secret file (`{"secret": hex, "salt": hex}`).
pub fn read_master_secret(path: &std::path::Path) -> anyhow::Result<MasterSecret> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: MasterFile = serde_json::from_str(&text).context("parsing master secret file")?;
    Ok(MasterSecret::new(
        hex::decode(file.secret.trim()).context("secret is not hex")?,
        hex::decode(file.salt.trim()).context("salt is not hex")?,
    )?)
}

/// Starts the join listener when `--join-listen` is set; runs until it fails.
pub async fn run(args: JoinArgs, client: Client) -> anyhow::Result<()> {
    let Some(listen) = args.join_listen else {
        return Ok(());
    };
    let master = read_master_secret(
        args.master_secret_file
            .as_deref()
            .context("--join-master-secret-file is required with --join-listen")?,
    )?;
    let ca_file = args
        .ca_file
        .context("--join-ca-file is required with --join-listen")?;
    let ca_pem = std::fs::read_to_string(&ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?;
    let gate = Gate::new(GateConfig {
        client,
        master,
        api_server: args
            .api_server
            .context("--join-api-server is required with --join-listen")?,
        ca_pem,
        policy: args.policy,
        default_pool: args.default_pool,
        token_ttl: Duration::from_secs(args.token_ttl_seconds),
    })?;
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving attested join");
    serve(listener, Arc::new(gate)).await
}

/// Everything the gate needs to answer joins.
pub struct GateConfig {
    pub client: Client,
    pub master: MasterSecret,
    pub api_server: String,
    pub ca_pem: String,
    pub policy: String,
    pub default_pool: String,
    pub token_ttl: Duration,
}

/// Join metrics.
#[derive(Default, Clone)]
pub struct JoinMetrics {
    pub refusals: Family<Vec<(String, String)>, Counter>,
    pub accepted: Family<Vec<(String, String)>, Counter>,
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

    /// Refusals counted for `reason`.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refusals
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .get()
    }
}

/// The join service.
pub struct Gate {
    cfg: GateConfig,
    ca_pin: String,
    pub metrics: JoinMetrics,
}

/// A verified join waiting for its credential activation, kept per aTLS
/// connection (it cannot outlive or leave the channel it was bound to).
struct Pending {
    request: JoinRequest,
    verdict: Verdict,
    image: String,
    pool: String,
    rejoin: bool,
    credential: [u8; 32],
    expires_in: Duration,
}

type ConnState = Arc<Mutex<Option<Pending>>>;

/// A refusal: HTTP status, stable reason, message.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
    fn forbidden(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason, message)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "internal", e.to_string())
    }
}

/// SHA-256 pin of a PEM certificate's SPKI, kubeadm style.
pub fn ca_pin(ca_pem: &str) -> anyhow::Result<String> {
    let certs = parse_certificates(ca_pem).map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = certs.first().context("no certificate in CA PEM")?;
    let pin = atls::spki_pin(first).context("CA certificate does not parse")?;
    Ok(format!("sha256:{}", hex::encode(pin)))
}

fn kind_name(kind: EvidenceKind) -> &'static str {
    match kind {
        EvidenceKind::Tpm => "tpm",
        EvidenceKind::SevSnp => "sev-snp",
    }
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

impl Gate {
    pub fn new(cfg: GateConfig) -> anyhow::Result<Self> {
        let ca_pin = ca_pin(&cfg.ca_pem)?;
        Ok(Self {
            cfg,
            ca_pin,
            metrics: JoinMetrics::default(),
        })
    }

    /// Verifies a (re)join request bound to `peer` without writing anything.
    async fn check(
        &self,
        peer: &AtlsPeer,
        request: &JoinRequest,
        rejoin: bool,
    ) -> Result<(Verdict, String, String, Duration), Refusal> {
        if !valid_node_name(&request.node_name) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-node-name",
                format!("{:?} is not a valid node name", request.node_name),
            ));
        }
        let client = &self.cfg.client;
        let policy = Api::<AttestationPolicy>::all(client.clone())
            .get_opt(&self.cfg.policy)
            .await
            .map_err(Refusal::internal)?
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-policy",
                    format!("AttestationPolicy {} does not exist", self.cfg.policy),
                )
            })?;
        let pool = request
            .pool
            .clone()
            .unwrap_or_else(|| self.cfg.default_pool.clone());
        let version = Api::<NodeVersion>::all(client.clone())
            .get_opt(&pool)
            .await
            .map_err(Refusal::internal)?
            .ok_or_else(|| {
                Refusal::forbidden("unknown-pool", format!("NodeVersion {pool} does not exist"))
            })?;
        let image = version.spec.image.clone();
        let spec = &policy.spec;
        let measured = spec
            .images
            .iter()
            .find(|i| i.image == image)
            .ok_or_else(|| {
                Refusal::forbidden(
                    "image-not-measured",
                    format!("image {image} has no measurements in the AttestationPolicy"),
                )
            })?;
        let publisher = spec
            .publishers
            .iter()
            .find(|p| p.name == measured.publisher)
            .ok_or_else(|| {
                Refusal::forbidden(
                    "unknown-publisher",
                    format!("publisher {} is not trusted", measured.publisher),
                )
            })?;
        // The shared builder, so SEV-SNP launch values are signed and
        // compared like the PCRs.
        let file = crate::verify::measurement_file(measured)
            .map_err(|e| Refusal::forbidden("measurements-invalid", e))?;
        file.verify(&measured.signature, &publisher.public_key)
            .map_err(|e| {
                Refusal::forbidden(
                    "measurements-signature",
                    format!("measurements of {image}: {e}"),
                )
            })?;

        let mut ek_cas = Vec::new();
        for pem in spec.tpm.iter().flat_map(|t| t.ek_ca_certificates.iter()) {
            ek_cas.extend(
                parse_certificates(pem)
                    .map_err(|e| Refusal::internal(format!("policy EK CA: {e}")))?,
            );
        }
        let trust = TrustPolicy {
            evidence_kinds: spec
                .evidence_kinds
                .iter()
                .map(|k| kind_name(*k).to_owned())
                .collect(),
            ek_cas,
            snp: spec.snp.as_ref().map(|s| SnpTrust {
                ark_pem: s.ark_certificate.clone().into_bytes(),
                ask_pem: s.ask_certificate.clone().into_bytes(),
                minimum_tcb: Tcb {
                    bootloader: s.minimum_tcb.bootloader,
                    tee: s.minimum_tcb.tee,
                    snp: s.minimum_tcb.snp,
                    microcode: s.minimum_tcb.microcode,
                },
            }),
        };
        let verdict = verify_evidence(
            &request.evidence,
            &peer.nonce(PURPOSE_JOIN),
            &trust,
            &file.measurements,
        )
        .map_err(|e| Refusal::forbidden(e.reason(), e.to_string()))?;

        // Node name ownership.
        let existing = Api::<NodeAttestation>::all(client.clone())
            .get_opt(&request.node_name)
            .await
            .map_err(Refusal::internal)?;
        match (&existing, rejoin) {
            (Some(att), _) if att.spec.ak_fingerprint != verdict.identity => {
                let node_exists = Api::<Node>::all(client.clone())
                    .get_opt(&request.node_name)
                    .await
                    .map_err(Refusal::internal)?
                    .is_some();
                if node_exists || rejoin {
                    return Err(Refusal::forbidden(
                        "name-taken",
                        format!(
                            "node name {} is held by another attested machine",
                            request.node_name
                        ),
                    ));
                }
            }
            (None, true) => {
                return Err(Refusal::forbidden(
                    "not-attested",
                    format!("{} has no attestation to rejoin with", request.node_name),
                ));
            }
            _ => {}
        }
        let interval = spec
            .reattestation_interval
            .as_deref()
            .and_then(confidential_api::duration::parse_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(24 * 3600));
        Ok((verdict, image, pool, interval))
    }

    /// Writes the NodeAttestation and the token; answers with the secrets.
    async fn finish(&self, p: Pending) -> Result<JoinResponse, Refusal> {
        let client = &self.cfg.client;
        let req = &p.request;
        let now = jiff::Timestamp::now();
        let expires = now
            + jiff::SignedDuration::from_secs(
                i64::try_from(p.expires_in.as_secs()).unwrap_or(86_400),
            );
        let token = if p.rejoin {
            String::new()
        } else {
            self.create_token(&req.node_name).await?
        };
        let attestation = NodeAttestation::new(
            &req.node_name,
            NodeAttestationSpec {
                node_name: req.node_name.clone(),
                evidence_kind: if p.verdict.kind == "tpm" {
                    EvidenceKind::Tpm
                } else {
                    EvidenceKind::SevSnp
                },
                image: p.image.clone(),
                pool: Some(p.pool.clone()),
                measurements: p
                    .verdict
                    .measured
                    .iter()
                    .map(|(k, v)| (k.to_string(), hex::encode(v)))
                    .collect::<BTreeMap<_, _>>(),
                ak_fingerprint: p.verdict.identity.clone(),
                disk_uuid: Some(req.disk_uuid.clone()),
                attested_at: Time(now),
                expires_at: Time(expires),
                verdict: ApiVerdict::Trusted,
                warnings: p.verdict.warnings.clone(),
            },
        );
        let api = Api::<NodeAttestation>::all(client.clone());
        let written = match api
            .get_opt(&req.node_name)
            .await
            .map_err(Refusal::internal)?
        {
            Some(old) => {
                let mut new = attestation;
                new.metadata.resource_version = old.metadata.resource_version;
                api.replace(&req.node_name, &PostParams::default(), &new)
                    .await
            }
            None => api.create(&PostParams::default(), &attestation).await,
        };
        if let Err(e) = written {
            if let Some(id) = token.split('.').next().filter(|id| !id.is_empty()) {
                let _ = Api::<Secret>::namespaced(client.clone(), "kube-system")
                    .delete(&format!("bootstrap-token-{id}"), &DeleteParams::default())
                    .await;
            }
            return Err(Refusal::internal(e));
        }
        self.metrics
            .accepted
            .get_or_create(&vec![("kind".to_owned(), p.verdict.kind.to_owned())])
            .inc();
        Ok(JoinResponse {
            node_name: req.node_name.clone(),
            bootstrap_token: token,
            api_server: self.cfg.api_server.clone(),
            ca_pem: self.cfg.ca_pem.clone(),
            ca_pin: self.ca_pin.clone(),
            disk_key: self.cfg.master.disk_key(&req.disk_uuid).to_vec(),
            measurement_secret: self.cfg.master.measurement_secret().to_vec(),
            cluster_id: hex::encode(self.cfg.master.cluster_id()),
        })
    }

    /// A bootstrap token Secret bound to `node_name` (annotation and
    /// description), expiring after the TTL. Single use is completed by the
    /// CSR approver, which deletes the Secret once it approved the one kubelet
    /// client CSR the token may obtain.
    async fn create_token(&self, node_name: &str) -> Result<String, Refusal> {
        let id = random_string(6);
        let secret = random_string(16);
        let expiration = jiff::Timestamp::now()
            + jiff::SignedDuration::from_secs(
                i64::try_from(self.cfg.token_ttl.as_secs()).unwrap_or(900),
            );
        let data: BTreeMap<String, String> = [
            ("token-id", id.clone()),
            ("token-secret", secret.clone()),
            (
                "expiration",
                expiration.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ),
            ("usage-bootstrap-authentication", "true".to_owned()),
            (
                "auth-extra-groups",
                confidential_api::keys::BOOTSTRAP_TOKEN_GROUP.to_owned(),
            ),
            (
                "description",
                format!("confidential join of node {node_name}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(format!("bootstrap-token-{id}")),
                namespace: Some("kube-system".into()),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_TOKEN_NODE_NAME.to_owned(),
                    node_name.to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("bootstrap.kubernetes.io/token".into()),
            string_data: Some(data),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.cfg.client.clone(), "kube-system")
            .create(&PostParams::default(), &object)
            .await
            .map_err(Refusal::internal)?;
        Ok(format!("{id}.{secret}"))
    }

    fn refuse(&self, r: Refusal) -> Response {
        self.metrics
            .refusals
            .get_or_create(&vec![("reason".to_owned(), r.reason.to_owned())])
            .inc();
        tracing::info!(reason = r.reason, message = %r.message, "join refused");
        (
            r.status,
            Json(Refused {
                reason: r.reason.to_owned(),
                message: r.message,
            }),
        )
            .into_response()
    }

    async fn handle_join(
        &self,
        peer: AtlsPeer,
        conn: ConnState,
        body: Bytes,
        rejoin: bool,
    ) -> Response {
        let request: JoinRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return self.refuse(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "malformed-request",
                    e.to_string(),
                ));
            }
        };
        let (verdict, image, pool, expires_in) = match self.check(&peer, &request, rejoin).await {
            Ok(v) => v,
            Err(r) => return self.refuse(r),
        };
        let mut credential = [0u8; 32];
        rand::rng().fill(&mut credential);
        let challenge = match (&verdict.ak_name, &verdict.ek_public) {
            (Some(name), Some(ek)) => match make_credential(ek, name, &credential) {
                Ok(c) => Some(c),
                Err(e) => return self.refuse(Refusal::forbidden("ek-certificate", e.to_string())),
            },
            _ => None,
        };
        let pending = Pending {
            request,
            verdict,
            image,
            pool,
            rejoin,
            credential,
            expires_in,
        };
        match challenge {
            Some(challenge) => {
                if let Ok(mut slot) = conn.lock() {
                    *slot = Some(pending);
                }
                (StatusCode::ACCEPTED, Json(JoinChallenge { challenge })).into_response()
            }
            None => match self.finish(pending).await {
                Ok(resp) => Json(resp).into_response(),
                Err(r) => self.refuse(r),
            },
        }
    }

    async fn handle_activate(&self, conn: ConnState, body: Bytes) -> Response {
        let request: ActivateRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return self.refuse(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "malformed-request",
                    e.to_string(),
                ));
            }
        };
        let pending = conn.lock().ok().and_then(|mut slot| slot.take());
        let Some(pending) = pending else {
            return self.refuse(Refusal::forbidden(
                "no-pending-join",
                "no verified join on this connection",
            ));
        };
        let same = request.credential.len() == 32
            && request
                .credential
                .iter()
                .zip(pending.credential.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return self.refuse(Refusal::forbidden(
                "activation-failed",
                "credential activation failed: the AK is not in the TPM of the certified EK",
            ));
        }
        match self.finish(pending).await {
            Ok(resp) => Json(resp).into_response(),
            Err(r) => self.refuse(r),
        }
    }
}

/// Serves the join endpoints on `listener` until it fails.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>) -> anyhow::Result<()> {
    // The stable identity every replica derives from the master secret:
    // nodes pin it (`--gate-pin`), so no one else on their path can answer.
    let config = atls::GateIdentity::derive(&gate.cfg.master)?.server_config()?;
    let router =
        Router::new()
            .route(
                PATH_JOIN,
                post(
                    |State(g): State<Arc<Gate>>,
                     Extension(peer): Extension<AtlsPeer>,
                     Extension(conn): Extension<ConnState>,
                     body: Bytes| async move {
                        g.handle_join(peer, conn, body, false).await
                    },
                ),
            )
            .route(
                PATH_REJOIN,
                post(
                    |State(g): State<Arc<Gate>>,
                     Extension(peer): Extension<AtlsPeer>,
                     Extension(conn): Extension<ConnState>,
                     body: Bytes| async move {
                        g.handle_join(peer, conn, body, true).await
                    },
                ),
            )
            .route(
                PATH_ACTIVATE,
                post(
                    |State(g): State<Arc<Gate>>,
                     Extension(conn): Extension<ConnState>,
                     body: Bytes| async move { g.handle_activate(conn, body).await },
                ),
            )
            .with_state(gate);
    atls::serve(listener, config, move |peer: AtlsPeer| {
        let conn: ConnState = Arc::new(Mutex::new(None));
        hyper_util::service::TowerToHyperService::new(
            router.clone().layer(Extension(peer)).layer(Extension(conn)),
        )
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(valid_node_name("node-1.example"));
        assert!(!valid_node_name("Node"));
        assert!(!valid_node_name("-a"));
        assert!(!valid_node_name(""));
    }
}
