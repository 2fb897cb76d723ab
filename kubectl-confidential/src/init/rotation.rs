//! Completing a rotation of the gate's serving certificate: the previous CA
//! may leave the caBundle only once the gate serves the new certificate.
//! Whether it does is asked of the one party whose view matters, the API
//! server: a temporary webhook configuration that trusts only the new CA
//! and sends only labelled ConfigMaps in the gate's namespace (a kind the
//! gate's own webhooks never send) to the gate. When a dry-run of such a
//! ConfigMap comes back refused by the gate through that webhook, the API
//! server reached the gate over TLS checked against the new CA alone. This
//! works wherever the gate runs (pods behind a Service or `--gate-url`).
//! The temporary configuration is removed afterwards; left behind, it only
//! affects ConfigMaps carrying its label.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

/// The temporary webhook configuration and its one webhook.
pub const PROBE_CONFIGURATION: &str = "kubectl-confidential-rotation-probe";
const PROBE_WEBHOOK: &str = "rotation-probe.confidential.dev";
/// The label that selects the probe ConfigMap.
const PROBE_LABEL: &str = "confidential.dev/rotation-probe";
const POLL: Duration = Duration::from_millis(500);

/// The temporary configuration (pure): the gate's `client_config` (service
/// or URL) with a caBundle of `ca_pem` only.
pub fn probe_configuration(client_config: &Value, ca_pem: &str, namespace: &str) -> Value {
    let mut client_config = client_config.clone();
    client_config["caBundle"] =
        json!(base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes()));
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {
            "name": PROBE_CONFIGURATION,
            "labels": { "app.kubernetes.io/part-of": "kubectl-confidential" },
        },
        "webhooks": [{
            "name": PROBE_WEBHOOK,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "clientConfig": client_config,
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": namespace } },
            "objectSelector": { "matchLabels": { PROBE_LABEL: "true" } },
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["configmaps"],
                "scope": "Namespaced",
            }],
        }],
    })
}

/// Whether the probe's outcome shows the gate answering through the
/// temporary webhook (pure): only the gate refuses the ConfigMap, and only
/// through that webhook.
pub fn answered_with_new_ca(result: &Result<ConfigMap, kube::Error>) -> bool {
    matches!(
        result,
        Err(kube::Error::Api(status))
            if status.message.contains(&format!("admission webhook \"{PROBE_WEBHOOK}\" denied the request"))
    )
}

/// Waits until the API server reaches the gate trusting `ca_pem` alone.
pub async fn new_certificate_live(
    client: &Client,
    namespace: &str,
    client_config: &Value,
    ca_pem: &str,
    timeout: Duration,
) -> Result<()> {
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let probe: ValidatingWebhookConfiguration =
        serde_json::from_value(probe_configuration(client_config, ca_pem, namespace))?;
    configurations
        .patch(
            PROBE_CONFIGURATION,
            &kube::api::PatchParams::apply(super::apply::FIELD_MANAGER).force(),
            &kube::api::Patch::Apply(&probe),
        )
        .await
        .context("registering the temporary rotation probe webhook")?;
    let result = poll(client, namespace, timeout).await;
    let removed = configurations
        .delete(PROBE_CONFIGURATION, &DeleteParams::default())
        .await
        .context("removing the temporary rotation probe webhook");
    result?;
    removed.map(drop)
}

async fn poll(client: &Client, namespace: &str, timeout: Duration) -> Result<()> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let probe: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": "kubectl-confidential-rotation-probe",
            "labels": { PROBE_LABEL: "true" },
        },
    }))?;
    let params = PostParams {
        dry_run: true,
        field_manager: Some(super::apply::FIELD_MANAGER.to_owned()),
    };
    let started = tokio::time::Instant::now();
    eprintln!("waiting for the gate to serve the new certificate");
    loop {
        if answered_with_new_ca(&config_maps.create(&params, &probe).await) {
            eprintln!(
                "the gate serves the new certificate (after {}s)",
                started.elapsed().as_secs()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "the gate still serves its previous certificate after {timeout:?}; the caBundle \
                 keeps trusting both CAs, so admission keeps working. Run the same init again \
                 once the gate reloaded to drop the previous CA"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(message: &str) -> Result<ConfigMap, kube::Error> {
        Err(kube::Error::Api(
            kube::core::Status::failure(message, "x")
                .with_code(400)
                .boxed(),
        ))
    }

    #[test]
    fn the_probe_trusts_only_the_new_ca_and_sends_only_its_configmaps() {
        let config = probe_configuration(
            &json!({"url": "https://127.0.0.1:8443/validate", "caBundle": "b2xk"}),
            "NEW CA",
            "confidential-system",
        );
        let webhook = &config["webhooks"][0];
        assert_eq!(
            webhook["clientConfig"]["url"],
            "https://127.0.0.1:8443/validate"
        );
        assert_eq!(
            webhook["clientConfig"]["caBundle"],
            base64::engine::general_purpose::STANDARD.encode("NEW CA")
        );
        assert_eq!(webhook["rules"][0]["resources"], json!(["configmaps"]));
        assert_eq!(
            webhook["objectSelector"]["matchLabels"][PROBE_LABEL],
            "true"
        );
        serde_json::from_value::<ValidatingWebhookConfiguration>(config).expect("valid");
    }

    #[test]
    fn only_a_refusal_through_the_probe_webhook_counts() {
        assert!(answered_with_new_ca(&api_error(&format!(
            "admission webhook \"{PROBE_WEBHOOK}\" denied the request: the confidential webhook does not review ConfigMap"
        ))));
        assert!(!answered_with_new_ca(&api_error(&format!(
            "Internal error occurred: failed calling webhook \"{PROBE_WEBHOOK}\": tls: failed to verify certificate"
        ))));
        assert!(!answered_with_new_ca(&api_error(
            "admission webhook \"nodes.confidential.dev\" denied the request: no"
        )));
        assert!(!answered_with_new_ca(&Ok(ConfigMap::default())));
    }
}
