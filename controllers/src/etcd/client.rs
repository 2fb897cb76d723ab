//! A small etcd v3 client over the JSON gateway etcd serves on its client
//! port (`/v3/cluster/member/*`, `/health`), with TLS client certificates.
//!
//! Why not gRPC: the operator needs four calls (list, add, remove, health).
//! etcd's gRPC gateway has exposed them as JSON over HTTPS under the stable
//! `/v3/` prefix since v3.4, on the same port and with the same mutual TLS as
//! gRPC. The workspace already ships hyper + rustls (the kube client uses
//! them); a gRPC stack (tonic, prost, generated etcd protos) would add a
//! code generator and dozens of crates for those four calls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{EtcdError, EtcdSettings, Member, MemberId};

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Per-request bound: a member that does not answer within it counts as
/// unreachable (the next endpoint is tried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Talks to an etcd cluster through any of its client endpoints: the
/// configured ones, then the client URLs of the members it last listed (a
/// control-plane roll replaces every member the flags named).
#[derive(Clone)]
pub struct EtcdClient {
    configured: Vec<String>,
    discovered: Arc<Mutex<Vec<String>>>,
    http: HttpsClient,
}

/// A member as the gateway encodes it (uint64 as strings, empty fields
/// omitted).
#[derive(Deserialize)]
struct WireMember {
    #[serde(rename = "ID", default)]
    id: Value,
    #[serde(default)]
    name: String,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    is_learner: bool,
}

#[derive(Deserialize)]
struct MembersResponse {
    #[serde(default)]
    members: Vec<WireMember>,
}

#[derive(Deserialize)]
struct HealthResponse {
    #[serde(default)]
    health: String,
}

/// An error answer of the gateway: `{"error": ..., "code": ..., "message": ...}`.
#[derive(Deserialize)]
struct ErrorResponse {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error: String,
}

fn member_of(wire: WireMember) -> Result<Member, EtcdError> {
    let id = match &wire.id {
        Value::String(s) => s.parse::<u64>().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| EtcdError::Malformed(format!("member ID {}", wire.id)))?;
    Ok(Member {
        id: MemberId(id),
        name: wire.name,
        peer_urls: wire.peer_urls,
        client_urls: wire.client_urls,
        learner: wire.is_learner,
    })
}

