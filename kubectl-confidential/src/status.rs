//! `kubectl confidential status`: where the gate runs and whether it is
//! up, node pools, attestations and pending machines at a glance, or as
//! JSON/YAML for scripts and auditors.

use anyhow::Result;
use confidential_api::{NodeAttestation, NodeVersion, PendingNode};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::connection::Cluster;
use crate::init::objects::WEBHOOK_CONFIGURATION;
use crate::output::{Format, hide_managed_fields, print_structured, print_table};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Format,
    /// Keep `metadata.managedFields` in JSON/YAML output (hidden by
    /// default, as kubectl does).
    #[arg(long)]
    show_managed_fields: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    gate: GateStatus,
    node_versions: Vec<NodeVersion>,
    node_attestations: Vec<NodeAttestation>,
    pending_nodes: Vec<PendingNode>,
}

/// Where the API server calls the gate and, when it runs in the cluster,
/// how many of its pods are ready.
#[derive(Serialize, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct GateStatus {
    /// `Service NAMESPACE/NAME` or the URL; absent when no webhook
    /// configuration of the gate is installed.
    #[serde(skip_serializing_if = "Option::is_none")]
    called_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pods_ready: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pods_desired: Option<i32>,
}

/// The Service (namespace, name) or the URL the configuration's webhooks
/// call (pure; the first webhook's, which `init` makes all the same).
fn gate_target(
    config: &ValidatingWebhookConfiguration,
) -> Option<(String, Option<(String, String)>)> {
    let client = &config.webhooks.as_ref()?.first()?.client_config;
    match (&client.service, &client.url) {
        (Some(service), _) => Some((
            format!("Service {}/{}", service.namespace, service.name),
            Some((service.namespace.clone(), service.name.clone())),
        )),
        (None, Some(url)) => Some((url.clone(), None)),
        (None, None) => None,
    }
}

async fn gate_status(client: &kube::Client) -> Result<GateStatus> {
    let Some(config) = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK_CONFIGURATION)
        .await?
    else {
        return Ok(GateStatus::default());
    };
    let Some((called_at, service)) = gate_target(&config) else {
        return Ok(GateStatus::default());
    };
    let mut status = GateStatus {
        called_at: Some(called_at),
        ..GateStatus::default()
    };
    // The gate's Deployment has its Service's name (manifests/webhook/).
    if let Some((namespace, name)) = service
        && let Some(deployment) = Api::<Deployment>::namespaced(client.clone(), &namespace)
            .get_opt(&name)
            .await?
    {
        let (ready, desired) = crate::version::replica_counts(&deployment);
        status.pods_ready = Some(ready);
        status.pods_desired = Some(desired);
    }
    Ok(status)
}

