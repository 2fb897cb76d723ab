//! What a machine is doing, from its processes and its serial console, and
//! how that is written on its PendingNode (condition `MachineRunning`).

use confidential_api::PendingNode;
use confidential_api::conditions::{condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// The condition type written on PendingNodes.
pub const MACHINE_RUNNING: &str = "MachineRunning";
/// What the node image's init prints first on the console.
const BOOTED_MARKER: &str = "node-image: init running version=";

/// What a machine is doing, as its processes and console show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// Image, disk and vTPM being prepared, or firmware and kernel starting.
    Booting,
    /// The node OS runs: its init printed this image version.
    Running { version: String },
    /// QEMU exited (`code` is `None` when a signal ended it).
    Exited {
        code: Option<i32>,
        console_tail: String,
    },
    /// The machine could not be started (the reason).
    StartFailed(String),
}

impl MachineState {
    /// The `MachineRunning` condition's status, reason and message.
    pub fn condition_fields(&self) -> (bool, &'static str, String) {
        match self {
            Self::Booting => (
                false,
                "Booting",
                "QEMU runs; firmware and kernel are starting".to_owned(),
            ),
            Self::Running { version } => (
                true,
                "Running",
                format!("the node OS of image version {version} runs"),
            ),
            Self::Exited { code, console_tail } => (
                false,
                "Exited",
                match code {
                    Some(code) => format!("QEMU exited with code {code}; console: {console_tail}"),
                    None => format!("QEMU was ended by a signal; console: {console_tail}"),
                },
            ),
            Self::StartFailed(reason) => (false, "StartFailed", reason.clone()),
        }
    }
}

/// The image version the node OS printed on the console, once it did.
pub fn booted_version(console: &str) -> Option<String> {
    let (_, rest) = console.split_once(BOOTED_MARKER)?;
    let version = rest.split_whitespace().next()?;
    Some(version.to_owned())
}

pub(super) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Sets the `MachineRunning` condition of PendingNode `name` to `state`;
/// writes only on a change, guarded by the resourceVersion read (a
/// concurrent writer wins and the next round retries).
pub(super) async fn report(
    pending: &Api<PendingNode>,
    name: &str,
    state: &MachineState,
) -> Result<(), kube::Error> {
    let Some(current) = pending.get_opt(name).await? else {
        return Ok(());
    };
    let mut conditions = current
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let (status, reason, message) = state.condition_fields();
    let changed = set_condition(
        &mut conditions,
        condition(
            MACHINE_RUNNING,
            status,
            reason,
            message,
            None,
            Time(jiff::Timestamp::now()),
        ),
    );
    if !changed {
        return Ok(());
    }
    let patch = json!({
        "metadata": { "resourceVersion": current.metadata.resource_version },
        "status": { "conditions": conditions },
    });
    pending
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    tracing::info!(node = %name, reason, "machine state reported");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_booted_version_is_what_init_printed() {
        assert_eq!(booted_version("BdsDxe: loading\r\n"), None);
        assert_eq!(
            booted_version("x\nnode-image: init running version=v2 uptime=3.1\n"),
            Some("v2".to_owned())
        );
    }

    #[test]
    fn the_condition_says_what_the_process_does() {
        let exited = MachineState::Exited {
            code: Some(1),
            console_tail: "Kernel panic".into(),
        };
        let (status, reason, message) = exited.condition_fields();
        assert!(!status);
        assert_eq!(reason, "Exited");
        assert!(message.contains("code 1") && message.contains("Kernel panic"));
        let (status, reason, _) = MachineState::Running {
            version: "v1".into(),
        }
        .condition_fields();
        assert!(status);
        assert_eq!(reason, "Running");
    }
}
