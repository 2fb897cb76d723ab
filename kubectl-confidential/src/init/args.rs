//! `init`'s flags and the parsing of the ones that carry structure
//! (`--join-exposure`), kept apart from the installer so the decisions
//! never parse strings.

use std::path::PathBuf;
use std::time::Duration;

use crate::output::Format;

/// Default path of the local master-secret file (mode 0600).
pub const MASTER_SECRET_FILE: &str = "confidential-master-secret.json";
/// Default path of the local cluster file `verify` reads.
pub const CLUSTER_FILE: &str = "confidential-cluster.json";

/// How machines that have not joined reach the gate's join endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinExposure {
    /// A NodePort Service: every node's port (30443).
    NodePort,
    /// A LoadBalancer Service: the cloud's load balancer address.
    LoadBalancer,
    /// The gate listens on the control-plane nodes' own addresses.
    HostNetwork,
    /// Your own proxy or address in front of the join endpoint (`HOST:PORT`).
    External(String),
}

/// Parses `nodeport|loadbalancer|hostnetwork|external=HOST:PORT`.
pub fn parse_join_exposure(text: &str) -> Result<JoinExposure, String> {
    match text {
        "nodeport" => Ok(JoinExposure::NodePort),
        "loadbalancer" => Ok(JoinExposure::LoadBalancer),
        "hostnetwork" => Ok(JoinExposure::HostNetwork),
        other => match other.strip_prefix("external=") {
            Some(address) => {
                let valid = address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if valid {
                    Ok(JoinExposure::External(address.to_owned()))
                } else {
                    Err(format!(
                        "external={address}: give the join endpoint as HOST:PORT, e.g. external=gate.example.com:443"
                    ))
                }
            }
            None => Err(format!(
                "{other:?} is not a join exposure; use nodeport, loadbalancer, hostnetwork or external=HOST:PORT"
            )),
        },
    }
}

/// Initialise a cluster: generate the master secret, install CRDs, RBAC,
/// the gate, the node operator, the webhook configuration, the initial
/// AttestationPolicy and the NodeVersion pool.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// Signed measurement file of a node image the cluster trusts
    /// (canonical, as `measurements fetch` saves it; signature in FILE.sig).
    /// Repeat for several images; the first is the pool's image unless
    /// --image says otherwise.
    #[arg(long = "measurements", value_name = "FILE", required = true)]
    pub measurements: Vec<PathBuf>,
    /// The publisher's public key (PEM) the measurement files must verify with.
    #[arg(long, value_name = "FILE")]
    pub publisher_key: PathBuf,
    /// Name of the publisher in the AttestationPolicy.
    #[arg(long, default_value = "default")]
    pub publisher: String,
    /// PEM certificates of the TPM EK CAs the cluster trusts (repeatable).
    #[arg(long = "ek-ca", value_name = "FILE", required = true)]
    pub ek_ca: Vec<PathBuf>,
    /// The master secret and salt to install (`{"secret": hex, "salt": hex}`);
    /// without it a new one is generated and written to --master-secret-out.
    #[arg(long, value_name = "FILE")]
    pub master_secret: Option<PathBuf>,
    /// Where a generated master secret is written (mode 0600; never overwritten).
    #[arg(long, value_name = "FILE", default_value = MASTER_SECRET_FILE)]
    pub master_secret_out: PathBuf,
    /// Where the cluster file for `verify` is written (cluster ID, gate endpoint, gate pin).
    #[arg(long, value_name = "FILE", default_value = CLUSTER_FILE)]
    pub cluster_file: PathBuf,
    /// Name of the AttestationPolicy the gate enforces.
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// Name of the node pool (NodeVersion).
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// The pool's node image (default: the image of the first measurement file).
    #[arg(long)]
    pub image: Option<String>,
    /// The pool's Kubernetes version (default: the API server's).
    #[arg(long)]
    pub kubernetes_version: Option<String>,
    /// Nodes in the pool.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=10_000))]
    pub replicas: i32,
    /// maxSurge of the pool's rollouts (nodes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub max_surge: i32,
    /// How often the gate re-attests every node.
    #[arg(long, default_value = "1h")]
    pub reattestation_interval: String,
    /// How machines that have not joined reach the join endpoint:
    /// nodeport, loadbalancer, hostnetwork or external=HOST:PORT.
    #[arg(long, default_value = "nodeport", value_parser = parse_join_exposure)]
    pub join_exposure: JoinExposure,
    /// API server URL handed to joining nodes (default: this kubeconfig's server).
    #[arg(long, value_name = "URL")]
    pub node_api_server: Option<String>,
    /// Run the gate and the operator in the nodes' own network
    /// (hostNetwork) and have them reach the API server at
    /// --node-api-server directly, not through the `kubernetes` Service: for
    /// nodes without a Service proxy or a pod network reaching the control
    /// plane (the VM node image of this repository). The gate listens on the
    /// nodes' addresses (admission 8443, join 9443; the API server calls it
    /// at its Service's endpoints), the operator on 8080.
    #[arg(long)]
    pub host_network: bool,
    /// The images to install instead of the digests in
    /// manifests/kustomization.yaml: the `images.json` that
    /// `cargo xtask images` writes (`{"images": [{"name": REPO, "digest": "sha256:..."}]}`).
    #[arg(long, value_name = "FILE")]
    pub images: Option<PathBuf>,
    /// Out-of-cluster mode: the gate and the operator run as processes
    /// outside the cluster (no Deployments or Services are installed) and
    /// the API server calls the gate at this URL (https://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub gate_url: Option<String>,
    /// Issue a new serving certificate of the gate from a new CA and update
    /// every caBundle (the gate reloads it without restarting).
    #[arg(long)]
    pub rotate_serving_cert: bool,
    /// Print the objects that would be applied; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output of --dry-run.
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    pub output: Format,
    /// How long to wait for the gate to answer.
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    confidential_api::duration::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 30s, 5m or 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_exposures_parse_and_bad_ones_say_what_to_use() {
        assert_eq!(parse_join_exposure("nodeport"), Ok(JoinExposure::NodePort));
        assert_eq!(
            parse_join_exposure("loadbalancer"),
            Ok(JoinExposure::LoadBalancer)
        );
        assert_eq!(
            parse_join_exposure("hostnetwork"),
            Ok(JoinExposure::HostNetwork)
        );
        assert_eq!(
            parse_join_exposure("external=gate.example.com:443"),
            Ok(JoinExposure::External("gate.example.com:443".to_owned()))
        );
        for bad in [
            "external=",
            "external=gate",
            "external=:443",
            "external=h:99999",
            "NodePort",
            "",
        ] {
            let err = parse_join_exposure(bad).expect_err(bad);
            assert!(
                err.contains("HOST:PORT") || err.contains("nodeport"),
                "{bad}: {err}"
            );
        }
    }
}
