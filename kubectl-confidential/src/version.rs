//! `kubectl confidential version`: like `kubectl version`, the client's
//! version always, and what the cluster runs when it can be reached: the
//! Kubernetes API server, the gate and the node operator (their Deployments'
//! images and ready replicas) and the served versions of our CRDs.
//!
//! With an unreachable cluster it prints the client version and fails with
//! the connection error, as kubectl does; `--client` skips the cluster.

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::connection::{Cluster, ConnectionArgs};
use crate::output::{Format, print_structured};

/// Deployment name of the gate in the components' namespace.
pub const GATE_DEPLOYMENT: &str = "confidential-webhook";
/// Deployment name of the node operator.
pub const OPERATOR_DEPLOYMENT: &str = "confidential-controllers";
/// API group of our CRDs.
const GROUP: &str = "confidential.dev";

#[derive(clap::Args, Debug)]
pub struct VersionArgs {
    /// Only the plugin's own version; do not contact the cluster.
    #[arg(long)]
    client: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Format,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Versions {
    client_version: ClientVersion,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<ServerVersions>,
    /// Why the cluster part is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_error: Option<String>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ClientVersion {
    version: &'static str,
    rust_target: &'static str,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ServerVersions {
    server: String,
    kubernetes_version: String,
    gate: Component,
    operator: Component,
    crds: Vec<CrdVersion>,
}

#[derive(Serialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct Component {
    installed: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<String>,
    ready_replicas: i32,
    replicas: i32,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct CrdVersion {
    name: String,
    served_versions: Vec<String>,
    storage_version: Option<String>,
}

fn client_version() -> ClientVersion {
    ClientVersion {
        version: env!("CARGO_PKG_VERSION"),
        rust_target: std::env::consts::ARCH,
    }
}

pub async fn run(connection: &ConnectionArgs, namespace: &str, args: &VersionArgs) -> Result<()> {
    let mut versions = Versions {
        client_version: client_version(),
        server: None,
        server_error: None,
    };
    if !args.client {
        match connection.client().await {
            Ok(cluster) => match server_versions(&cluster, namespace).await {
                Ok(server) => versions.server = Some(server),
                Err(e) => versions.server_error = Some(format!("{e:#}")),
            },
            Err(e) => versions.server_error = Some(format!("{e:#}")),
        }
    }
    if !print_structured(args.output, &versions)? {
        print_text(&versions);
    }
    match versions.server_error {
        // As kubectl: the client version is printed, the exit status fails.
        Some(error) => Err(anyhow::anyhow!(error)),
        None => Ok(()),
    }
}

fn print_text(versions: &Versions) {
    println!("Client Version: v{}", versions.client_version.version);
    if let Some(server) = &versions.server {
        println!("Kubernetes Version: {}", server.kubernetes_version);
        for (name, component) in [("Gate", &server.gate), ("Operator", &server.operator)] {
            if component.installed {
                println!(
                    "{name}: {} ({}/{} ready)",
                    component.images.join(", "),
                    component.ready_replicas,
                    component.replicas
                );
            } else {
                println!("{name}: not installed (run `kubectl confidential init`)");
            }
        }
        if server.crds.is_empty() {
            println!("CRDs: not installed (run `kubectl confidential init`)");
        }
        for crd in &server.crds {
            println!(
                "CRD {}: served {}",
                crd.name,
                crd.served_versions.join(", ")
            );
        }
    }
}

async fn server_versions(cluster: &Cluster, namespace: &str) -> Result<ServerVersions> {
    let info = cluster
        .client
        .apiserver_version()
        .await
        .map_err(|e| cluster.explain("reading the server version", e))?;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), namespace);
    let component = |name: &'static str| {
        let deployments = deployments.clone();
        async move {
            let found = deployments.get_opt(name).await.map_err(|e| {
                cluster.explain(&format!("reading Deployment {namespace}/{name}"), e)
            })?;
            anyhow::Ok(found.map(describe).unwrap_or_default())
        }
    };
    let gate = component(GATE_DEPLOYMENT).await?;
    let operator = component(OPERATOR_DEPLOYMENT).await?;
    let crds = Api::<CustomResourceDefinition>::all(cluster.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| cluster.explain("listing CustomResourceDefinitions", e))?
        .items
        .into_iter()
        .filter(|crd| crd.spec.group == GROUP)
        .map(|crd| CrdVersion {
            name: crd.metadata.name.unwrap_or_default(),
            served_versions: crd
                .spec
                .versions
                .iter()
                .filter(|v| v.served)
                .map(|v| v.name.clone())
                .collect(),
            storage_version: crd
                .spec
                .versions
                .iter()
                .find(|v| v.storage)
                .map(|v| v.name.clone()),
        })
        .collect();
    Ok(ServerVersions {
        server: cluster.server.clone(),
        kubernetes_version: info.git_version,
        gate,
        operator,
        crds,
    })
}

fn describe(deployment: Deployment) -> Component {
    let images = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|pod| {
            pod.containers
                .iter()
                .filter_map(|c| c.image.clone())
                .collect()
        })
        .unwrap_or_default();
    let (ready_replicas, replicas) = replica_counts(&deployment);
    Component {
        installed: true,
        images,
        ready_replicas,
        replicas,
    }
}

/// A Deployment's ready and desired replicas (Kubernetes' default of one
/// when `spec.replicas` is not set).
pub(crate) fn replica_counts(deployment: &Deployment) -> (i32, i32) {
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    (ready, desired)
}