fn tls_config(settings: &EtcdSettings) -> Result<rustls::ClientConfig, EtcdError> {
    let tls = |what: &str, err: String| EtcdError::Tls(format!("{what}: {err}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(settings.ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| tls("etcd CA", e.to_string()))?;
        roots.add(cert).map_err(|e| tls("etcd CA", e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls("etcd CA", "no certificate in the file".into()));
    }
    let chain = CertificateDer::pem_slice_iter(settings.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("etcd client certificate", e.to_string()))?;
    if chain.is_empty() {
        return Err(tls(
            "etcd client certificate",
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(settings.key_pem.as_bytes())
        .map_err(|e| tls("etcd client key", e.to_string()))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls("TLS versions", e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls("etcd client certificate and key", e.to_string()))
}

impl EtcdClient {
    /// A client for `settings.endpoints` (all `https://`), verifying the
    /// servers against the etcd CA and presenting the client certificate.
    pub fn new(settings: &EtcdSettings) -> Result<Self, EtcdError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(settings)?)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            configured: settings.endpoints.clone(),
            discovered: Arc::default(),
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Endpoints to try, configured first, without duplicates.
    fn endpoints(&self) -> Vec<String> {
        let discovered = self
            .discovered
            .lock()
            .map(|d| d.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        let mut all = self.configured.clone();
        for url in discovered {
            if !all.contains(&url) {
                all.push(url);
            }
        }
        all
    }

    /// Remembers the client URLs of `members` for the next requests.
    fn discover(&self, members: &[Member]) {
        let urls: Vec<String> = members
            .iter()
            .flat_map(|m| m.client_urls.iter().cloned())
            .filter(|u| u.starts_with("https://"))
            .collect();
        if urls.is_empty() {
            return;
        }
        match self.discovered.lock() {
            Ok(mut d) => *d = urls,
            Err(poisoned) => *poisoned.into_inner() = urls,
        }
    }

    /// One request to one endpoint; `Unreachable` when it did not answer.
    async fn send(
        &self,
        endpoint: &str,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(http::StatusCode, Bytes), EtcdError> {
        let url = format!("{}{path}", endpoint.trim_end_matches('/'));
        let unreachable = |reason: String| EtcdError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let payload = body.map(Value::to_string).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| EtcdError::Malformed(format!("request to {url}: {e}")))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    /// POSTs to the first endpoint that answers; a member without a leader
    /// (503) or unreachable is skipped.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, EtcdError> {
        let mut last = None;
        for endpoint in &self.endpoints() {
            match self
                .send(endpoint, http::Method::POST, path, Some(body))
                .await
            {
                Ok((status, bytes)) if status.is_success() => {
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| EtcdError::Malformed(format!("answer of {path}: {e}")));
                }
                Ok((status, bytes)) => {
                    let error = serde_json::from_slice::<ErrorResponse>(&bytes)
                        .map(|e| {
                            if e.message.is_empty() {
                                e.error
                            } else {
                                e.message
                            }
                        })
                        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                    let refused = EtcdError::Refused {
                        endpoint: endpoint.clone(),
                        status: status.as_u16(),
                        message: error,
                    };
                    if status == http::StatusCode::SERVICE_UNAVAILABLE {
                        last = Some(refused);
                        continue;
                    }
                    return Err(refused);
                }
                Err(err @ EtcdError::Unreachable { .. }) => last = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or(EtcdError::NoEndpoints))
    }

    /// Lists the members with a linearizable read: an answer proves the
    /// cluster has quorum now and the list is current.
    pub async fn member_list(&self) -> Result<Vec<Member>, EtcdError> {
        let response: MembersResponse = self
            .post("/v3/cluster/member/list", &json!({ "linearizable": true }))
            .await?;
        let members = response
            .members
            .into_iter()
            .map(member_of)
            .collect::<Result<Vec<_>, _>>()?;
        self.discover(&members);
        Ok(members)
    }

    /// Adds a voting member with these peer URLs (what a joining
    /// control-plane machine does right before it starts its etcd). Returns
    /// the members after the change.
    pub async fn member_add(&self, peer_urls: &[String]) -> Result<Vec<Member>, EtcdError> {
        let response: MembersResponse = self
            .post(
                "/v3/cluster/member/add",
                &json!({ "peerURLs": peer_urls, "isLearner": false }),
            )
            .await?;
        response.members.into_iter().map(member_of).collect()
    }

    /// Removes a member. etcd itself also refuses a removal that leaves
    /// fewer started members than a quorum (`--strict-reconfig-check`).
    pub async fn member_remove(&self, id: MemberId) -> Result<Vec<Member>, EtcdError> {
        let response: MembersResponse = self
            .post(
                "/v3/cluster/member/remove",
                &json!({ "ID": id.0.to_string() }),
            )
            .await?;
        response.members.into_iter().map(member_of).collect()
    }

    /// Whether the member answers `/health` with `true` on any of its client
    /// URLs (it has a leader and serves a quorum read). A member that has
    /// not started yet has no client URL and is not healthy.
    pub async fn healthy(&self, member: &Member) -> bool {
        for url in &member.client_urls {
            match self.send(url, http::Method::GET, "/health", None).await {
                Ok((status, bytes)) if status.is_success() => {
                    if serde_json::from_slice::<HealthResponse>(&bytes)
                        .is_ok_and(|h| h.health == "true")
                    {
                        return true;
                    }
                }
                Ok((status, _)) => {
                    tracing::debug!(member = %member.name, %url, %status, "etcd member not healthy");
                }
                Err(err) => tracing::debug!(member = %member.name, %url, %err, "etcd health"),
            }
        }
        false
    }
}

/// The error with its sources (TLS failures hide in them).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
