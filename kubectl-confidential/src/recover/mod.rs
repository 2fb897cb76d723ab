//! `kubectl confidential recover`: bring back a node whose gate is gone.
//!
//! When the control plane restarted and no gate answers, a rebooted node
//! serves a recovery endpoint over aTLS (`confidential-bootstrapper
//! --recovery-listen`). This command opens its own connection to it, asks for
//! evidence bound to that connection, and judges it exactly as `verify` does
//! ([`crate::verify::check::check_evidence`]) against local trusted input
//! only: publisher-signed measurement files, the EK CA, and the cluster ID
//! derived from the master secret file (cross-checked with the cluster file
//! when given). Only a node that passes gets a credential challenge, and only
//! when its TPM activated it (the AK lives in the certified TPM) does the
//! node get its keys: the disk key the gate derives at join (one derivation,
//! [`confidential_attestation::kdf::MasterSecret::node_disk_key`]) and the
//! cluster ID. Before the verdict the node
//! receives one empty request and nothing else.
//!
//! Several `--endpoint`s are recovered side by side (a whole cluster after a
//! control-plane loss); each node is judged on its own connection and a
//! failing node never holds back or changes what another receives.

mod decide;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_attestation::atls::{self, AtlsClient, PURPOSE_NODE_RECOVER};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::protocol::{
    ActivateRequest, JoinChallenge, PATH_RECOVER, PATH_RECOVER_ACTIVATE, PATH_RECOVER_KEYS,
    RecoveryDone, RecoveryOffer, Refused,
};
use confidential_attestation::verify::{Binding, BoundVerdict, Verdict as EvidenceVerdict};
use serde::Serialize;

use crate::output::{Format, print_structured};
use crate::verify::check::NodeReport;
use crate::verify::render;
use crate::verify::trust::{ClusterFile, Trust, TrustArgs, parse_hex32};

const PROVES: &str = "\
Before anything secret is sent, the node must answer on a TLS connection opened \
by this command with a TPM quote bound to that connection (a relayed or replayed \
quote fails), whose PCRs equal a publisher-signed measurement file you trust \
(signature checked here with --publisher-key), whose cluster-ID PCR holds the \
cluster ID of your master secret, whose EK certificate chains to --ek-ca, and \
whose TPM then activates a credential challenge for that AK (the AK lives in the \
certified TPM). Only then are the keys sent. Nothing expected is read from the \
node or the cluster.";

#[derive(clap::Args, Debug)]
#[command(after_long_help = PROVES)]
pub struct RecoverArgs {
    #[command(flatten)]
    trust: TrustArgs,
    /// A node's recovery endpoint (`host:port`), served by its
    /// bootstrapper with --recovery-listen when it cannot reach the gate.
    /// Repeat for several nodes: they are recovered in parallel.
    #[arg(long = "endpoint", value_name = "HOST:PORT", required = true)]
    endpoints: Vec<String>,
    /// The node name to expect (the node's own claim when absent); only
    /// with a single --endpoint.
    #[arg(long)]
    node: Option<String>,
    /// The cluster's master secret file (`{"secret": "<hex>", "salt": "<hex>"}`,
    /// what `init` wrote): the keys are derived from it.
    #[arg(long, value_name = "FILE")]
    master_secret: PathBuf,
    /// The cluster file `init` wrote; when given, its clusterId must be the
    /// one the master secret derives.
    #[arg(long, value_name = "FILE")]
    cluster_file: Option<PathBuf>,
    /// Seconds the whole exchange with the node may take.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Format,
}

/// The outcome, as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RecoveryReport {
    endpoint: String,
    recovered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_uuid: Option<String>,
    /// The evidence checks, as `verify` reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<NodeReport>,
    /// `passed`, `failed`, or absent when not reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    activation: Option<&'static str>,
    /// What the node unlocked with the keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    unlocked: Option<String>,
    /// Whether the keys were sent to the node.
    keys_sent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The master secret, the trusted files and the cluster ID, read and
