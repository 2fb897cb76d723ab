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
//! When no gate can be reached after `--max-attempts` rounds and
//! `--recovery-listen` is set, a node that joined before (its cluster ID kept
//! in `--cluster-id-state`) extends its PCR with that cluster ID and serves
//! the recovery endpoint ([`recovery`]) until the admin's `kubectl
//! confidential recover` verified it and sent its keys; it then unlocks its
//! state disk with the same disk step and continues as a rejoined node.
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
mod recovery;
mod secret_files;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::args::{Args, Config, DiskTarget, KubeletStart};
use crate::disk::{Cryptsetup, LuksProbe};
use crate::evidence::EvidenceSource;
use crate::join::{GateUnreachable, KubeletBootstrap};

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

/// The disk step, after a join or a recovery: what the node does with its
/// state disk key. Returns what was unlocked.
fn unlock_state(
    disk: &DiskTarget,
    cryptsetup: &Cryptsetup,
    probe: Option<LuksProbe>,
    key: &[u8; 32],
) -> Result<String> {
    match (disk, probe) {
        (DiskTarget::Luks { device, mount }, Some(probe)) => {
            cryptsetup
                .apply(device, probe, key)
                .context("setting up the state disk")?;
            if let Some(mount) = mount {
                disk::StateFilesystem::default()
                    .mount(probe, mount)
                    .context("mounting the state disk")?;
            }
            Ok(format!("LUKS2 state disk {}", device.display()))
        }
        (DiskTarget::KeyFile(path), _) => {
            secret_files::write_secret(path, key)?;
            Ok(format!("disk key file {}", path.display()))
        }
        _ => {
            tracing::info!("no state device: disk key not used");
            Ok("no state disk".to_owned())
        }
    }
}

/// The cluster ID this node joined, kept across reboots.
fn read_cluster_id_state(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading --cluster-id-state {}: without it this node cannot show which cluster it belongs to (did it ever join?)",
            path.display()
        )
    })?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!(
                "--cluster-id-state {} does not hold 64 hex digits",
                path.display()
            )
        })
}

/// How the node got its keys.
enum Outcome {
    Joined {
        cluster_id: [u8; 32],
        kubelet: Option<KubeletBootstrap>,
    },
    Recovered {
        cluster_id: [u8; 32],
    },
}

async fn run(config: Config) -> Result<()> {
    // Preflight: everything that can fail before the join.
    let cryptsetup = Cryptsetup::default();
    let probe = match &config.disk {
        DiskTarget::Luks { device, mount } => {
            if let Some(mount) = mount
                && !mount.is_dir()
            {
                bail!(
                    "--state-mount {}: no such directory (nothing was formatted)",
                    mount.display()
                );
            }
            Some(cryptsetup.probe(device)?)
        }
        DiskTarget::KeyFile(path) => {
            check_parent("--disk-key-file", path)?;
            None
        }
        DiskTarget::None => None,
    };
    if let KubeletStart::BootstrapKubeconfig(path) = &config.kubelet {
        check_parent("--kubelet-bootstrap-kubeconfig", path)?;
    }
    if let Some(path) = &config.joined_file {
        check_parent("--joined-file", path)?;
    }
    if config.recovery_listen.is_some() {
        check_parent("--cluster-id-state", &config.cluster_id_state)?;
    }

    let source = Arc::new(EvidenceSource::open(&config.evidence).await?);
    let outcome = match join::join(&config, &source).await {
        Ok(joined) => {
            tracing::info!(node = %joined.node_name, cluster_id = %hex::encode(joined.cluster_id), "joined");
            source.record_cluster_id(joined.cluster_id).await?;
            let kept = secret_files::write_secret(
                &config.cluster_id_state,
                hex::encode(joined.cluster_id).as_bytes(),
            )
            .context("keeping the cluster ID for recovery");
            match kept {
                Err(e) if config.recovery_listen.is_some() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "this node will not be able to recover")
                }
                Ok(()) => {}
            }
            unlock_state(&config.disk, &cryptsetup, probe, &joined.disk_key)?;
            Outcome::Joined {
                cluster_id: joined.cluster_id,
                kubelet: joined.kubelet,
            }
        }
        Err(unreachable) if unreachable.downcast_ref::<GateUnreachable>().is_some() => {
            let Some(listen) = config.recovery_listen else {
                return Err(unreachable);
            };
            let cluster_id = read_cluster_id_state(&config.cluster_id_state)
                .with_context(|| format!("{unreachable:#}; cannot serve recovery"))?;
            source.record_cluster_id(cluster_id).await?;
            let disk = config.disk.clone();
            let unlock = move |key: &[u8; 32]| unlock_state(&disk, &cryptsetup, probe, key);
            let done = recovery::serve(
                listen,
                recovery::Recovery {
                    node_name: config.node_name.clone(),
                    disk_uuid: config.disk_uuid.clone(),
                    cluster_id,
                    source: source.clone(),
                    unlock: Arc::new(unlock),
                },
            )
            .await?;
            tracing::info!(node = %done.node_name, unlocked = %done.unlocked, "recovered");
            Outcome::Recovered { cluster_id }
        }
        Err(e) => return Err(e),
    };

    let (cluster_id, kubelet, verb) = match outcome {
        Outcome::Joined {
            cluster_id,
            kubelet,
        } => (cluster_id, kubelet, "joined"),
        Outcome::Recovered { cluster_id } => (cluster_id, None, "recovered"),
    };
    match (&kubelet, &config.kubelet) {
        (None, _) => tracing::info!("rejoined: the kubelet keeps its credentials"),
        (Some(bootstrap), KubeletStart::BootstrapKubeconfig(path)) => {
            kubelet::write_bootstrap_kubeconfig(path, bootstrap)?;
        }
        (Some(bootstrap), KubeletStart::Kubeadm) => {
            kubelet::Kubeadm::default().join(bootstrap, &config.node_name)?;
        }
    }
    let result =
        serde_json::json!({ verb: config.node_name, "clusterId": hex::encode(cluster_id) });
    println!("{result}");
    if let Some(path) = &config.joined_file {
        std::fs::write(path, format!("{result}\n"))
            .with_context(|| format!("writing --joined-file {}", path.display()))?;
    }
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
