//! The HTTPS server on its own (fixed state, no cluster): probes, metrics,
//! the body limit, 400 for bodies that are not reviews, and certificate
//! reloads — including a broken pair, which must keep the previous one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_testenv::pki::CertificateAuthority;
use confidential_testenv::{eventually, install_crypto_provider};
use confidential_webhook::handler::Webhook;
use confidential_webhook::metrics::Metrics;
use confidential_webhook::server::{self, WebhookArgs};
use confidential_webhook::state::{Snapshot, Stores};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

struct Server {
    addr: SocketAddr,
    ca: CertificateAuthority,
    dir: tempfile::TempDir,
    running: server::Running,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.running.handle.shutdown();
    }
}

fn pair(ca: &CertificateAuthority) -> Result<confidential_testenv::pki::CertifiedKey> {
    ca.issue_server(
        "webhook",
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
}

async fn start() -> Result<Server> {
    install_crypto_provider();
    let ca = CertificateAuthority::new("server-test-ca")?;
    let dir = tempfile::tempdir()?;
    let p = pair(&ca)?;
    std::fs::write(dir.path().join("tls.crt"), &p.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &p.key_pem)?;
    let args = WebhookArgs {
        listen: "127.0.0.1:0".parse()?,
        tls_cert: dir.path().join("tls.crt"),
        tls_key: dir.path().join("tls.key"),
        tls_reload_interval: Duration::from_millis(50),
        max_body_bytes: 64 * 1024,
        kubeconfig: None,
        exempt_namespaces: confidential_webhook::validate::workload::DEFAULT_EXEMPT_NAMESPACES
            .map(str::to_owned)
            .to_vec(),
    };
    let (stores, _writers) = Stores::fixed(Snapshot::default());
    let running = server::serve(Webhook::new(stores, Metrics::new()), &args).await?;
    Ok(Server {
        addr: running.addr,
        ca,
        dir,
        running,
    })
}

fn connector(ca_pem: &str) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )))
}

/// One request on a fresh TLS connection; returns status, body and the
/// server's leaf certificate.
async fn request(
    server: &Server,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, String, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(server.addr).await?;
    let tls = connector(&server.ca.cert.cert_pem)?
        .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate")?
        .to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), leaf))
}

#[tokio::test]
async fn probes_and_metrics() -> Result<()> {
    let s = start().await?;
    assert_eq!(request(&s, "GET", "/healthz", vec![]).await?.0, 200);
    assert_eq!(request(&s, "GET", "/readyz", vec![]).await?.0, 200);
    let review = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","namespace":"a","object":{"spec":{"containers":[]}}}}"#;
    let (status, body, _) = request(&s, "POST", "/validate", review.to_vec()).await?;
    assert_eq!(status, 200);
    assert!(body.contains(r#""allowed":true"#), "{body}");
    let (status, metrics, _) = request(&s, "GET", "/metrics", vec![]).await?;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"confidential_webhook_admission_reviews_total{kind="Pod",verdict="allowed",reason="not_covered"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"le="2.5e-5""#) || metrics.contains(r#"le="0.000025""#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_bodies_get_400_or_413() -> Result<()> {
    let s = start().await?;
    let (status, body, _) = request(&s, "POST", "/validate", b"{not json".to_vec()).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not an AdmissionReview"), "{body}");
    let (status, _, _) = request(&s, "POST", "/validate", vec![b' '; 65 * 1024]).await?;
    assert_eq!(status, 413);
    // The server is still serving.
    assert_eq!(request(&s, "GET", "/healthz", vec![]).await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn certificate_reload_on_content_change_and_broken_pair_kept_out() -> Result<()> {
    let s = start().await?;
    let (_, _, first) = request(&s, "GET", "/healthz", vec![]).await?;
    // A broken pair (certificate without a matching key) is not loaded.
    let broken = pair(&s.ca)?;
    std::fs::write(s.dir.path().join("tls.crt"), &broken.cert_pem)?;
    std::fs::write(
        s.dir.path().join("tls.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, still) = request(&s, "GET", "/healthz", vec![]).await?;
    assert_eq!(status, 200);
    assert_eq!(
        still, first,
        "a broken pair replaced the serving certificate"
    );
    // A good pair is picked up without restart.
    let good = pair(&s.ca)?;
    std::fs::write(s.dir.path().join("tls.key"), &good.key_pem)?;
    std::fs::write(s.dir.path().join("tls.crt"), &good.cert_pem)?;
    let expected = CertificateDer::from_pem_slice(good.cert_pem.as_bytes())?.to_vec();
    eventually("new certificate served", Duration::from_secs(5), || {
        let expected = expected.clone();
        let s = &s;
        async move {
            let (_, _, leaf) = request(s, "GET", "/healthz", vec![]).await?;
            Ok((leaf == expected).then_some(()))
        }
    })
    .await
}
