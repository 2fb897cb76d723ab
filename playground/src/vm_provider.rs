//! Machines that are VMs: the node operator's [`Provider`] backed by QEMU.
//! A machine is a fresh sparse state disk, a fresh swtpm vTPM (EK
//! certificate from the playground's CA) and a VM booting the UKI of the
//! pool's image version under OVMF ([`confidential_testenv::vm`]), exactly
//! what a cloud would start from a node image; deleting it stops QEMU and
//! the swtpm by pid and removes every file the machine had.
//!
//! The machine learns who it is from its launch configuration, `KEY=value`
//! lines in a QEMU fw_cfg file ([`confidential_testenv::vm::NODE_CONFIG_FW_CFG`],
//! the `ENV_*` keys below): node name, pool, the gate's join endpoints and
//! key pin, the state disk's UUID. Not the kernel command line: that is
//! inside the UKI, measured, and the same for every VM of a version; the
//! fw_cfg file is measured by neither the firmware nor the stub. The host
//! chooses these values as a cloud's user data would, so none is trusted: the gate refuses a node name another AK holds, and the
//! pin only lets the node refuse a wrong gate.
//!
//! What each machine is doing (booting, its node OS running, QEMU exited
//! with a code, start failed) is observed from the processes and the serial
//! console ([`QemuProvider::state`]) and, with [`QemuProvider::report_to`],
//! written on the machine's PendingNode as the `MachineRunning` condition,
//! so `kubectl get pendingnodes -o yaml` shows the real process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use confidential_api::PendingNode;
use confidential_api::conditions::{condition, set_condition};
use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL, image_label_value};
use confidential_controllers::provider::{
    Leave, LeaveRequest, Machine, MachineRequest, Provider, ProviderError,
};
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::vm::{Accel, GuestForward, Vm, VmDisk, VmOptions};
use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::node_images::{NodeImages, image_version};

/// The launch configuration keys a machine gets (the bootstrapper's
/// environment variables; the image's init passes them on).
pub const ENV_NODE_NAME: &str = "CONFIDENTIAL_NODE_NAME";
pub const ENV_POOL: &str = "CONFIDENTIAL_POOL";
pub const ENV_GATE_ENDPOINTS: &str = "CONFIDENTIAL_GATE_ENDPOINTS";
pub const ENV_GATE_PIN: &str = "CONFIDENTIAL_GATE_PIN";
pub const ENV_DISK_UUID: &str = "CONFIDENTIAL_DISK_UUID";
/// The labels the node's kubelet registers with (`--node-labels`): the
/// pool and image identity labels, which the gate's admission checks
/// against the machine's attestation (a wrong value is refused).
pub const ENV_NODE_LABELS: &str = "CONFIDENTIAL_NODE_LABELS";
/// The serial of the state disk (`/sys/block/vdX/serial` in the guest).
pub const STATE_DISK_SERIAL: &str = "state";
/// Size of each machine's state disk (a sparse file: only what the guest
/// writes takes space).
pub const STATE_DISK_MIB: u64 = 2048;
/// Memory of each VM (the bound: at most 1 GiB; containerd, the
/// kubelet and pods run in it).
pub const VM_MEMORY_MIB: u32 = 1024;
/// The condition type written on PendingNodes.
pub const MACHINE_RUNNING: &str = "MachineRunning";
/// What the node image's init prints first on the console.
const BOOTED_MARKER: &str = "node-image: init running version=";
/// How often [`QemuProvider::report_to`] looks at the machines.
const REPORT_PERIOD: Duration = Duration::from_secs(2);

/// Cluster-wide part of every machine's launch configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// The gate's join endpoints (`host:port`) as the guest reaches them.
    pub gate_endpoints: Vec<String>,
    /// The gate key every machine pins.
    pub gate_pin: [u8; 32],
    /// The host's loopback ports the guest may reach (the gate's join
    /// port, the API server): nothing else.
    pub forwards: Vec<GuestForward>,
}

/// A launch configuration value that would break the `KEY=value` format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("launch configuration {key}: {value:?} holds a line break or NUL")]
pub struct LaunchValueError {
    key: &'static str,
    value: String,
}

