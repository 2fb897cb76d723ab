//! Confidential VMs for the test environment: QEMU/KVM (`-machine q35`)
//! booting OVMF with its own swtpm as vTPM (EK certificate from the test's
//! local CA, as [`crate::swtpm`] manufactures process nodes' TPMs), the node
//! image UKI on an EFI system partition, the serial console in a file.
//!
//! The UKI is booted as `EFI/BOOT/BOOTX64.EFI` from a FAT ESP (QEMU's
//! read-only `vvfat` view of a temporary directory), not with `-kernel`: that
//! is how a real disk boots, so OVMF's boot manager loads it through the
//! normal path and measures it (PCR 4, Authenticode), exactly as a cloud VM
//! booting a node image would. `-kernel` would go through QEMU's fw_cfg
//! loader instead, which real machines do not have.
//!
//! Everything a VM owns (the OVMF variable store copy, the ESP, the console
//! log, and the swtpm state unless the caller keeps it for a reboot,
//! [`VmOptions::tpm_state`]) lives in one temporary directory removed on
//! drop, after both processes were stopped by pid.
//!
//! A node VM ([`VmOptions`]) reaches nothing but the host loopback ports it
//! is given ([`GuestForward`], QEMU user networking with `restrict=on`),
//! gets its state and machine disks as virtio disks told apart by serial,
//! and its launch configuration as a fw_cfg item.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::ManagedProcess;

mod boot_report;
mod network;
use crate::swtpm::{SwtpmCa, manufacture};
pub use boot_report::BootReport;
pub use network::{NetworkPort, VmNetwork};

/// OVMF firmware code (Debian `ovmf`, 4 MiB variant with TPM 2 support).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The template variable store each VM gets a private copy of.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Memory per VM.
pub const VM_MEMORY_MIB: u32 = 512;

/// The accelerator QEMU runs guests with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM (the default, and what a node runs on).
    Kvm,
    /// QEMU's emulator: the same firmware, TPM and measurements, 10-50x
    /// slower; only when asked for explicitly (`CONFIDENTIAL_VM_ACCEL=tcg`),
    /// for machines whose KVM cannot run guests.
    Tcg,
}

/// Environment variable choosing the accelerator (`kvm`, the default, or `tcg`).
pub const ACCEL_ENV: &str = "CONFIDENTIAL_VM_ACCEL";

impl Accel {
    pub fn from_env() -> Result<Self> {
        match std::env::var(ACCEL_ENV).as_deref() {
            Err(_) | Ok("kvm") => Ok(Self::Kvm),
            Ok("tcg") => Ok(Self::Tcg),
            Ok(other) => bail!("{ACCEL_ENV}={other:?}: expected kvm or tcg"),
        }
    }

    fn machine(self) -> &'static str {
        match self {
            Self::Kvm => "q35,accel=kvm",
            Self::Tcg => "q35,accel=tcg",
        }
    }
}

/// Whether this machine can run KVM guests; the reason when it cannot.
pub fn kvm_usable() -> std::result::Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not usable ({e})"))?;
    for tool in ["qemu-system-x86_64", "swtpm"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("{tool} is not installed (scripts/install-deps)"));
        }
    }
    for file in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(file).exists() {
            return Err(format!("{file} is missing (install ovmf)"));
        }
    }
    Ok(())
}

/// The address the guest reaches the host's forwarded loopback ports at
/// (QEMU user networking's `guestfwd`; nothing else is reachable).
pub const GUEST_HOST_IP: &str = "10.0.2.100";
/// The guest's own address on QEMU user networking (fixed by QEMU).
pub const GUEST_IP: &str = "10.0.2.15";
/// QEMU user networking's gateway (the default route; `restrict=on` drops
/// everything sent to it that no forward names).
pub const GUEST_GATEWAY: &str = "10.0.2.2";
/// The port the node image's bootstrapper serves `/v1/attest` on inside the
/// guest (aTLS; the gate's re-attestation and `kubectl confidential verify`).
pub const GUEST_ATTEST_PORT: u16 = 9444;
/// The launch configuration key announcing where the cluster reaches the
/// node's attestation endpoint (the bootstrapper's `--attest-advertise`).
pub const ENV_ATTEST_ENDPOINT: &str = "CONFIDENTIAL_ATTEST_ENDPOINT";
/// The launch configuration keys of a node on a [`VmNetwork`]: its address
/// (`a.b.c.d/prefix`) and default gateway; without them the node takes
/// QEMU user networking's fixed ones ([`GUEST_IP`], [`GUEST_GATEWAY`]).
pub const ENV_NODE_ADDRESS: &str = "CONFIDENTIAL_NODE_ADDRESS";
pub const ENV_NODE_GATEWAY: &str = "CONFIDENTIAL_NODE_GATEWAY";
/// The fw_cfg item the node's launch configuration is passed in (an env
/// file; the guest reads it from `/sys/firmware/qemu_fw_cfg/by_name/`).
pub const NODE_CONFIG_FW_CFG: &str = "opt/confidential/node.env";

