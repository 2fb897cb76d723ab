//! The join server: the aTLS listener, the router and the I/O around
//! [`decide`]. Per request: limit attempts per source address, parse a
//! bounded body, read the policy, the pool and the name's attestation from
//! the watch caches (no API call before the evidence checked out), decide,
//! then bind the verdict (credential activation on the same connection for
//! TPM evidence) and only then write: the NodeAttestation conditionally,
//! then the token.
//!
//! Unauthenticated callers never see internal error text: an internal
//! failure is logged with a correlation id and answered with a generic
//! message carrying that id.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use confidential_attestation::atls::{self, AtlsPeer, GateIdentity, PURPOSE_JOIN};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, JoinRequest, JoinResponse, PATH_ACTIVATE, PATH_JOIN,
    PATH_REJOIN, Refused,
};
use confidential_attestation::tpm::parse_certificates;
use confidential_attestation::verify::{Binding, BoundVerdict, PendingActivation};
use kube::Client;
use kube::runtime::reflector::ObjectRef;
use rand::Rng;
use tokio::net::TcpListener;

use super::args::{JoinArgs, read_master_secret};
use super::decide::{Inputs, JoinPlan, Mode, Reason, Refusal, decide};
use super::limit::{AttemptLimit, Limiter};
use super::metrics::JoinMetrics;
use super::{record, token};
use crate::state::Stores;
use crate::verify::TrustCache;

/// Largest join request body: evidence is a few KiB.
pub const MAX_JOIN_BODY_BYTES: usize = 64 * 1024;

/// Everything the gate needs to answer joins.
pub struct GateConfig {
    /// Writes NodeAttestations and token Secrets (never reads per request).
    pub client: Client,
    /// The watch caches decisions read.
    pub stores: Stores,
    pub master: MasterSecret,
    pub api_server: String,
    pub ca_pem: String,
    pub policy: String,
    pub default_pool: String,
    pub token_ttl: Duration,
    pub attempts: AttemptLimit,
}

/// The join service.
pub struct Gate {
    cfg: GateConfig,
    ca_pin: String,
    trust: TrustCache,
    limiter: Limiter,
    pub metrics: JoinMetrics,
}

/// A join waiting for its credential activation, kept per aTLS connection
/// (it cannot outlive or leave the channel its evidence was bound to).
struct Pending {
    plan: JoinPlan,
    activation: PendingActivation,
}

type PendingSlot = Arc<Mutex<Option<Pending>>>;

/// SHA-256 pin of a PEM certificate's SPKI, kubeadm style.
pub fn ca_pin(ca_pem: &str) -> anyhow::Result<String> {
    let certs = parse_certificates(ca_pem).map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = certs.first().context("no certificate in CA PEM")?;
    let pin = atls::spki_pin(first).context("CA certificate does not parse")?;
    Ok(format!("sha256:{}", hex::encode(pin)))
}

fn correlation_id() -> String {
    let bytes: [u8; 8] = rand::rng().random();
    hex::encode(bytes)
}

impl Gate {
    pub fn new(cfg: GateConfig) -> anyhow::Result<Self> {
        let ca_pin = ca_pin(&cfg.ca_pem)?;
        let limiter = Limiter::new(cfg.attempts);
        Ok(Self {
            cfg,
            ca_pin,
            trust: TrustCache::default(),
            limiter,
            metrics: JoinMetrics::default(),
        })
    }

    /// The pin of the identity this gate presents (`--gate-pin` of nodes).
    pub fn pin(&self) -> anyhow::Result<[u8; 32]> {
        Ok(GateIdentity::derive(&self.cfg.master)?.pin())
    }

    /// Answers a refusal: counted, logged, and for internal failures only a
    /// correlation id goes back to the caller.
    fn refuse(&self, peer: Option<&AtlsPeer>, refusal: Refusal) -> Response {
        let Refusal { reason, message } = refusal;
        self.metrics.count_refusal(reason);
        let remote = peer.map(|p| p.remote.to_string()).unwrap_or_default();
        let message = if reason == Reason::Internal {
            let id = correlation_id();
            tracing::error!(%remote, correlation_id = %id, error = %message, "join failed inside the gate");
            format!("the gate could not complete this request; retry later (correlation id {id})")
        } else {
            tracing::info!(%remote, reason = reason.label(), %message, "join refused");
            message
        };
        (
            reason.status(),
            Json(Refused {
                reason: reason.label().to_owned(),
                message,
            }),
        )
            .into_response()
    }