impl LaunchConfig {
    /// The `KEY=value` lines of one machine's launch configuration. A value
    /// that could smuggle another line is refused.
    pub fn node_env(
        &self,
        request: &MachineRequest,
        disk_uuid: &str,
    ) -> Result<String, LaunchValueError> {
        let mut text = String::new();
        for (key, value) in [
            (ENV_NODE_NAME, request.name.clone()),
            (ENV_POOL, request.pool.clone()),
            (ENV_GATE_ENDPOINTS, self.gate_endpoints.join(",")),
            (ENV_GATE_PIN, hex::encode(self.gate_pin)),
            (ENV_DISK_UUID, disk_uuid.to_owned()),
            (
                ENV_NODE_LABELS,
                format!(
                    "{LABEL_NODE_POOL}={},{LABEL_NODE_IMAGE}={}",
                    request.pool,
                    image_label_value(&request.image)
                ),
            ),
        ] {
            if value.contains(['\n', '\r', '\0']) {
                return Err(LaunchValueError { key, value });
            }
            text.push_str(&format!("{key}={value}\n"));
        }
        Ok(text)
    }
}

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

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

enum Phase {
    Starting,
    Up(Box<Vm>),
    StartFailed(String),
}

impl Phase {
    fn observe(&mut self) -> MachineState {
        match self {
            Self::Starting => MachineState::Booting,
            Self::StartFailed(reason) => MachineState::StartFailed(reason.clone()),
            Self::Up(vm) => match vm.exit_status() {
                Ok(Some(status)) => MachineState::Exited {
                    code: status.code(),
                    console_tail: tail(&vm.console(), 5),
                },
                Ok(None) => match booted_version(&vm.console()) {
                    Some(version) => MachineState::Running { version },
                    None => MachineState::Booting,
                },
                Err(err) => MachineState::StartFailed(format!("cannot observe QEMU: {err:#}")),
            },
        }
    }
}

/// Where a machine's processes and files are (for checks that delete left
/// nothing behind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineFiles {
    /// The machine's own directory (state disk).
    pub dir: PathBuf,
    /// The VM's directory (vTPM state, firmware variables, ESP, console).
    pub vm_dir: Option<PathBuf>,
    /// QEMU's and the swtpm's process ids.
    pub pids: Vec<u32>,
}

struct Slot {
    machine: Machine,
    phase: Arc<Mutex<Phase>>,
    boot: JoinHandle<()>,
    dir: tempfile::TempDir,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Worker machines as QEMU VMs.
pub struct QemuProvider {
    ca: Arc<SwtpmCa>,
    images: Arc<NodeImages>,
    launch: LaunchConfig,
    accel: Accel,
    dir: PathBuf,
    slots: Mutex<BTreeMap<String, Slot>>,
}

/// These machines are workers: no etcd member runs on them.
pub const NO_CONTROL_PLANE_MACHINES: &str = "the QEMU provider starts worker machines only (no etcd member runs on them): use it for worker pools; control-plane pools are not supported by this provider";

impl QemuProvider {
    /// Machines' files go under `dir`; UKIs come from `images`.
    pub fn new(
        ca: Arc<SwtpmCa>,
        images: Arc<NodeImages>,
        launch: LaunchConfig,
        accel: Accel,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            ca,
            images,
            launch,
            accel,
            dir: dir.to_owned(),
            slots: Mutex::new(BTreeMap::new()),
        })
    }

    /// What machine `name` is doing; `None` when there is no such machine.
    pub fn state(&self, name: &str) -> Option<MachineState> {
        let slots = lock(&self.slots);
        let slot = slots.get(name)?;
        let mut phase = lock(&slot.phase);
        Some(phase.observe())
    }

    /// Every machine and what it is doing.
    pub fn states(&self) -> BTreeMap<String, MachineState> {
        lock(&self.slots)
            .iter()
            .map(|(name, slot)| (name.clone(), lock(&slot.phase).observe()))
            .collect()
    }

    /// The machine's processes and directories, while it exists.
    pub fn files(&self, name: &str) -> Option<MachineFiles> {
        let slots = lock(&self.slots);
        let slot = slots.get(name)?;
        let phase = lock(&slot.phase);
        let (vm_dir, pids) = match &*phase {
            Phase::Up(vm) => {
                let (qemu, swtpm) = vm.pids();
                (
                    Some(vm.dir().to_owned()),
                    [qemu, swtpm].into_iter().flatten().collect(),
                )
            }
            _ => (None, Vec::new()),
        };
        Some(MachineFiles {
            dir: slot.dir.path().to_owned(),
            vm_dir,
            pids,
        })
    }

    /// The serial console of machine `name` so far.
    pub fn console(&self, name: &str) -> Option<String> {
        let slots = lock(&self.slots);
        let slot = slots.get(name)?;
        let phase = lock(&slot.phase);
        match &*phase {
            Phase::Up(vm) => Some(vm.console()),
            _ => Some(String::new()),
        }
    }

    /// Writes each machine's state on its PendingNode (condition
    /// `MachineRunning`) whenever it differs from what the PendingNode
    /// shows, until the returned task is aborted.
    pub fn report_to(self: &Arc<Self>, client: Client) -> JoinHandle<()> {
        let provider = Arc::downgrade(self);
        tokio::spawn(async move {
            let pending: Api<PendingNode> = Api::all(client);
            loop {
                let Some(states) = provider.upgrade().map(|p| p.states()) else {
                    return;
                };
                for (name, state) in states {
                    if let Err(err) = report(&pending, &name, &state).await {
                        tracing::debug!(node = %name, error = %err, "reporting the machine state");
                    }
                }
                tokio::time::sleep(REPORT_PERIOD).await;
            }
        })
    }
}

