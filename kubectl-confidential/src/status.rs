//! `kubectl confidential status`: node pools, attestations and pending
//! machines at a glance, or as JSON/YAML for scripts and auditors.

use anyhow::Result;
use confidential_api::{NodeAttestation, NodeVersion, PendingNode};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::connection::Cluster;
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
    node_versions: Vec<NodeVersion>,
    node_attestations: Vec<NodeAttestation>,
    pending_nodes: Vec<PendingNode>,
}

pub async fn run(cluster: &Cluster, args: &StatusArgs) -> Result<()> {
    let lp = ListParams::default();
    let client = &cluster.client;
    let mut status = Status {
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
