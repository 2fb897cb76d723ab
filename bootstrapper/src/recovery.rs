//! The recovery endpoint: what a rebooted node does when no gate answers
//! (the control plane restarted and its gate is gone). It serves
//! `/v1/recover` over aTLS and waits for the admin's `kubectl confidential
//! recover`, which brings the keys the gate would have handed on rejoin.
//!
//! The node holds nothing worth stealing here: it offers evidence bound to
//! the caller's connection (purpose `node-recover`), answers the credential
//! challenge that proves its AK lives in its certified TPM, and accepts keys
//! only on a connection where it did both, for the cluster it joined before
//! (the cluster ID kept in `--cluster-id-state`, already extended into its
//! PCR so the admin sees it in the quote). The admin's tool decides whether
//! to send anything; the node's order checks only make a confused caller's
//! error clear. Keys are checked ([`accept_keys`], pure) before they reach
//! the disk step; a key the state disk refuses leaves the node waiting.
//! Every request is logged with its path and size, so the node's log shows
//! what each caller sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use confidential_attestation::atls::{self, AtlsPeer, PURPOSE_NODE_RECOVER};
use confidential_attestation::protocol::{
    ActivateRequest, AttestResponse, JoinChallenge, PATH_RECOVER, PATH_RECOVER_ACTIVATE,
    PATH_RECOVER_KEYS, RecoveryDone, RecoveryKeys, RecoveryOffer, Refused,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::evidence::EvidenceSource;

/// Largest request body the endpoint reads (a credential challenge is ~600 bytes).
const MAX_BODY: usize = 64 * 1024;
/// How long the answer to the accepted keys may take to reach the caller
/// before the endpoint closes.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// The unlock step: the state disk key in, a description of what was
/// unlocked out (runs `cryptsetup`, so it blocks).
pub type Unlock = dyn Fn(&[u8; 32]) -> Result<String> + Send + Sync;

/// What the node knows when it waits for recovery.
pub struct Recovery {
    pub node_name: String,
    pub disk_uuid: String,
    /// The cluster this node joined before its reboot.
    pub cluster_id: [u8; 32],
    pub source: Arc<EvidenceSource>,
    pub unlock: Arc<Unlock>,
}

/// Keys the node refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeysRefusal {
    #[error("the cluster ID is not 32 hex-encoded bytes")]
    MalformedClusterId,
    #[error(
        "the keys are for cluster {offered}, this node belongs to cluster {expected}: use that cluster's master secret"
    )]
    OtherCluster { offered: String, expected: String },
    #[error("the {what} is {len} bytes, not 32")]
    Length { what: &'static str, len: usize },
}

/// The pure check of offered keys: this node's cluster, 32-byte keys.
/// Returns the state disk key.
pub fn accept_keys(keys: &RecoveryKeys, cluster_id: &[u8; 32]) -> Result<[u8; 32], KeysRefusal> {
    let offered = hex::decode(&keys.cluster_id)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or(KeysRefusal::MalformedClusterId)?;
    if offered != *cluster_id {
        return Err(KeysRefusal::OtherCluster {
            offered: hex::encode(offered),
            expected: hex::encode(cluster_id),
        });
    }
    let length = |what, bytes: &[u8]| KeysRefusal::Length {
        what,
        len: bytes.len(),
    };
    <[u8; 32]>::try_from(keys.disk_key.as_slice()).map_err(|_| length("disk key", &keys.disk_key))
}

/// Where one connection is in the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Fresh,
    Offered,
    Activated,
}

fn json_answer(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, reason: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&Refused {
        reason: reason.to_owned(),
        message: message.into(),
    })
    .unwrap_or_default();
    json_answer(status, body)
}

fn ok_json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => json_answer(StatusCode::OK, body),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// State shared by all connections of one recovery endpoint.
struct Shared {
    recovery: Recovery,
    /// Serialises unlocking; `None` once the node recovered.
    done: tokio::sync::Mutex<Option<oneshot::Sender<RecoveryDone>>>,
}

/// One request on a connection at `stage`.
async fn handle(
    shared: &Shared,
    peer: AtlsPeer,
    stage: &Mutex<Stage>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "method", "use POST");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body", e.to_string()),
    };
    tracing::info!(remote = %peer.remote, %path, body_bytes = body.len(), "recovery request");
    let current = stage.lock().map(|s| *s).unwrap_or(Stage::Fresh);
    let r = &shared.recovery;
    match (path.as_str(), current) {
        (PATH_RECOVER, _) => match r.source.evidence(peer.nonce(PURPOSE_NODE_RECOVER)).await {
            Ok(evidence) => {
                set(stage, Stage::Offered);
                ok_json(&RecoveryOffer {
                    attestation: AttestResponse {
                        node_name: r.node_name.clone(),
                        evidence,
                    },
                    disk_uuid: r.disk_uuid.clone(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no evidence for recovery");
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "evidence",
                    "evidence unavailable",
                )
            }
        },
        (PATH_RECOVER_ACTIVATE, Stage::Offered | Stage::Activated) => {
            let challenge: JoinChallenge = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => return refuse(StatusCode::BAD_REQUEST, "challenge", e.to_string()),
            };
            match r.source.activate(challenge.challenge).await {
                Ok(credential) => {
                    set(stage, Stage::Activated);
                    ok_json(&ActivateRequest { credential })
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "credential activation failed");
                    refuse(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "activation",
                        "the TPM did not activate this credential",
                    )
                }
            }
        }
        (PATH_RECOVER_KEYS, Stage::Activated) => keys(shared, &body).await,
        (PATH_RECOVER_ACTIVATE | PATH_RECOVER_KEYS, _) => refuse(
            StatusCode::CONFLICT,
            "order",
            format!(
                "on one connection: {PATH_RECOVER} first, then {PATH_RECOVER_ACTIVATE}, then {PATH_RECOVER_KEYS}"
            ),
        ),
        _ => refuse(StatusCode::NOT_FOUND, "path", "not found"),
    }
}