    fn decide(
        &self,
        peer: &AtlsPeer,
        mode: Mode,
        request: &JoinRequest,
    ) -> Result<super::decide::Accepted, Refusal> {
        let stores = &self.cfg.stores;
        if !stores.is_ready() {
            return Err(Refusal::new(
                Reason::NotReady,
                "the gate's view of the cluster is not current; retry later",
            ));
        }
        let policy = stores
            .attestation_policies
            .get(&ObjectRef::new(&self.cfg.policy));
        let pool_name = request.pool.as_deref().unwrap_or(&self.cfg.default_pool);
        let pool = stores.node_versions.get(&ObjectRef::new(pool_name));
        let existing = stores.attestations.get(&ObjectRef::new(&request.node_name));
        decide(&Inputs {
            mode,
            request,
            nonce: &peer.nonce(PURPOSE_JOIN),
            policy_name: &self.cfg.policy,
            policy: policy.as_ref(),
            pool_name,
            pool: pool.as_deref(),
            existing: existing.as_deref(),
            trust: &self.trust,
        })
    }

    /// `POST /v1/join` and `/v1/rejoin`.
    async fn start(
        &self,
        conn: Connection,
        mode: Mode,
        body: Result<Bytes, BytesRejection>,
    ) -> Response {
        if let Err(wait) = self.limiter.attempt(conn.peer.remote.ip(), Instant::now()) {
            let mut response = self.refuse(
                Some(&conn.peer),
                Refusal::new(
                    Reason::RateLimited,
                    format!(
                        "too many join attempts from {}; retry in {} s",
                        conn.peer.remote.ip(),
                        wait.as_secs().max(1)
                    ),
                ),
            );
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        let request: JoinRequest = match parse(body) {
            Ok(r) => r,
            Err(r) => return self.refuse(Some(&conn.peer), r),
        };
        let accepted = match self.decide(&conn.peer, mode, &request) {
            Ok(a) => a,
            Err(r) => return self.refuse(Some(&conn.peer), r),
        };
        match accepted.verdict.bind() {
            Err(e) => self.refuse(
                Some(&conn.peer),
                Refusal::new(Reason::Evidence(e.reason()), e.to_string()),
            ),
            Ok(Binding::Bound(bound)) => self.finish(&conn.peer, accepted.plan, bound).await,
            Ok(Binding::NeedsActivation(activation)) => {
                let challenge = activation.challenge().clone();
                let Ok(mut slot) = conn.pending.lock() else {
                    return self.refuse(
                        Some(&conn.peer),
                        Refusal::new(Reason::Internal, "pending-join slot poisoned"),
                    );
                };
                *slot = Some(Pending {
                    plan: accepted.plan,
                    activation,
                });
                (StatusCode::ACCEPTED, Json(JoinChallenge { challenge })).into_response()
            }
        }
    }

    /// `POST /v1/join/activate`.
    async fn activate(&self, conn: Connection, body: Result<Bytes, BytesRejection>) -> Response {
        let request: ActivateRequest = match parse(body) {
            Ok(r) => r,
            Err(r) => return self.refuse(Some(&conn.peer), r),
        };
        let pending = conn.pending.lock().ok().and_then(|mut slot| slot.take());
        let Some(Pending { plan, activation }) = pending else {
            return self.refuse(
                Some(&conn.peer),
                Refusal::new(Reason::NoPendingJoin, "no verified join on this connection"),
            );
        };
        match activation.activate(&request.credential) {
            Ok(bound) => self.finish(&conn.peer, plan, bound).await,
            Err(e) => self.refuse(
                Some(&conn.peer),
                Refusal::new(Reason::Evidence(e.reason()), e.to_string()),
            ),
        }
    }

    /// Records the bound attestation, mints the token (joins only) and
    /// answers with the secrets.
    async fn finish(&self, peer: &AtlsPeer, plan: JoinPlan, bound: BoundVerdict) -> Response {
        match self.admit(&plan, &bound).await {
            Ok(response) => {
                self.metrics.count_accepted(bound.verdict().kind);
                tracing::info!(
                    remote = %peer.remote,
                    node = %plan.node_name,
                    mode = ?plan.mode,
                    identity = %bound.verdict().identity,
                    "node admitted"
                );
                Json(response).into_response()
            }
            Err(r) => self.refuse(Some(peer), r),
        }
    }

    async fn admit(&self, plan: &JoinPlan, bound: &BoundVerdict) -> Result<JoinResponse, Refusal> {
        let object = record::attestation_object(plan, bound, jiff::Timestamp::now());
        record::write(&self.cfg.client, plan, &object).await?;
        let token = match plan.mode {
            Mode::Rejoin => String::new(),
            Mode::Join => token::mint(&self.cfg.client, &plan.node_name, self.cfg.token_ttl)
                .await
                .map_err(|e| {
                    Refusal::new(
                        Reason::Internal,
                        format!("creating the bootstrap token of {}: {e}", plan.node_name),
                    )
                })?
                .expose(),
        };
        let identity = &bound.verdict().identity;
        Ok(JoinResponse {
            node_name: plan.node_name.clone(),
            bootstrap_token: token,
            api_server: self.cfg.api_server.clone(),
            ca_pem: self.cfg.ca_pem.clone(),
            ca_pin: self.ca_pin.clone(),
            disk_key: record::disk_key(&self.cfg.master, identity, &plan.disk_uuid).to_vec(),
            cluster_id: hex::encode(self.cfg.master.cluster_id()),
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Refusal> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => Refusal::new(
            Reason::BodyTooLarge,
            format!("the request body is larger than {MAX_JOIN_BODY_BYTES} bytes"),
        ),
        other => Refusal::new(Reason::MalformedRequest, other.body_text()),
    })?;
    serde_json::from_slice(&body).map_err(|e| Refusal::new(Reason::MalformedRequest, e.to_string()))
}

/// One aTLS connection as a handler sees it: the gate, the peer (its
/// channel nonce) and the connection's pending-join slot.
struct Connection {
    gate: Arc<Gate>,
    peer: AtlsPeer,
    pending: PendingSlot,
}

impl FromRequestParts<Arc<Gate>> for Connection {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, gate: &Arc<Gate>) -> Result<Self, Response> {
        let peer = parts.extensions.get::<AtlsPeer>().copied();
        let pending = parts.extensions.get::<PendingSlot>().cloned();
        match (peer, pending) {
            (Some(peer), Some(pending)) => Ok(Self {
                gate: gate.clone(),
                peer,
                pending,
            }),
            _ => Err(gate.refuse(
                None,
                Refusal::new(Reason::Internal, "request without an aTLS connection"),
            )),
        }
    }
}

/// The join routes, for one connection's extensions to be layered on.
pub fn router(gate: Arc<Gate>) -> Router {
    Router::new()
        .route(
            PATH_JOIN,
            post(|c: Connection, body| async move { c.gate.clone().start(c, Mode::Join, body).await }),
        )
        .route(
            PATH_REJOIN,
            post(|c: Connection, body| async move { c.gate.clone().start(c, Mode::Rejoin, body).await }),
        )
        .route(
            PATH_ACTIVATE,
            post(|c: Connection, body| async move { c.gate.clone().activate(c, body).await }),
        )
        .layer(DefaultBodyLimit::max(MAX_JOIN_BODY_BYTES))
        .with_state(gate)
}

/// Serves the join endpoints on `listener` until it fails.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>) -> anyhow::Result<()> {
    // The stable identity every replica derives from the master secret:
    // nodes pin it (`--gate-pin`), so no one else on their path can answer.
    let config = GateIdentity::derive(&gate.cfg.master)?.server_config()?;
    let router = router(gate);
    atls::serve(listener, config, move |peer: AtlsPeer| {
        let pending: PendingSlot = Arc::new(Mutex::new(None));
        hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .layer(Extension(peer))
                .layer(Extension(pending)),
        )
    })
    .await?;
    Ok(())
}

/// Starts the join listener when `--join-listen` is set, reading from
/// `stores`; runs until it fails.
pub async fn run(args: JoinArgs, client: Client, stores: Stores) -> anyhow::Result<()> {
    let Some(listen) = args.join_listen else {
        return Ok(());
    };
    let listen: SocketAddr = listen;
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
        stores,
        master,
        api_server: args
            .api_server
            .context("--join-api-server is required with --join-listen")?,
        ca_pem,
        policy: args.policy,
        default_pool: args.default_pool,
        token_ttl: Duration::from_secs(args.token_ttl_seconds),
        attempts: AttemptLimit {
            burst: args.attempts_burst,
            per_minute: args.attempts_per_minute,
        },
    })?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the join listener {listen}"))?;
    tracing::info!(%listen, "serving attested join");
    serve(listener, Arc::new(gate)).await
}