/// One TCP port of the host's loopback the guest may connect to, as
/// `GUEST_HOST_IP:guest_port`. QEMU runs `busybox nc 127.0.0.1 host_port`
/// per guest connection (`guestfwd=...-cmd:`), so every connection of the
/// guest gets its own stream (a chardev forward would carry one only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestForward {
    pub guest_port: u16,
    pub host_port: u16,
}

/// A raw disk image attached as a virtio disk after the ESP (`/dev/vdb`,
/// `/dev/vdc`, ... in this order), its `serial` readable in the guest at
/// `/sys/block/vdX/serial`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    pub path: PathBuf,
    pub serial: String,
}

impl VmDisk {
    /// A sparse, all-zero disk image of `size_mib` (a fresh state disk: the
    /// node finds no LUKS header and formats it).
    pub fn blank(path: &Path, size_mib: u64, serial: &str) -> Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("creating disk image {}", path.display()))?;
        file.set_len(size_mib * 1024 * 1024)?;
        Ok(Self {
            path: path.to_owned(),
            serial: serial.to_owned(),
        })
    }

    /// The node's unencrypted machine disk (serial `machine`): an empty ext4
    /// file system made here, as a cloud image would ship its boot volume,
    /// so the node never decides to format it. It holds only what the node
    /// needs before it can unlock anything: its TPM-wrapped AK (useless
    /// outside this vTPM) and the cluster ID.
    pub fn machine(path: &Path) -> Result<Self> {
        let disk = Self::blank(path, 16, "machine")?;
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "machine"])
            .arg(path)
            .output()
            .context("running mkfs.ext4 (e2fsprogs)")?;
        if !out.status.success() {
            bail!(
                "mkfs.ext4 {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(disk)
    }
}

/// How a VM is set up beyond its UKI; the default is what [`Vm::boot`] does.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub memory_mib: u32,
    /// The only host ports the guest can reach (user networking stays
    /// `restrict=on`).
    pub forwards: Vec<GuestForward>,
    pub disks: Vec<VmDisk>,
    /// A vTPM state directory kept by the caller (reboots keep the TPM):
    /// manufactured from the CA when it holds no TPM yet, reused otherwise.
    /// `None`: a fresh vTPM in the VM's own directory.
    pub tpm_state: Option<PathBuf>,
    /// The node's launch configuration (`KEY=value` lines) passed as the
    /// fw_cfg item [`NODE_CONFIG_FW_CFG`]. Not measured: the node treats it
    /// as untrusted input (the gate is authenticated by its pin, and a wrong
    /// value only makes the join fail).
    pub node_config: Option<String>,
    /// Forward a free port of the host's loopback to the guest's
    /// attestation endpoint ([`GUEST_ATTEST_PORT`]) and announce it to the
    /// node ([`ENV_ATTEST_ENDPOINT`] appended to `node_config`), so the
    /// gate can re-attest the node and `verify` can ask it. The only way
    /// into the guest; it reaches nothing but that aTLS endpoint.
    pub attest_forward: bool,
    /// Put the VM on this bridge instead of QEMU user networking: it gets
    /// the next address there (announced to the node in its launch
    /// configuration, with its attestation endpoint at that address), and
    /// `forwards`/`attest_forward` do not apply.
    pub network: Option<std::sync::Arc<VmNetwork>>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mib: VM_MEMORY_MIB,
            forwards: Vec::new(),
            disks: Vec::new(),
            tpm_state: None,
            node_config: None,
            attest_forward: false,
            network: None,
        }
    }
}

/// The `-netdev` value: user networking, `restrict=on`, one `guestfwd` per
/// forward, and with `attest_host_port` the one `hostfwd` into the guest, to
/// its attestation endpoint (pure, so the rule set is testable).
pub fn netdev_arg(forwards: &[GuestForward], attest_host_port: Option<u16>) -> String {
    let mut arg = String::from("user,id=net0,restrict=on");
    for f in forwards {
        arg.push_str(&format!(
            ",guestfwd=tcp:{GUEST_HOST_IP}:{}-cmd:busybox nc 127.0.0.1 {}",
            f.guest_port, f.host_port
        ));
    }
    if let Some(port) = attest_host_port {
        arg.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{port}-{GUEST_IP}:{GUEST_ATTEST_PORT}"
        ));
    }
    arg
}