/// checked before the node is contacted.
fn load(args: &RecoverArgs) -> Result<(MasterSecret, Trust)> {
    let text = std::fs::read(&args.master_secret).with_context(|| {
        format!(
            "reading the master secret file {}",
            args.master_secret.display()
        )
    })?;
    let master = MasterSecret::from_file_json(&text).with_context(|| {
        format!(
            "{} is not the cluster's master secret file",
            args.master_secret.display()
        )
    })?;
    let cluster_id = master.cluster_id();
    if let Some(path) = &args.cluster_file {
        let file = ClusterFile::read(path)?;
        let recorded = parse_hex32(
            &format!("clusterId in {}", path.display()),
            &file.cluster_id,
        )?;
        if recorded != cluster_id {
            bail!(
                "the master secret {} derives cluster ID {}, but {} is for cluster {}: they belong to different clusters; nothing was contacted",
                args.master_secret.display(),
                hex::encode(cluster_id),
                path.display(),
                file.cluster_id
            );
        }
    }
    let trust = args.trust.load(cluster_id)?;
    Ok((master, trust))
}

/// A node's answer that is not the expected JSON: its refusal, or the raw text.
fn node_error(path: &str, status: http::StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<Refused>(body) {
        Ok(r) => anyhow::anyhow!("the node refused {path} ({}): {}", r.reason, r.message),
        Err(_) => anyhow::anyhow!(
            "the node answered {path} with {status}: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(512)
                .collect::<String>()
        ),
    }
}

async fn post_json<T: serde::de::DeserializeOwned>(
    client: &mut AtlsClient,
    path: &str,
    body: Vec<u8>,
) -> Result<T> {
    let (status, answer) = client
        .post_limited(path, body, 1 << 20)
        .await
        .with_context(|| format!("POST {path} to the node"))?;
    if !status.is_success() {
        return Err(node_error(path, status, &answer));
    }
    serde_json::from_slice(&answer)
        .with_context(|| format!("the node's answer to {path} is not what the protocol says"))
}

fn progress(endpoint: &str, step: &str) {
    eprintln!("recover {endpoint}: {step}");
}

/// The exchange with the node at `endpoint`; fills `report` as it goes.
async fn exchange(
    args: &RecoverArgs,
    endpoint: &str,
    master: &MasterSecret,
    trust: &Trust,
    report: &mut RecoveryReport,
) -> Result<()> {
    progress(endpoint, "connecting over aTLS");
    let mut client = AtlsClient::connect(endpoint, atls::client_config(None)?)
        .await
        .with_context(|| {
            format!("connecting to {endpoint}: is the node serving recovery (--recovery-listen)?")
        })?;
    let offer: RecoveryOffer = post_json(&mut client, PATH_RECOVER, Vec::new()).await?;
    progress(
        endpoint,
        &format!(
            "node {} offered {} evidence for disk {}; verifying against local trusted input",
            offer.attestation.node_name,
            offer.attestation.evidence.evidence.kind().name(),
            offer.disk_uuid
        ),
    );
    report.disk_uuid = Some(offer.disk_uuid.clone());
    let judged = decide::judge_offer(
        endpoint,
        &offer,
        client.nonce(PURPOSE_NODE_RECOVER),
        trust,
        args.node.as_deref(),
    );
    let (verification, quote) = match judged {
        Ok(ok) => ok,
        Err(refused) => {
            let problems = refused.problems.join("; ");
            report.verification = Some(*refused);
            bail!("the node is not trusted: {problems}; nothing was sent to it");
        }
    };
    let warnings = verification.warnings.clone();
    report.verification = Some(verification);
    progress(
        endpoint,
        "evidence trusted; challenging the attestation key (credential activation)",
    );
    let bound = match EvidenceVerdict::from_tpm_quote(quote, warnings).bind()? {
        Binding::Bound(bound) => bound,
        Binding::NeedsActivation(pending) => {
            let challenge = serde_json::to_vec(&JoinChallenge {
                challenge: pending.challenge().clone(),
            })?;
            let answer: ActivateRequest =
                post_json(&mut client, PATH_RECOVER_ACTIVATE, challenge).await?;
            match pending.activate(&answer.credential) {
                Ok(bound) => bound,
                Err(e) => {
                    report.activation = Some("failed");
                    bail!("{e}; no keys were sent to the node");
                }
            }
        }
    };
    report.activation = Some("passed");
    send_keys(
        endpoint,
        &mut client,
        master,
        &bound,
        &offer.disk_uuid,
        report,
    )
    .await
}