/// Sets the `MachineRunning` condition of PendingNode `name` to `state`;
/// writes only on a change, guarded by the resourceVersion read (a
/// concurrent writer wins and the next round retries).
async fn report(
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

/// Prepares the disk and boots the VM (blocking: swtpm set-up, the first
/// build of an image version, process starts).
fn start_vm(
    ca: &SwtpmCa,
    images: &NodeImages,
    launch: &LaunchConfig,
    accel: Accel,
    dir: &Path,
    request: &MachineRequest,
) -> anyhow::Result<Vm> {
    let uki = images.uki(&request.image)?;
    let disk_uuid = uuid_v4(rand::random());
    let options = VmOptions {
        memory_mib: VM_MEMORY_MIB,
        forwards: launch.forwards.clone(),
        // The encrypted state disk, blank (the node formats it), and the
        // small unencrypted machine disk for the TPM-wrapped AK.
        disks: vec![
            VmDisk::blank(&dir.join("state.raw"), STATE_DISK_MIB, STATE_DISK_SERIAL)?,
            VmDisk::machine(&dir.join("machine.raw"))?,
        ],
        node_config: Some(launch.node_env(request, &disk_uuid)?),
        ..VmOptions::default()
    };
    Vm::boot_with(ca, &uki, accel, &options)
}

/// An RFC 4122 version-4 UUID from 16 random bytes.
fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Stops a machine's processes and removes its files (blocking).
fn tear_down(phase: Phase, dir: tempfile::TempDir) -> std::io::Result<()> {
    // QEMU first, then the swtpm, then the VM's directory (Vm's drop order).
    drop(phase);
    dir.close()
}

impl Provider for QemuProvider {
    fn create_machine<'a>(
        &'a self,
        request: &'a MachineRequest,
    ) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            if request.control_plane {
                return Err(ProviderError::Failed(NO_CONTROL_PLANE_MACHINES.to_owned()));
            }
            // Refused before anything starts: no machine for an image this
            // provider cannot build.
            image_version(&request.image).map_err(|e| ProviderError::Failed(e.to_string()))?;
            let mut slots = lock(&self.slots);
            if let Some(slot) = slots.get(&request.name) {
                return Ok(slot.machine.clone());
            }
            let dir = tempfile::Builder::new()
                .prefix(&format!("{}-", request.name))
                .tempdir_in(&self.dir)
                .map_err(|e| {
                    ProviderError::Failed(format!("creating the machine directory: {e}"))
                })?;
            let machine = Machine {
                name: request.name.clone(),
                pool: request.pool.clone(),
                image: request.image.clone(),
                provider_id: format!("qemu://{}", request.name),
            };
            let phase = Arc::new(Mutex::new(Phase::Starting));
            let boot = tokio::spawn({
                let (ca, images, launch, accel) = (
                    self.ca.clone(),
                    self.images.clone(),
                    self.launch.clone(),
                    self.accel,
                );
                let (dir, request, phase) = (dir.path().to_owned(), request.clone(), phase.clone());
                async move {
                    let name = request.name.clone();
                    let image = request.image.clone();
                    let started = tokio::task::spawn_blocking(move || {
                        start_vm(&ca, &images, &launch, accel, &dir, &request)
                    })
                    .await;
                    let next = match started {
                        Ok(Ok(vm)) => {
                            tracing::info!(node = %name, %image, vm = %vm.dir().display(), "machine started");
                            Phase::Up(Box::new(vm))
                        }
                        Ok(Err(err)) => {
                            let reason = format!("{err:#}");
                            tracing::warn!(node = %name, %image, error = %reason, "machine failed to start");
                            Phase::StartFailed(reason)
                        }
                        Err(err) => Phase::StartFailed(format!("the start task failed: {err}")),
                    };
                    *lock(&phase) = next;
                }
            });
            slots.insert(
                request.name.clone(),
                Slot {
                    machine: machine.clone(),
                    phase,
                    boot,
                    dir,
                },
            );
            Ok(machine)
        })
    }

    fn delete_machine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let Some(slot) = lock(&self.slots).remove(name) else {
                return Ok(());
            };
            // A start in progress finishes first: then whatever it started
            // is stopped below.
            if let Err(err) = slot.boot.await {
                tracing::warn!(node = %name, error = %err, "the machine's start task failed");
            }
            let phase = std::mem::replace(&mut *lock(&slot.phase), Phase::Starting);
            let dir = slot.dir;
            tokio::task::spawn_blocking(move || tear_down(phase, dir))
                .await
                .map_err(|e| ProviderError::Failed(format!("stopping the machine: {e}")))?
                .map_err(|e| ProviderError::Failed(format!("removing the machine's files: {e}")))?;
            tracing::info!(node = %name, "machine deleted");
            Ok(())
        })
    }

    fn control_plane_membership(&self) -> Result<(), String> {
        Err(NO_CONTROL_PLANE_MACHINES.to_owned())
    }

    fn leave_control_plane<'a>(
        &'a self,
        _request: &'a LeaveRequest,
    ) -> BoxFuture<'a, Result<Leave, ProviderError>> {
        Box::pin(async { Err(ProviderError::Failed(NO_CONTROL_PLANE_MACHINES.to_owned())) })
    }
}