/// Whether `state` already holds a manufactured TPM (swtpm's permanent state).
fn tpm_manufactured(state: &Path) -> bool {
    state.join("tpm2-00.permall").is_file()
}

/// A running VM with its vTPM.
pub struct Vm {
    // Dropped first (field order): QEMU, then swtpm, then the directory.
    qemu: ManagedProcess,
    swtpm: ManagedProcess,
    dir: TempDir,
    console: PathBuf,
    started: Instant,
    attest_endpoint: Option<String>,
    /// Dropped after QEMU (field order), with the network it lives on.
    port: Option<(NetworkPort, std::sync::Arc<VmNetwork>)>,
}

fn wait_for_path(path: &Path, process: &mut ManagedProcess, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        process.check_running()?;
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl Vm {
    /// Manufactures a vTPM from `ca`, then boots `uki` under OVMF.
    pub fn boot(ca: &SwtpmCa, uki: &Path, accel: Accel) -> Result<Self> {
        Self::boot_with(ca, uki, accel, &VmOptions::default())
    }

    /// Boots `uki` under OVMF with `options` (forwards, disks, a kept vTPM,
    /// the launch configuration).
    pub fn boot_with(ca: &SwtpmCa, uki: &Path, accel: Accel, options: &VmOptions) -> Result<Self> {
        if accel == Accel::Kvm {
            kvm_usable().map_err(|reason| anyhow::anyhow!("cannot boot a VM: {reason}"))?;
        }
        let dir = tempfile::Builder::new().prefix("vm-").tempdir()?;
        let d = dir.path();
        let state = options.tpm_state.clone().unwrap_or_else(|| d.join("tpm"));
        if !tpm_manufactured(&state) {
            manufacture(ca, &state)?;
        }
        let esp = d.join("esp/EFI/BOOT");
        std::fs::create_dir_all(&esp)?;
        std::fs::copy(uki, esp.join("BOOTX64.EFI"))
            .with_context(|| format!("copying {} to the ESP", uki.display()))?;
        let vars = d.join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).context("copying the OVMF variable store")?;

        let socket = d.join("swtpm.sock");
        let mut swtpm_cmd = Command::new("swtpm");
        swtpm_cmd
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--terminate");
        let mut swtpm = ManagedProcess::spawn("swtpm (vTPM)", swtpm_cmd, &d.join("swtpm.log"))?;
        wait_for_path(&socket, &mut swtpm, Duration::from_secs(10))?;

        let console = d.join("console.log");
        let mut qemu_cmd = Command::new("qemu-system-x86_64");
        qemu_cmd
            .args(["-machine", accel.machine(), "-smp", "1"])
            .args(match accel {
                Accel::Kvm => &["-cpu", "host"][..],
                Accel::Tcg => &[][..],
            })
            .args(["-m", &format!("{}M", options.memory_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", socket.display()))
            .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
            .args(["-device", "tpm-crb,tpmdev=tpm0"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=esp,format=raw,readonly=on,file=fat:{}",
                d.join("esp").display()
            ))
            .args(["-device", "virtio-blk-pci,drive=esp,bootindex=0"]);
        for (index, disk) in options.disks.iter().enumerate() {
            qemu_cmd
                .arg("-drive")
                .arg(format!(
                    "if=none,id=disk{index},format=raw,cache=unsafe,file={}",
                    disk.path.display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive=disk{index},serial={}",
                    disk.serial
                ));
        }
        let port = match &options.network {
            Some(network) => Some((network.attach()?, network.clone())),
            None => None,
        };
        let attest_host_port = match (options.attest_forward, &port) {
            (true, None) => Some(crate::controlplane::free_port()?),
            _ => None,
        };
        let attest_endpoint = match &port {
            Some((port, _)) => Some(format!("{}:{GUEST_ATTEST_PORT}", port.address)),
            None => attest_host_port.map(|port| format!("127.0.0.1:{port}")),
        };
        let mut node_config = options.node_config.clone();
        if let Some(config) = &mut node_config {
            if let Some((port, _)) = &port {
                config.push_str(&port.node_config());
            }
            if let Some(endpoint) = &attest_endpoint {
                config.push_str(&format!("{ENV_ATTEST_ENDPOINT}={endpoint}\n"));
            }
        }
        if let Some(config) = &node_config {
            let file = d.join("node.env");
            std::fs::write(&file, config).context("writing the node configuration")?;
            qemu_cmd
                .arg("-fw_cfg")
                .arg(format!("name={NODE_CONFIG_FW_CFG},file={}", file.display()));
        }
        match &port {
            // User-mode networking with no route out (restrict=on) but the
            // forwards asked for; no option ROM, so nothing but firmware
            // code runs before the UKI.
            None => qemu_cmd
                .args(["-netdev", &netdev_arg(&options.forwards, attest_host_port)])
                .args(["-device", "virtio-net-pci,netdev=net0,romfile="]),
            Some((port, _)) => qemu_cmd
                .args([
                    "-netdev",
                    &format!("tap,id=net0,ifname={},script=no,downscript=no", port.tap),
                ])
                .args([
                    "-device",
                    &format!("virtio-net-pci,netdev=net0,romfile=,mac={}", port.mac),
                ]),
        };
        qemu_cmd
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
        let started = Instant::now();
        let qemu = ManagedProcess::spawn("qemu", qemu_cmd, &d.join("qemu.log"))?;
        tracing::info!(dir = %d.display(), "VM started");
        Ok(Self {
            qemu,
            swtpm,
            dir,
            console,
            started,
            attest_endpoint,
            port,
        })
    }

    /// The VM's address on its [`VmNetwork`], when it is on one.
    pub fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.port.as_ref().map(|(port, _)| port.address)
    }

    /// Where the host reaches the node's attestation endpoint
    /// (`127.0.0.1:<port>` when booted with `attest_forward`, its address
    /// on a [`VmNetwork`]).
    pub fn attest_endpoint(&self) -> Option<&str> {
        self.attest_endpoint.as_deref()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console contains `needle`; returns the time since start.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(self.started.elapsed());
            }
            self.qemu.check_running().with_context(|| {
                format!("QEMU stopped; console:\n{}", tail(&self.console(), 40))
            })?;
            self.swtpm.check_running()?;
            let qemu_log = std::fs::read_to_string(self.qemu.log_path()).unwrap_or_default();
            if qemu_log.contains("KVM internal error") {
                bail!(
                    "KVM cannot run this guest on this machine (nested virtualization?): {}; \
                     set {ACCEL_ENV}=tcg to boot with QEMU's emulator instead",
                    qemu_log.lines().take(3).collect::<Vec<_>>().join(" / ")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} on the VM console within {timeout:?}; console:\n{}",
                    tail(&self.console(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the QEMU process (kB), from /proc.
    pub fn qemu_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.qemu.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process ids of QEMU and of the vTPM (swtpm), while they are owned.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (self.qemu.pid(), self.swtpm.pid())
    }

    /// QEMU's exit status once it has exited (`None` while it runs).
    pub fn exit_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.qemu.exit_status()
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Fails when QEMU or the vTPM stopped (the console's tail in the error).
    pub fn check_running(&mut self) -> Result<()> {
        self.qemu
            .check_running()
            .with_context(|| format!("QEMU stopped; console:\n{}", tail(&self.console(), 40)))?;
        self.swtpm.check_running()
    }

    /// Stops QEMU, then the vTPM (a kept `tpm_state` stays for the next boot).
    pub fn stop(mut self) {
        self.qemu.stop(Duration::from_secs(5));
        self.swtpm.stop(Duration::from_secs(5));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_reaches_only_the_forwarded_ports_and_nothing_else() {
        assert_eq!(netdev_arg(&[], None), "user,id=net0,restrict=on");
        let arg = netdev_arg(
            &[
                GuestForward {
                    guest_port: 6443,
                    host_port: 40001,
                },
                GuestForward {
                    guest_port: 9443,
                    host_port: 40002,
                },
            ],
            None,
        );
        assert_eq!(
            arg,
            "user,id=net0,restrict=on,\
             guestfwd=tcp:10.0.2.100:6443-cmd:busybox nc 127.0.0.1 40001,\
             guestfwd=tcp:10.0.2.100:9443-cmd:busybox nc 127.0.0.1 40002"
        );
        assert!(!arg.contains("hostfwd"), "nothing listens into the guest");
        assert_eq!(
            netdev_arg(&[], Some(40003)),
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40003-10.0.2.15:9444",
            "the one way in: the host's loopback to the guest's attestation endpoint"
        );
    }
}
