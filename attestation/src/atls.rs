//! Attested TLS: attestation bound to the TLS channel.
//!
//! After a TLS 1.3 handshake both ends compute the RFC 5705 / RFC 9266
//! exporter (`export_keying_material`, label [`EXPORTER_LABEL`], 32 bytes).
//! The attesting side puts `SHA-256(NONCE_LABEL || exporter || purpose)` into
//! its evidence (TPM qualifying data, SNP REPORT_DATA) and the verifier
//! recomputes it from its own end. A man in the middle terminates two TLS
//! sessions with two different exporters, so relayed evidence fails; evidence
//! replayed from another connection fails too; no nonce round trip is needed.
//!
//! Certificates are ephemeral and self-signed. The client's verifier does not
//! check any chain: it accepts the server's certificate because the *evidence*
//! decides (or, when the caller pins one, because its key hash matches). It
//! still verifies the handshake signature, so the peer holds the key.
//!
//! Modes: the server attests (node verify endpoint: the node answers with
//! evidence bound to the caller's connection), the client attests (join: the
//! node sends evidence in its request) or both (each side sends evidence for
//! its own purpose string). The mode is a matter of who puts evidence into the
//! HTTP exchange; the TLS layer is the same for all three.
//!
//! Length: about 480 lines of code, one protocol in one place (exporter,
//! nonce, pinning verifier, server and client); the rest are its tests,
//! kept beside it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Label of the TLS exporter.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-confidential.dev-atls";
/// Domain separation prefix of the evidence nonce.
pub const NONCE_LABEL: &[u8] = b"confidential.dev/atls/v1";
/// Purpose: a node's evidence in `/v1/join` and `/v1/rejoin`.
pub const PURPOSE_JOIN: &[u8] = b"join";
/// Purpose: a node's evidence served on `/v1/attest`.
pub const PURPOSE_NODE_ATTEST: &[u8] = b"node-attest";
/// Purpose: a rebooted node's evidence on its recovery endpoint, to the
/// admin running `kubectl confidential recover`.
pub const PURPOSE_NODE_RECOVER: &[u8] = b"node-recover";

#[derive(Debug, Error)]
pub enum AtlsError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("generating ephemeral certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// The exporter value of one TLS connection.
pub type Exporter = [u8; 32];

/// `SHA-256(NONCE_LABEL || exporter || purpose)`.
pub fn nonce(exporter: &Exporter, purpose: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(NONCE_LABEL);
    h.update(exporter);
    h.update(purpose);
    h.finalize().into()
}

fn export<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Exporter, AtlsError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)?;
    Ok(out)
}