pub async fn run(cluster: &Cluster, args: &StatusArgs) -> Result<()> {
    let lp = ListParams::default();
    let client = &cluster.client;
    let mut status = Status {
        // Who may list the pools may still not read webhook configurations:
        // then the gate line says so and the rest is shown.
        gate: gate_status(client).await.unwrap_or_else(|err| {
            eprintln!("Warning: could not read where the gate runs: {err:#}");
            GateStatus::default()
        }),
        node_versions: Api::<NodeVersion>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| cluster.explain("listing NodeVersions", e))?
            .items,
        node_attestations: Api::<NodeAttestation>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| cluster.explain("listing NodeAttestations", e))?
            .items,
        pending_nodes: Api::<PendingNode>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| cluster.explain("listing PendingNodes", e))?
            .items,
    };
    // Warnings go to stderr, as kubectl prints them, so -o json stays clean.
    match crate::preflight::kubeadm_autoapprove_bindings(client).await {
        Ok(warnings) => warnings.iter().for_each(|w| eprintln!("Warning: {w}")),
        Err(err) => eprintln!("Warning: could not check for CSR auto-approval bindings: {err:#}"),
    }
    if !args.show_managed_fields {
        hide_managed_fields(&mut status.node_versions);
        hide_managed_fields(&mut status.node_attestations);
        hide_managed_fields(&mut status.pending_nodes);
    }
    if print_structured(args.output, &status)? {
        return Ok(());
    }
    println!("GATE");
    let gate = &status.gate;
    let pods = match (gate.pods_ready, gate.pods_desired) {
        (Some(ready), Some(desired)) => format!("{ready}/{desired}"),
        _ if gate
            .called_at
            .as_deref()
            .is_some_and(|c| !c.starts_with("Service ")) =>
        {
            "- (outside the cluster)".to_owned()
        }
        _ => "-".to_owned(),
    };
    let called_at = gate
        .called_at
        .clone()
        .unwrap_or_else(|| "not installed (run `kubectl confidential init`)".to_owned());
    print_table(&["CALLED AT", "PODS READY"], &[vec![called_at, pods]]);
    println!();
    let pools: Vec<Vec<String>> = status
        .node_versions
        .iter()
        .map(|nv| {
            let s = nv.status.clone().unwrap_or_default();
            let progressing = s
                .conditions
                .iter()
                .find(|c| c.type_ == confidential_api::conditions::types::ROLLOUT_PROGRESSING)
                .map_or("-".to_owned(), |c| c.status.clone());
            vec![
                nv.name_any(),
                nv.spec.image.clone(),
                nv.spec.kubernetes_version.clone(),
                nv.spec.replicas.to_string(),
                s.up_to_date_count.to_string(),
                s.outdated_count.to_string(),
                progressing,
            ]
        })
        .collect();
    println!("NODE POOLS");
    print_table(
        &[
            "NAME",
            "IMAGE",
            "KUBERNETES",
            "REPLICAS",
            "UP-TO-DATE",
            "OUTDATED",
            "PROGRESSING",
        ],
        &pools,
    );
    let attestations: Vec<Vec<String>> = status
        .node_attestations
        .iter()
        .map(|a| {
            vec![
                a.spec.node_name.clone(),
                a.spec.image.clone(),
                format!("{:?}", a.spec.verdict),
                a.spec.expires_at.0.to_string(),
                a.spec.warnings.len().to_string(),
            ]
        })
        .collect();
    println!("\nATTESTATIONS");
    print_table(
        &["NODE", "IMAGE", "VERDICT", "EXPIRES", "WARNINGS"],
        &attestations,
    );
    let pending: Vec<Vec<String>> = status
        .pending_nodes
        .iter()
        .map(|p| {
            vec![
                p.spec.node_name.clone(),
                p.spec.pool.clone(),
                format!("{:?}", p.spec.goal),
                format!("{:?}", p.status.clone().unwrap_or_default().state),
                p.spec.deadline.0.to_string(),
            ]
        })
        .collect();
    println!("\nPENDING MACHINES");
    print_table(&["NODE", "POOL", "GOAL", "STATE", "DEADLINE"], &pending);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_is_called_through_its_service_or_at_a_url() {
        let config = |client: serde_json::Value| -> ValidatingWebhookConfiguration {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": WEBHOOK_CONFIGURATION },
                "webhooks": [{ "name": "nodes.confidential.dev", "clientConfig": client,
                    "sideEffects": "None", "admissionReviewVersions": ["v1"] }]
            }))
            .expect("configuration")
        };
        assert_eq!(
            gate_target(&config(serde_json::json!({
                "service": { "namespace": "confidential-system", "name": "confidential-webhook" }
            }))),
            Some((
                "Service confidential-system/confidential-webhook".to_owned(),
                Some((
                    "confidential-system".to_owned(),
                    "confidential-webhook".to_owned()
                ))
            ))
        );
        assert_eq!(
            gate_target(&config(
                serde_json::json!({ "url": "https://10.0.0.5:8443/validate" })
            )),
            Some(("https://10.0.0.5:8443/validate".to_owned(), None))
        );
        assert_eq!(gate_target(&config(serde_json::json!({}))), None);
        let empty: ValidatingWebhookConfiguration =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": "x" } }))
                .expect("configuration");
        assert_eq!(gate_target(&empty), None);
    }
}
