//! `confidential-bootstrapper`: runs on each node at boot.
//!
//! In order: validate the launch configuration ([`args`]), check the state
//! disk can be set up ([`disk`]), open the evidence source ([`evidence`]),
//! join through the pinned gate over aTLS ([`join`]), extend a PCR with the
//! cluster ID, unlock the state disk (LUKS2 via `cryptsetup`) or write its
//! key ([`secret_files`]), start the kubelet ([`kubelet`]: `kubeadm join`, or
//! a bootstrap kubeconfig for a kubelet started by someone else, as the test
//! environment's simulated nodes do), then optionally serve `/v1/attest`
//! ([`attest_server`]).
//!
//! Every check that can fail without the gate's answer runs before the node
//! contacts the gate, so a bad flag or a broken disk changes nothing.
//!
//! Exit status: 0 joined; 1 refused or failed after all attempts; 2 bad
//! flags. Errors name what failed and what to do next.

mod args;
mod attest_server;
mod disk;
mod evidence;
mod join;
mod kubelet;
mod secret_files;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::args::{Args, Config, DiskTarget, KubeletStart};
use crate::disk::Cryptsetup;
use crate::evidence::EvidenceSource;

/// A file the node will write must have an existing parent directory;
/// checked before joining so a typo costs no join token.
fn check_parent(flag: &str, path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

async fn run(config: Config) -> Result<()> {
    // Preflight: everything that can fail before the join.
    let cryptsetup = Cryptsetup::default();
    let probe = match &config.disk {
        DiskTarget::Luks(device) => Some(cryptsetup.probe(device)?),
        DiskTarget::KeyFile(path) => {
            check_parent("--disk-key-file", path)?;
            None
        }
        DiskTarget::None => None,
    };
    if let KubeletStart::BootstrapKubeconfig(path) = &config.kubelet {
        check_parent("--kubelet-bootstrap-kubeconfig", path)?;
    }

    let source = Arc::new(EvidenceSource::open(&config.evidence).await?);
    let joined = join::join(&config, &source).await?;
    tracing::info!(node = %joined.node_name, cluster_id = %hex::encode(joined.cluster_id), "joined");

    source.record_cluster_id(joined.cluster_id).await?;

    match (&config.disk, probe) {
        (DiskTarget::Luks(device), Some(probe)) => cryptsetup
            .apply(device, probe, &joined.disk_key)
            .context("setting up the state disk")?,
        (DiskTarget::KeyFile(path), _) => secret_files::write_secret(path, &joined.disk_key)?,
        _ => tracing::info!("no state device: disk key not used"),
    }

    match (&joined.kubelet, &config.kubelet) {
        (None, _) => tracing::info!("rejoined: the kubelet keeps its credentials"),
        (Some(bootstrap), KubeletStart::BootstrapKubeconfig(path)) => {
            kubelet::write_bootstrap_kubeconfig(path, bootstrap)?;
        }
        (Some(bootstrap), KubeletStart::Kubeadm) => {
            kubelet::Kubeadm::default().join(bootstrap, &config.node_name)?;
        }
    }
    println!(
        "{}",
        serde_json::json!({ "joined": joined.node_name, "clusterId": hex::encode(joined.cluster_id) })
    );
    if let Some(listen) = config.attest_listen {
        attest_server::serve(listen, source, config.node_name.clone()).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    confidential_startup::init("info", confidential_startup::LogFormat::Text);
    let config = match args.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "bootstrap failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