/// A fresh self-signed certificate and key (P-256), valid for `names`.
pub fn ephemeral_identity(
    names: &[&str],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), AtlsError> {
    let names: Vec<String> = if names.is_empty() {
        vec!["atls.confidential.dev".to_owned()]
    } else {
        names.iter().map(|n| (*n).to_owned()).collect()
    };
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
    Ok((
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

/// The gate's stable TLS identity: a self-signed certificate over the key
/// derived from the master secret ([`crate::kdf::MasterSecret::gate_identity_key`]).
/// Every replica presents the same key, so nodes pin [`GateIdentity::pin`]
/// (SHA-256 of the SubjectPublicKeyInfo, the format of [`spki_pin`]).
pub struct GateIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl GateIdentity {
    /// The identity derived from `master`.
    pub fn derive(master: &crate::kdf::MasterSecret) -> Result<Self, AtlsError> {
        use p256::pkcs8::EncodePrivateKey;
        let pkcs8 = master
            .gate_identity_key()
            .to_pkcs8_der()
            .map_err(|e| AtlsError::Http(format!("encoding the gate key: {e}")))?;
        let key_der = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
        let key = rcgen::KeyPair::try_from(&key_der)?;
        let cert = rcgen::CertificateParams::new(vec!["gate.confidential.dev".to_owned()])?
            .self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            key: key_der,
        })
    }

    /// SHA-256 of the identity's SubjectPublicKeyInfo: what nodes pin.
    pub fn pin(&self) -> [u8; 32] {
        spki_pin(&self.cert).expect("a certificate rcgen produced parses")
    }

    /// TLS 1.3 server config presenting this identity.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, AtlsError> {
        server_config_with(
            self.cert.clone(),
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

/// Server config with an ephemeral identity, TLS 1.3 only (the exporter
/// binding relies on TLS 1.3 semantics).
pub fn server_config() -> Result<Arc<ServerConfig>, AtlsError> {
    let (cert, key) = ephemeral_identity(&[])?;
    server_config_with(cert, key)
}

fn server_config_with(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, AtlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client config that accepts any server certificate (attestation decides),
/// or only one whose SubjectPublicKeyInfo hashes to `pin`.
pub fn client_config(pin: Option<[u8; 32]>) -> Result<Arc<ClientConfig>, AtlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AttestedServerVerifier {
        algorithms: provider.signature_verification_algorithms,
        pin,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (the pin format).
pub fn spki_pin(cert: &[u8]) -> Option<[u8; 32]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(Sha256::digest(parsed.public_key().raw).into())
}

/// The server presented a key other than the pinned one. The handshake is
/// aborted inside the certificate check, before the client sends any
/// application data. [`AtlsError::pin_mismatch`] recovers it from a failed
/// [`AtlsClient::connect`], so callers can name both pins.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "the server's key does not match the pinned key: expected pin {}, presented {}",
    hex::encode(.expected),
    .presented.map_or_else(|| "a certificate without a parsable key".to_owned(), hex::encode)
)]
pub struct PinMismatch {
    /// The pin the client was configured with.
    pub expected: [u8; 32],
    /// SHA-256 of the presented SubjectPublicKeyInfo (`None`: unparsable).
    pub presented: Option<[u8; 32]>,
}

impl AtlsError {
    /// The pin mismatch that aborted this connection attempt, if that is
    /// what happened.
    pub fn pin_mismatch(&self) -> Option<&PinMismatch> {
        let AtlsError::Io(io) = self else {
            return None;
        };
        let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = tls else {
            return None;
        };
        other.0.downcast_ref::<PinMismatch>()
    }
}

#[derive(Debug)]
struct AttestedServerVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    pin: Option<[u8; 32]>,
}

impl ServerCertVerifier for AttestedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pin {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) if spki_pin(end_entity) == Some(pin) => Ok(ServerCertVerified::assertion()),
            Some(expected) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    expected,
                    presented: spki_pin(end_entity),
                }))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("aTLS requires TLS 1.3".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What a server handler knows about the aTLS connection it serves.
#[derive(Debug, Clone, Copy)]
pub struct AtlsPeer {
    pub remote: SocketAddr,
    /// Read only through [`AtlsPeer::nonce`]: evidence is bound to a purpose.
    exporter: Exporter,
}

impl AtlsPeer {
    /// The nonce the peer's evidence for `purpose` must carry.
    pub fn nonce(&self, purpose: &[u8]) -> [u8; 32] {
        nonce(&self.exporter, purpose)
    }
}

/// Serves HTTP/1.1 over aTLS. `make` is called once per connection with that
/// connection's exporter, so handlers can check evidence and keep state that
/// lives exactly as long as the channel it is bound to.
pub async fn serve<F, S, B>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    make: F,
) -> Result<(), AtlsError>
where
    F: Fn(AtlsPeer) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_until(
        listener,
        config,
        make,
        std::future::pending(),
        std::time::Duration::ZERO,
    )
    .await
}

/// [`serve`] until `shutdown` completes: then no connection is accepted any
/// more, and the connections in flight get up to `grace` to finish (so the
/// answer that triggered the shutdown still reaches its caller).
pub async fn serve_until<F, S, B>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    make: F,
    shutdown: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
) -> Result<(), AtlsError>
where
    F: Fn(AtlsPeer) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = TlsAcceptor::from(config);
    let make = Arc::new(make);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => {
                drop(listener);
                if tokio::time::timeout(grace, async {
                    while connections.join_next().await.is_some() {}
                })
                .await
                .is_err()
                {
                    tracing::debug!(open = connections.len(), "aTLS connections still open after the grace period");
                }
                return Ok(());
            }
        };
        let acceptor = acceptor.clone();
        let make = make.clone();
        connections.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "aTLS handshake failed");
                    return;
                }
            };
            let exporter = match export(tls.get_ref().1) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "no TLS exporter");
                    return;
                }
            };
            let service = make(AtlsPeer { remote, exporter });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%remote, error = %e, "aTLS connection ended");
            }
        });
    }
}

