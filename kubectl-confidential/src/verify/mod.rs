//! `kubectl confidential verify`: the admin checks nodes from outside.
//!
//! For each node the plugin opens its own aTLS connection to the node's
//! attestation endpoint (`/v1/attest`, served by the bootstrapper), and the
//! node answers with a TPM quote bound to that connection's exporter. The
//! quote is judged ([`check::check_node`]) against local trusted input only
//! ([`trust`]): publisher-signed measurement files verified here with the
//! publisher key, the cluster ID from the local cluster file, the EK CA.
//! The cluster is asked only which nodes exist, where they listen and which
//! AK the gate activated for each; it is never asked what to expect.

pub(crate) mod check;
pub(crate) mod render;
pub mod trust;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::NodeAttestation;
use confidential_api::endpoint::Endpoint;
use confidential_attestation::atls::{self, AtlsClient, PURPOSE_NODE_ATTEST};
use confidential_attestation::protocol::{AttestResponse, PATH_ATTEST};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

use crate::connection::{Cluster, ConnectionArgs};
use crate::output::{Format, print_structured};
use check::{NodeAnswer, NodeReport, Verdict, check_node};
use trust::{ClusterFile, Trust, TrustArgs, parse_hex32};

/// Annotation on a Node naming its attestation endpoint (`host:port`) when
/// it is not `<InternalIP>:<--attest-port>`.
pub const ANNOTATION_ATTEST_ENDPOINT: &str = "confidential.dev/attest-endpoint";
/// Default port of a node's attestation endpoint.
pub const DEFAULT_ATTEST_PORT: u16 = 9444;

const PROVES: &str = "\
What a passing verify proves: each node answered on a fresh TLS connection \
opened by this command with a TPM quote bound to that connection (a relayed or \
replayed quote fails); the quoted PCRs equal a publisher-signed measurement \
file you trust (signature checked here with --publisher-key); the cluster-ID \
PCR holds the cluster ID from your local cluster file; the EK certificate \
chains to --ek-ca. The endpoint cannot run credential activation, so the AK's \
link to that certified TPM is the one the gate proved at join: verify requires \
the AK to equal the gate's record (NodeAttestation). Nothing expected is read \
from the cluster.";

#[derive(clap::Args, Debug)]
#[command(after_long_help = PROVES)]
#[command(group(clap::ArgGroup::new("node_selection").required(true).args(["node", "all_nodes"])))]
#[command(group(clap::ArgGroup::new("cluster_identity").required(true).args(["cluster_file", "cluster_id"])))]
pub struct VerifyArgs {
    #[command(flatten)]
    trust: TrustArgs,
    /// Node to verify (repeatable).
    #[arg(long)]
    node: Vec<String>,
    /// Verify every Node of the cluster, in parallel.
    #[arg(long)]
    all_nodes: bool,
    /// The local cluster file written by `init`:
    /// {"clusterId": "<hex>", "gateEndpoint": "host:port", "gatePin": "<hex>"}.
    #[arg(long, value_name = "FILE")]
    cluster_file: Option<PathBuf>,
    /// The cluster ID (64 hex digits) instead of --cluster-file.
    #[arg(long, value_name = "HEX")]
    cluster_id: Option<String>,
    /// Port of the nodes' attestation endpoint (unless the node announced
    /// its endpoint at join or carries the confidential.dev/attest-endpoint
    /// annotation).
    #[arg(long, default_value_t = DEFAULT_ATTEST_PORT)]
    attest_port: u16,
    /// Seconds to wait for one node's answer.
    #[arg(long, default_value_t = 30)]
    node_timeout: u64,
    /// Nodes verified at the same time with --all-nodes.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Format,
}

/// The local trust inputs, read and checked before anything is contacted.
fn load_trust(args: &VerifyArgs) -> Result<Trust> {
    let cluster_id = match (&args.cluster_file, &args.cluster_id) {
        (Some(path), _) => {
            let file = ClusterFile::read(path)?;
            parse_hex32("clusterId", &file.cluster_id)?
        }
        (None, Some(hex_id)) => parse_hex32("--cluster-id", hex_id)?,
        (None, None) => bail!("pass --cluster-file or --cluster-id"),
    };
    args.trust.load(cluster_id)
}

