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
use confidential_controllers::provider::{
    Leave, LeaveRequest, Machine, MachineRequest, Provider, ProviderError,
};
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::vm::{Accel, Vm, VmDisk, VmOptions};
use futures::future::BoxFuture;
use kube::Client;
use kube::api::Api;
use tokio::task::JoinHandle;

use crate::node_images::{NodeImages, image_version};

mod launch;
mod state;

pub use launch::*;
pub use state::*;

/// The serial of the state disk (`/sys/block/vdX/serial` in the guest).
pub const STATE_DISK_SERIAL: &str = "state";
/// Size of each machine's state disk (a sparse file: only what the guest
/// writes takes space).
pub const STATE_DISK_MIB: u64 = 2048;
/// Memory of each VM (the bound: at most 1 GiB; containerd, the
/// kubelet and pods run in it).
pub const VM_MEMORY_MIB: u32 = 1024;
/// How often [`QemuProvider::report_to`] looks at the machines.
const REPORT_PERIOD: Duration = Duration::from_secs(2);

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
        // The gate re-attests the node (and `verify` asks it) through the
        // one host port forwarded into the VM, announced at join.
        attest_forward: true,
        network: None,
        ..VmOptions::default()
    };
    Vm::boot_with(ca, &uki, accel, &options)
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