/// An HTTP/1.1 client bound to one aTLS connection.
pub struct AtlsClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    exporter: Exporter,
    authority: String,
}

impl AtlsClient {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str, config: Arc<ClientConfig>) -> Result<Self, AtlsError> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name =
            ServerName::try_from(host.clone()).map_err(|_| AtlsError::ServerName(host.clone()))?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        let exporter = export(tls.get_ref().1)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| AtlsError::Http(e.to_string()))?;
        tokio::spawn(async move {
            // The request's own future reports a failed exchange; this only
            // ends with the connection.
            if let Err(error) = conn.await {
                tracing::debug!(%error, "aTLS client connection ended with an error");
            }
        });
        Ok(Self {
            sender,
            exporter,
            authority: addr.to_owned(),
        })
    }

    /// The nonce this side's evidence for `purpose` must carry.
    pub fn nonce(&self, purpose: &[u8]) -> [u8; 32] {
        nonce(&self.exporter, purpose)
    }

    /// POSTs `body` as JSON to `path`; returns the status and body bytes.
    pub async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), AtlsError> {
        self.post_limited(path, body, usize::MAX).await
    }

    /// [`AtlsClient::post`], refusing an answer body longer than `limit`
    /// bytes: for callers that must not let an untrusted peer (a node being
    /// re-verified) make them buffer without bound.
    pub async fn post_limited(
        &mut self,
        path: &str,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), AtlsError> {
        let req = Request::post(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AtlsError::Http(e.to_string()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| AtlsError::Http(e.to_string()))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| AtlsError::Http(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| AtlsError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}

/// A `hyper` service from a closure, for small servers without a router.
pub fn service_fn<F, Fut>(
    f: F,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = Fut,
> + Send
+ 'static
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    hyper::service::service_fn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_identity_is_stable_per_master_secret() {
        let master = |salt: &[u8]| {
            crate::kdf::MasterSecret::new(vec![9; 32], salt.to_vec()).expect("long enough")
        };
        let a = GateIdentity::derive(&master(b"one")).expect("derives");
        let b = GateIdentity::derive(&master(b"one")).expect("derives");
        let c = GateIdentity::derive(&master(b"two")).expect("derives");
        assert_eq!(a.pin(), b.pin(), "replicas of one cluster present one key");
        assert_ne!(a.pin(), c.pin(), "another cluster has another key");
        a.server_config().expect("usable as a TLS identity");
    }

    fn provider() {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            rustls::crypto::ring::default_provider()
                .install_default()
                .expect("the only provider these tests install");
        });
    }

    async fn echo_server() -> SocketAddr {
        provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = server_config().expect("config");
        tokio::spawn(serve(listener, config, |peer: AtlsPeer| {
            service_fn(move |_req| async move {
                // Answer with the nonce the server computes for this channel.
                Ok(Response::new(Full::new(Bytes::copy_from_slice(
                    &peer.nonce(PURPOSE_JOIN),
                ))))
            })
        }));
        addr
    }

    #[tokio::test]
    async fn both_ends_compute_the_same_nonce_and_connections_differ() {
        let addr = echo_server().await;
        let mut a = AtlsClient::connect(&addr.to_string(), client_config(None).expect("cfg"))
            .await
            .expect("connect");
        let mut b = AtlsClient::connect(&addr.to_string(), client_config(None).expect("cfg"))
            .await
            .expect("connect");
        let (_, server_a) = a.post("/", vec![]).await.expect("post");
        let (_, server_b) = b.post("/", vec![]).await.expect("post");
        assert_eq!(&server_a[..], &a.nonce(PURPOSE_JOIN));
        assert_eq!(&server_b[..], &b.nonce(PURPOSE_JOIN));
        assert_ne!(a.nonce(PURPOSE_JOIN), b.nonce(PURPOSE_JOIN));
        assert_ne!(a.nonce(PURPOSE_JOIN), a.nonce(PURPOSE_NODE_ATTEST));
        // A second request on the same connection sees the same channel.
        let (_, again) = a.post("/", vec![]).await.expect("post");
        assert_eq!(again, server_a);
    }

    #[tokio::test]
    async fn serve_until_answers_the_request_that_stops_it_then_accepts_no_more() {
        provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stop = Arc::new(std::sync::Mutex::new(Some(stop)));
        let server = tokio::spawn(serve_until(
            listener,
            server_config().expect("config"),
            move |_peer: AtlsPeer| {
                let stop = stop.clone();
                service_fn(move |_req| {
                    if let Some(stop) = stop.lock().ok().and_then(|mut s| s.take()) {
                        stop.send(()).ok();
                    }
                    async { Ok(Response::new(Full::new(Bytes::from_static(b"last")))) }
                })
            },
            async {
                stopped.await.ok();
            },
            std::time::Duration::from_secs(5),
        ));
        let mut client = AtlsClient::connect(&addr, client_config(None).expect("cfg"))
            .await
            .expect("connect");
        let (_, body) = client.post("/", vec![]).await.expect("answered");
        assert_eq!(&body[..], b"last", "the stopping request gets its answer");
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the server stops once its connections closed")
            .expect("task")
            .expect("clean stop");
        assert!(
            AtlsClient::connect(&addr, client_config(None).expect("cfg"))
                .await
                .is_err(),
            "no connection is accepted after the stop"
        );
    }

    #[tokio::test]
    async fn wrong_pin_is_refused() {
        let addr = echo_server().await;
        let err = AtlsClient::connect(
            &addr.to_string(),
            client_config(Some([0; 32])).expect("cfg"),
        )
        .await
        .err();
        assert!(err.is_some(), "a mismatching pin must fail the handshake");
    }

    #[tokio::test]
    async fn an_answer_longer_than_the_limit_is_refused() {
        let addr = echo_server().await;
        let mut client = AtlsClient::connect(&addr.to_string(), client_config(None).expect("cfg"))
            .await
            .expect("connect");
        let (_, body) = client.post_limited("/", vec![], 32).await.expect("fits");
        assert_eq!(body.len(), 32);
        let err = client.post_limited("/", vec![], 31).await.err();
        assert!(
            err.is_some(),
            "a 32-byte answer must not pass a 31-byte limit"
        );
    }

    #[tokio::test]
    async fn pin_mismatch_names_expected_and_presented_pins() {
        provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let master = crate::kdf::MasterSecret::new(vec![7; 32], b"s".to_vec()).expect("ok");
        let identity = GateIdentity::derive(&master).expect("derives");
        let presented = identity.pin();
        tokio::spawn(serve(
            listener,
            identity.server_config().expect("config"),
            |_peer: AtlsPeer| {
                service_fn(|_req| async { Ok(Response::new(Full::new(Bytes::new()))) })
            },
        ));
        let err = AtlsClient::connect(
            &addr.to_string(),
            client_config(Some([1; 32])).expect("cfg"),
        )
        .await
        .err()
        .expect("a mismatching pin must fail the handshake");
        let mismatch = err.pin_mismatch().expect("typed pin mismatch");
        assert_eq!(mismatch.expected, [1; 32]);
        assert_eq!(mismatch.presented, Some(presented));
        let text = mismatch.to_string();
        assert!(text.contains(&hex::encode([1u8; 32])), "{text}");
        assert!(text.contains(&hex::encode(presented)), "{text}");
        // The matching pin connects.
        AtlsClient::connect(
            &addr.to_string(),
            client_config(Some(presented)).expect("cfg"),
        )
        .await
        .expect("the pinned key connects");
    }
}