async fn send_keys(
    endpoint: &str,
    client: &mut AtlsClient,
    master: &MasterSecret,
    bound: &BoundVerdict,
    disk_uuid: &str,
    report: &mut RecoveryReport,
) -> Result<()> {
    progress(
        endpoint,
        "attestation key activated; sending the node its keys",
    );
    let keys = serde_json::to_vec(&decide::keys_for(master, bound, disk_uuid))?;
    report.keys_sent = true;
    let done: RecoveryDone = post_json(client, PATH_RECOVER_KEYS, keys).await?;
    progress(
        endpoint,
        &format!("node {} unlocked {}", done.node_name, done.unlocked),
    );
    report.unlocked = Some(done.unlocked);
    report.recovered = true;
    Ok(())
}

fn print_table(report: &RecoveryReport) {
    if let Some(verification) = &report.verification {
        render::print_report(verification);
    }
    if let Some(activation) = report.activation {
        println!("  credential activation: {activation}");
    }
    match (&report.unlocked, &report.error) {
        (Some(unlocked), _) => println!("RECOVERED: the node unlocked {unlocked}"),
        (None, Some(error)) => println!(
            "NOT RECOVERED ({}): {error}",
            if report.keys_sent {
                "keys were sent"
            } else {
                "nothing secret was sent"
            }
        ),
        (None, None) => println!("NOT RECOVERED"),
    }
}

/// Recovers the node at `endpoint` within the timeout; the report says how
/// far it got.
async fn recover_one(
    args: &RecoverArgs,
    endpoint: &str,
    master: &MasterSecret,
    trust: &Trust,
) -> RecoveryReport {
    let mut report = RecoveryReport {
        endpoint: endpoint.to_owned(),
        recovered: false,
        disk_uuid: None,
        verification: None,
        activation: None,
        unlocked: None,
        keys_sent: false,
        error: None,
    };
    let timeout = Duration::from_secs(args.timeout);
    let result = tokio::time::timeout(
        timeout,
        exchange(args, endpoint, master, trust, &mut report),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "{endpoint} did not complete recovery within {timeout:?}"
        ))
    });
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    report
}

/// Several nodes' reports, as `-o json|yaml` prints them.
#[derive(Debug, Serialize)]
struct RecoveryReports<'a> {
    items: &'a [RecoveryReport],
}

pub async fn run(args: &RecoverArgs) -> Result<()> {
    if args.node.is_some() && args.endpoints.len() != 1 {
        bail!(
            "--node names the one node to expect: give a single --endpoint with it, \
             or leave --node out to recover several nodes"
        );
    }
    let (master, trust) = load(args)?;
    let reports = futures::future::join_all(
        args.endpoints
            .iter()
            .map(|endpoint| recover_one(args, endpoint, &master, &trust)),
    )
    .await;
    let printed = match reports.as_slice() {
        [one] => print_structured(args.output, one)?,
        many => print_structured(args.output, &RecoveryReports { items: many })?,
    };
    if !printed {
        for report in &reports {
            if reports.len() > 1 {
                println!("{}:", report.endpoint);
            }
            print_table(report);
        }
    }
    let failed: Vec<String> = reports
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.endpoint)))
        .collect();
    match (failed.as_slice(), reports.len()) {
        ([], _) => Ok(()),
        ([one], 1) => Err(anyhow::anyhow!("recovering the node at {one}")),
        (failed, total) => bail!(
            "recovered {} of {total} nodes; not recovered: {}",
            total - failed.len(),
            failed.join("; ")
        ),
    }
}
