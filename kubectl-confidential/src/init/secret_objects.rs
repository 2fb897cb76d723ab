//! The two Secrets `init` generates, and reading them back on the next run:
//! the master secret (the file format the gate reads, under the key the
//! gate's Deployment mounts) and the gate's serving certificate with its CA
//! (a `kubernetes.io/tls` Secret plus `ca.crt`, annotated with the names it
//! covers and its end, so the next run can decide to reuse it).

use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::{Value, json};

use super::objects::NAMESPACE;
use super::pki::ServingCert;
use super::secrets::MasterSecretFile;

/// The Secret holding the master secret (key [`MASTER_SECRET_KEY`]), mounted by the gate.
pub const MASTER_SECRET_NAME: &str = "confidential-master-secret";
pub const MASTER_SECRET_KEY: &str = "master-secret.json";
/// The Secret holding the gate's serving certificate.
pub const TLS_SECRET_NAME: &str = "confidential-webhook-tls";
/// Annotations on the TLS Secret recording what the certificate covers.
pub const ANNOTATION_SERVING_NAMES: &str = "confidential.dev/serving-names";
pub const ANNOTATION_NOT_AFTER: &str = "confidential.dev/not-after";

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The Secret the gate reads its master secret from.
pub fn master_secret_object(secret: &MasterSecretFile) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": MASTER_SECRET_NAME,
            "namespace": NAMESPACE,
            "labels": { "app.kubernetes.io/part-of": "kubectl-confidential" },
        },
        "type": "Opaque",
        "data": { MASTER_SECRET_KEY: b64(secret.to_json().as_bytes()) },
    })
}

/// The Secret holding the gate's serving certificate and its CA.
pub fn tls_secret_object(cert: &ServingCert) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": TLS_SECRET_NAME,
            "namespace": NAMESPACE,
            "labels": { "app.kubernetes.io/part-of": "kubectl-confidential" },
            "annotations": {
                ANNOTATION_SERVING_NAMES: cert.names.join(","),
                ANNOTATION_NOT_AFTER: cert.not_after.to_string(),
            },
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(cert.cert_pem.as_bytes()),
            "tls.key": b64(cert.key_pem.as_bytes()),
            "ca.crt": b64(cert.ca_pem.as_bytes()),
        },
    })
}

/// Reads a [`ServingCert`] back from the TLS Secret (None when incomplete).
pub fn serving_cert_from_secret(secret: &Value) -> Option<ServingCert> {
    let decoded = |key: &str| -> Option<String> {
        let text = secret.pointer(&format!("/data/{}", key.replace('/', "~1")))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_str()?)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    let annotation = |key: &str| {
        secret
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Some(ServingCert {
        ca_pem: decoded("ca.crt")?,
        cert_pem: decoded("tls.crt")?,
        key_pem: decoded("tls.key")?,
        names: annotation(ANNOTATION_SERVING_NAMES)?
            .split(',')
            .map(str::to_owned)
            .collect(),
        not_after: annotation(ANNOTATION_NOT_AFTER)?.parse().ok()?,
    })
}

/// Reads the master secret back from its Secret.
pub fn master_secret_from_secret(secret: &Value) -> Result<MasterSecretFile> {
    let text = secret
        .pointer(&format!("/data/{MASTER_SECRET_KEY}"))
        .and_then(Value::as_str)
        .with_context(|| format!("Secret {MASTER_SECRET_NAME} has no key {MASTER_SECRET_KEY}"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("the master-secret Secret is not base64")?;
    MasterSecretFile::parse(&bytes).with_context(|| {
        format!("Secret {MASTER_SECRET_NAME} does not hold a usable master secret")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip() {
        let master = MasterSecretFile::generate();
        let object = master_secret_object(&master);
        assert_eq!(master_secret_from_secret(&object).expect("read"), master);
        let cert = super::super::pki::issue(&["a.example".to_owned()], jiff::Timestamp::now())
            .expect("issue");
        let object = tls_secret_object(&cert);
        assert_eq!(serving_cert_from_secret(&object), Some(cert));
        let mut incomplete = object.clone();
        incomplete["metadata"]["annotations"] = json!({});
        assert_eq!(serving_cert_from_secret(&incomplete), None);
    }
}
