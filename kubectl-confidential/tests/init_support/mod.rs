//! Helpers of the `init` suite: the playground without `init`, running the
//! real plugin, reading what the cluster holds, and comparing objects with
//! `kubectl kustomize manifests/`.

use std::path::Path;
use std::process::Output;

use anyhow::{Context, Result};
use confidential_playground::{Options, Playground};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_kubectl-confidential");

pub fn init_tracing() {
    // Once per test binary; a second call finds it set and keeps it.
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter("warn,kube_client=off,confidential_playground=info")
            .with_test_writer()
            .init();
    });
}

/// A control plane, the trust files and the component host; `init` not run.
pub async fn playground() -> Result<Playground> {
    confidential_testenv::install_crypto_provider();
    init_tracing();
    Playground::start(Options {
        nodes: 0,
        init: false,
        ..Options::default()
    })
    .await
}

pub fn run(playground: &Playground, args: &[String]) -> Output {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("KUBECONFIG", &playground.control_plane.kubeconfig)
        .env_remove("RUST_LOG")
        .current_dir(&playground.dir)
        .output()
        .expect("running kubectl-confidential");
    eprintln!(
        "$ kubectl confidential {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `init`'s arguments for the playground with no machines, `extra` appended.
pub fn init_args(playground: &Playground, extra: &[&str]) -> Vec<String> {
    let mut args = playground.init_args(&Options {
        nodes: 0,
        ..Options::default()
    });
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

pub fn secret_data(secret: &Secret, key: &str) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

pub async fn ca_bundle(client: &kube::Client) -> Result<Vec<Vec<u8>>> {
    let config = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get("confidential-gate")
        .await?;
    Ok(config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| w.client_config.ca_bundle.map(|b| b.0).unwrap_or_default())
        .collect())
}

/// The gate refuses a Node no machine attested for: proof the API server
/// calls it through the registered webhook and trusts its certificate.
pub async fn gate_refuses_an_unattested_node(client: &kube::Client) -> Result<String> {
    let intruder: Node =
        serde_json::from_value(json!({ "metadata": { "name": "unattested-intruder" } }))?;
    let err = Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &intruder)
        .await
        .expect_err("the gate must refuse an unattested node");
    let message = err.to_string();
    assert!(message.contains("NodeAttestation"), "{message}");
    Ok(message)
}

/// The leaf certificate the gate serves (not verified: only inspected).
pub async fn served_certificate(url: &str) -> Result<Vec<u8>> {
    #[derive(Debug)]
    struct Inspect;
    impl rustls::client::danger::ServerCertVerifier for Inspect {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Inspect))
        .with_no_client_auth();
    let address = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = connector
        .connect(rustls::pki_types::ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let (_, session) = tls.get_ref();
    Ok(session
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate served")?
        .to_vec())
}

/// What exists of an installation; all of it must stay absent after a refusal.
pub async fn nothing_installed(playground: &Playground) -> Result<()> {
    let client = &playground.client;
    assert!(
        Api::<CustomResourceDefinition>::all(client.clone())
            .get_opt("attestationpolicies.confidential.dev")
            .await?
            .is_none(),
        "a CRD was installed"
    );
    assert!(
        Api::<Namespace>::all(client.clone())
            .get_opt("confidential-system")
            .await?
            .is_none(),
        "the namespace was created"
    );
    assert!(
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .get_opt("confidential-gate")
            .await?
            .is_none()
    );
    Ok(())
}

pub fn kustomize_manifests() -> Result<Vec<Value>> {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let out = std::process::Command::new(confidential_testenv::binaries::kubectl()?)
        .arg("kustomize")
        .arg(&manifests)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout)?)?;
    Ok(objects.into_iter().filter(|o| !o.is_null()).collect())
}

/// JSON numbers compared by value: `0.0` (schemars) and `0` (YAML) are the
/// same number to the API server.
pub fn normalised(value: &Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(normalised).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalised(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Where two JSON values first differ, for a readable failure.
pub fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                first_difference(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}/{k}"),
                )
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}/{i}"))),
        _ if a == b => None,
        _ => Some(format!("{path}: init {a} / manifests {b}")),
    }
}

pub fn key(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or(""),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}