impl QemuProvider {
    /// Stops every machine (QEMU, then its swtpm, by pid) and removes their
    /// files (blocking). The provider also does this when dropped.
    pub fn shutdown(&self) {
        let slots = std::mem::take(&mut *lock(&self.slots));
        for (_, slot) in slots {
            slot.boot.abort();
            let phase = std::mem::replace(&mut *lock(&slot.phase), Phase::Starting);
            if let Err(err) = tear_down(phase, slot.dir) {
                tracing::warn!(error = %err, "removing a machine's files");
            }
        }
    }
}

impl Drop for QemuProvider {
    fn drop(&mut self) {
        self.shutdown();
    }
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
    fn every_machine_gets_its_own_launch_configuration() {
        let launch = LaunchConfig {
            gate_endpoints: vec!["10.0.2.100:9443".into(), "10.0.2.100:9444".into()],
            gate_pin: [0xab; 32],
            forwards: Vec::new(),
        };
        let mut request = MachineRequest {
            name: "default-abc12".into(),
            pool: "default".into(),
            image: "registry.example/confidential-node:v1".into(),
            kubernetes_version: "v1.35.4".into(),
            control_plane: false,
        };
        let env = launch
            .node_env(&request, "00000000-0000-4000-8000-000000000001")
            .expect("valid values");
        assert_eq!(
            env,
            format!(
                "CONFIDENTIAL_NODE_NAME=default-abc12\n\
                 CONFIDENTIAL_POOL=default\n\
                 CONFIDENTIAL_GATE_ENDPOINTS=10.0.2.100:9443,10.0.2.100:9444\n\
                 CONFIDENTIAL_GATE_PIN={}\n\
                 CONFIDENTIAL_DISK_UUID=00000000-0000-4000-8000-000000000001\n\
                 CONFIDENTIAL_NODE_LABELS=confidential.dev/node-pool=default,\
                 confidential.dev/node-image=registry.example_confidential-node_v1\n",
                "ab".repeat(32)
            )
        );
        for smuggled in ["a\nCONFIDENTIAL_GATE_PIN=00", "a\rb", "a\0b"] {
            request.pool = smuggled.into();
            let err = launch
                .node_env(&request, "00000000-0000-4000-8000-000000000001")
                .expect_err(smuggled);
            assert!(err.to_string().contains("CONFIDENTIAL_POOL"), "{err}");
        }
    }

    #[test]
    fn disk_uuids_are_version_4() {
        let uuid = uuid_v4([0xff; 16]);
        assert_eq!(uuid, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert!(confidential_attestation::kdf::is_valid_disk_uuid(&uuid_v4(
            [0; 16]
        )));
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
