//! The node's attestation endpoint: `/v1/attest` over aTLS, answering each
//! caller (the gate re-attesting, `kubectl confidential verify --node`) with
//! fresh evidence bound to that caller's own connection. It holds no secret:
//! the evidence is only worth something on the channel it was made for.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use confidential_attestation::atls::{self, AtlsPeer, PURPOSE_NODE_ATTEST};
use confidential_attestation::protocol::{AttestResponse, PATH_ATTEST};
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::evidence::EvidenceSource;

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Serves `/v1/attest` on `listen` until the listener fails.
pub async fn serve(listen: SocketAddr, source: Arc<EvidenceSource>, node: String) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --attest-listen {listen}"))?;
    tracing::info!(%listen, "serving /v1/attest");
    atls::serve(listener, atls::server_config()?, move |peer: AtlsPeer| {
        let source = source.clone();
        let node = node.clone();
        atls::service_fn(move |req| {
            let source = source.clone();
            let node = node.clone();
            async move {
                if req.uri().path() != PATH_ATTEST {
                    return Ok(plain(StatusCode::NOT_FOUND, "not found"));
                }
                let answer = match source.evidence(peer.nonce(PURPOSE_NODE_ATTEST)).await {
                    Ok(evidence) => serde_json::to_vec(&AttestResponse {
                        node_name: node,
                        evidence,
                    })
                    .map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                Ok(match answer {
                    Ok(body) => Response::new(Full::new(Bytes::from(body))),
                    Err(e) => {
                        // The details stay in the node's log; callers only
                        // learn that no evidence is available right now.
                        tracing::warn!(remote = %peer.remote, error = %format!("{e:#}"), "no evidence for /v1/attest");
                        plain(StatusCode::SERVICE_UNAVAILABLE, "evidence unavailable")
                    }
                })
            }
        })
    })
    .await?;
    Ok(())
}