fn set(stage: &Mutex<Stage>, to: Stage) {
    if let Ok(mut s) = stage.lock() {
        *s = to;
    }
}

/// Checks the keys, unlocks the state disk, and ends the recovery.
async fn keys(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let r = &shared.recovery;
    let keys: RecoveryKeys = match serde_json::from_slice(body) {
        Ok(k) => k,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "keys", e.to_string()),
    };
    let disk_key = match accept_keys(&keys, &r.cluster_id) {
        Ok(key) => key,
        Err(e) => {
            tracing::warn!(error = %e, "recovery keys refused");
            return refuse(StatusCode::UNPROCESSABLE_ENTITY, "keys", e.to_string());
        }
    };
    let mut done = shared.done.lock().await;
    let Some(sender) = done.take() else {
        return refuse(
            StatusCode::CONFLICT,
            "recovered",
            "this node already recovered",
        );
    };
    let unlock = r.unlock.clone();
    let unlocked = tokio::task::spawn_blocking(move || unlock(&disk_key))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    match unlocked {
        Ok(what) => {
            tracing::info!(unlocked = %what, "recovered: state unlocked");
            let answer = RecoveryDone {
                node_name: r.node_name.clone(),
                unlocked: what,
            };
            let response = ok_json(&answer);
            sender.send(answer).ok();
            response
        }
        Err(e) => {
            *done = Some(sender);
            tracing::warn!(error = %format!("{e:#}"), "the state disk did not unlock");
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unlock",
                format!("the state disk did not unlock with these keys: {e:#}"),
            )
        }
    }
}

/// Serves recovery on `listen` until an admin's keys unlocked the state.
pub async fn serve(listen: SocketAddr, recovery: Recovery) -> Result<RecoveryDone> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --recovery-listen {listen}"))?;
    tracing::info!(%listen, node = %recovery.node_name, "no gate reachable: serving recovery, waiting for `kubectl confidential recover`");
    let (sender, mut receiver) = oneshot::channel();
    let shared = Arc::new(Shared {
        recovery,
        done: tokio::sync::Mutex::new(Some(sender)),
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = {
        let shared = shared.clone();
        atls::serve_until(
            listener,
            atls::server_config()?,
            move |peer: AtlsPeer| {
                let shared = shared.clone();
                let stage = Arc::new(Mutex::new(Stage::Fresh));
                atls::service_fn(move |req| {
                    let (shared, stage) = (shared.clone(), stage.clone());
                    async move { Ok(handle(&shared, peer, &stage, req).await) }
                })
            },
            async {
                stopped.await.ok();
            },
            ANSWER_GRACE,
        )
    };
    let mut server = std::pin::pin!(server);
    let done = tokio::select! {
        served = &mut server => {
            served?;
            anyhow::bail!("the recovery endpoint stopped before the node recovered");
        }
        done = &mut receiver => done.context("recovery ended without an answer")?,
    };
    // Stop accepting; let the answer reach the admin.
    stop.send(()).ok();
    server.await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> RecoveryKeys {
        RecoveryKeys {
            disk_key: vec![7; 32],
            cluster_id: hex::encode([9u8; 32]),
        }
    }

    #[test]
    fn keys_for_this_cluster_are_accepted() {
        assert_eq!(accept_keys(&keys(), &[9; 32]), Ok([7; 32]));
    }

    #[test]
    fn every_bad_key_set_is_refused_one_by_one() {
        type Tamper = fn(&mut RecoveryKeys);
        let cases: Vec<(Tamper, &str)> = vec![
            (
                |k| k.cluster_id = hex::encode([1u8; 32]),
                "this node belongs to cluster",
            ),
            (|k| k.cluster_id = "zz".repeat(32), "not 32 hex"),
            (|k| k.cluster_id = "09".into(), "not 32 hex"),
            (|k| k.disk_key = vec![7; 31], "disk key is 31 bytes"),
            (|k| k.disk_key = Vec::new(), "disk key is 0 bytes"),
        ];
        for (tamper, says) in cases {
            let mut k = keys();
            tamper(&mut k);
            let err = accept_keys(&k, &[9; 32]).expect_err(says);
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
    }
}