/// Where a Node's attestation endpoint listens: the endpoint the node
/// announced at join (recorded by the gate in its NodeAttestation, read as
/// the gate's re-attestation reads it: a value that is not one canonical
/// `host:port` is not dialled), else the Node's
/// `confidential.dev/attest-endpoint` annotation, else its InternalIP (or
/// ExternalIP) and `port`. Only where to ask: the answer must still quote
/// with the AK the gate recorded.
fn endpoint_of(node: &Node, record: Option<&NodeAttestation>, port: u16) -> Result<String, String> {
    if let Some(recorded) = record.and_then(Endpoint::recorded) {
        return recorded
            .map(|e| e.to_string())
            .map_err(|e| format!("the recorded attestation endpoint {e}"));
    }
    if let Some(endpoint) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ATTEST_ENDPOINT))
    {
        return Ok(endpoint.clone());
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    ["InternalIP", "ExternalIP"]
        .iter()
        .find_map(|kind| {
            addresses
                .iter()
                .filter(|a| a.type_ == *kind)
                .find_map(|a| a.address.parse::<IpAddr>().ok())
        })
        .map(|ip| Endpoint::from_ip(ip, port).to_string())
        .ok_or_else(|| {
            "the Node has no InternalIP address and no \
             confidential.dev/attest-endpoint annotation"
                .to_owned()
        })
}

/// Asks one node for evidence on a connection of our own.
async fn attest(endpoint: &str, timeout: Duration) -> Result<(AttestResponse, [u8; 32]), String> {
    let exchange = async {
        let config = atls::client_config(None).map_err(|e| e.to_string())?;
        let mut client = AtlsClient::connect(endpoint, config)
            .await
            .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let (status, body) = client
            .post(PATH_ATTEST, Vec::new())
            .await
            .map_err(|e| format!("{PATH_ATTEST} on {endpoint}: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{endpoint} answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let response: AttestResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("{endpoint} answered something that is not evidence: {e}"))?;
        Ok((response, client.nonce(PURPOSE_NODE_ATTEST)))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{endpoint} did not answer within {timeout:?}")))
}

pub async fn run(connection: &ConnectionArgs, args: &VerifyArgs) -> Result<()> {
    let trust = Arc::new(load_trust(args)?);
    let cluster = connection.client().await?;
    let targets = targets(&cluster, args).await?;
    let total = targets.len();
    let timeout = Duration::from_secs(args.node_timeout);
    let mut done = 0usize;
    let mut reports: Vec<NodeReport> = futures::stream::iter(targets)
        .map(|(node, endpoint, recorded_ak)| {
            let trust = trust.clone();
            async move {
                let answer = match &endpoint {
                    Ok(endpoint) => attest(endpoint, timeout).await,
                    Err(why) => Err(why.clone()),
                };
                let answer = NodeAnswer {
                    node,
                    endpoint: endpoint.unwrap_or_default(),
                    answer,
                    recorded_ak,
                };
                check_node(&answer, &trust)
            }
        })
        .buffer_unordered(usize::from(args.parallel))
        .inspect(|report| {
            done += 1;
            eprintln!(
                "[{done}/{total}] {}: {}",
                report.node,
                render::verdict_word(report.verdict)
            );
        })
        .collect()
        .await;
    reports.sort_by(|a, b| a.node.cmp(&b.node));
    if !print_structured(args.output, &reports)? {
        render::print_reports(&reports);
    }
    let failed = reports
        .iter()
        .filter(|r| r.verdict != Verdict::Trusted)
        .count();
    if failed > 0 {
        bail!("{failed} of {total} nodes failed verification");
    }
    Ok(())
}

/// The nodes to verify: name, endpoint, the AK the gate recorded.
async fn targets(
    cluster: &Cluster,
    args: &VerifyArgs,
) -> Result<Vec<(String, Result<String, String>, Option<String>)>> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let selected: Vec<Node> = if args.all_nodes {
        nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| cluster.explain("listing Nodes", e))?
            .items
    } else {
        let mut selected = Vec::new();
        for name in &args.node {
            let node = nodes
                .get_opt(name)
                .await
                .map_err(|e| cluster.explain(&format!("reading Node {name}"), e))?
                .with_context(|| {
                    format!("Node {name:?} not found; list nodes with `kubectl get nodes`")
                })?;
            selected.push(node);
        }
        selected
    };
    if selected.is_empty() {
        bail!("the cluster has no Nodes to verify");
    }
    let records = Api::<NodeAttestation>::all(cluster.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| cluster.explain("listing NodeAttestations", e))?
        .items;
    Ok(selected
        .iter()
        .map(|node| {
            let name = node.metadata.name.clone().unwrap_or_default();
            let record = records.iter().find(|r| r.spec.node_name == name);
            let endpoint = endpoint_of(node, record, args.attest_port);
            (
                name,
                endpoint,
                record.map(|r| r.spec.ak_fingerprint.clone()),
            )
        })
        .collect())
}
