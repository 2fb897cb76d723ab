//! A simulated confidential node: its own swtpm (real TPM 2.0 simulator with
//! an EK certificate from a local CA), a "firmware" step that extends a PCR
//! with the digests of the node image it boots (as measured boot would), the
//! real `confidential-bootstrapper` binary joining through the gate, and the
//! kubelet stand-in of [`crate::kubelet`] (TLS bootstrap with the token it
//! received, Node, Lease and Ready condition, pods run to Running).
//!
//! Rust API (what other suites use):
//! ```ignore
//! let ca = SwtpmCa::new()?;
//! let image = NodeImage::new("node-image:v1");
//! let gate_pin = GateIdentity::derive(&master)?.pin(); // the gate it trusts
//! let mut node = SimulatedNode::boot(&ca, "node-a", &image, gate_pin)?;
//! let out = node.run_bootstrapper(&[gate_addr], &["--pool", "pool"]).await?;
//! assert!(out.success);
//! let kubelet = node.start_kubelet(|csr| approve(csr)).await?; // Node, heartbeats, pods
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::ManagedProcess;
pub use crate::kubelet::{
    Kubelet, KubeletOptions, common_name, heartbeat_once, signed_certificate, submit_kubelet_csr,
};
use crate::swtpm::{Swtpm, SwtpmCa};

/// PCR the simulated firmware measures the node image into.
pub const IMAGE_PCR: u32 = 4;

/// A node image as the firmware measures it: component digests, in order.
#[derive(Debug, Clone)]
pub struct NodeImage {
    pub name: String,
    pub components: Vec<[u8; 32]>,
}

impl NodeImage {
    /// An image whose components are derived from its name (kernel, initrd,
    /// command line), so different names measure differently.
    pub fn new(name: &str) -> Self {
        let components = ["kernel", "initrd", "cmdline"]
            .iter()
            .map(|part| Sha256::digest(format!("{part} of {name}")).into())
            .collect();
        Self {
            name: name.to_owned(),
            components,
        }
    }

    /// The PCR value measured boot of this image produces (replay from zero).
    pub fn expected_pcr(&self) -> [u8; 32] {
        confidential_attestation::measurements::replay(&self.components)
    }
}

/// Outcome of one bootstrapper run.
#[derive(Debug)]
pub struct BootstrapOutcome {
    pub success: bool,
    pub log: String,
}

/// A simulated confidential machine.
pub struct SimulatedNode {
    pub name: String,
    pub swtpm: Swtpm,
    /// The gate key this machine's launch configuration pins
    /// (`GateIdentity::pin`): its bootstrapper talks to no other server.
    pub gate_pin: [u8; 32],
    dir: TempDir,
}

/// Path of the `confidential-bootstrapper` binary: `$CONFIDENTIAL_BOOTSTRAPPER_BIN`,
/// or the one beside this test binary's target directory (built with
/// `cargo build -p confidential-bootstrapper` when missing).
pub fn bootstrapper_binary() -> Result<PathBuf> {
    crate::workspace_binary(
        "confidential-bootstrapper",
        "confidential-bootstrapper",
        "CONFIDENTIAL_BOOTSTRAPPER_BIN",
    )
}

impl SimulatedNode {
    /// Manufactures the machine's TPM (EK certificate from `ca`) and "boots"
    /// `image`: the firmware extends [`IMAGE_PCR`] with its components.
    /// `gate_pin` is the gate key its launch configuration pins
    /// (`GateIdentity::derive(&master).pin()` of the gate it should join).
    pub fn boot(ca: &SwtpmCa, name: &str, image: &NodeImage, gate_pin: [u8; 32]) -> Result<Self> {
        let swtpm = Swtpm::start(ca)?;
        swtpm.measure_boot(IMAGE_PCR, &image.components)?;
        Ok(Self {
            name: name.to_owned(),
            swtpm,
            gate_pin,
            dir: tempfile::Builder::new().prefix("node-").tempdir()?,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Reboots the machine into `image`: the TPM is power-cycled (PCRs back
    /// to zero, EK and the AK state kept) and the firmware measures `image`.
    /// The bootstrapper must be run again afterwards.
    pub fn reboot(&self, image: &NodeImage) -> Result<()> {
        self.swtpm.reboot()?;
        self.swtpm.measure_boot(IMAGE_PCR, &image.components)
    }

    /// Where the bootstrapper writes the kubelet bootstrap kubeconfig.
    pub fn bootstrap_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("bootstrap-kubelet.kubeconfig")
    }

    /// UUID of this machine's state disk, as its bootstrapper names it.
    pub fn disk_uuid(&self) -> String {
        format!("00000000-0000-4000-8000-{:012x}", std::process::id())
    }

    pub fn disk_key_file(&self) -> PathBuf {
        self.dir.path().join("disk.key")
    }

    /// The bootstrapper command line for this node: the pinned gate key, one
    /// join attempt, the bootstrap kubeconfig for the kubelet stand-in, the
    /// disk key to a file (unless `extra` names a `--state-device`). `extra`
    /// may override `--gate-pin`.
    pub fn bootstrapper_command(&self, endpoints: &[String], extra: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(bootstrapper_binary()?);
        for e in endpoints {
            cmd.arg("--endpoint").arg(e);
        }
        if !extra.iter().any(|a| a.starts_with("--gate-pin")) {
            cmd.arg("--gate-pin").arg(hex::encode(self.gate_pin));
        }
        cmd.arg("--node-name")
            .arg(&self.name)
            .arg("--tcti")
            .arg(self.swtpm.tcti())
            .arg("--disk-uuid")
            .arg(self.disk_uuid())
            .arg("--kubelet-bootstrap-kubeconfig")
            .arg(self.bootstrap_kubeconfig())
            .arg("--ak-state")
            .arg(self.dir.path().join("ak.blob"))
            .arg("--max-attempts")
            .arg("1");
        // A state device replaces the key file (the flags conflict).
        if !extra.contains(&"--state-device") {
            cmd.arg("--disk-key-file").arg(self.disk_key_file());
        }
        if !extra.contains(&"--pcrs") {
            cmd.arg("--pcrs").arg(IMAGE_PCR.to_string());
        }
        cmd.args(extra);
        Ok(cmd)
    }

    /// Runs the real bootstrapper once against `endpoints` and waits for it
    /// to exit. `extra` is appended to its arguments.
    pub async fn run_bootstrapper(
        &self,
        endpoints: &[String],
        extra: &[&str],
    ) -> Result<BootstrapOutcome> {
        let mut cmd = tokio::process::Command::from(self.bootstrapper_command(endpoints, extra)?);
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .context("bootstrapper timed out")??;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.dir.path().join("bootstrapper.log"), &log)?;
        Ok(BootstrapOutcome {
            success: out.status.success(),
            log,
        })
    }

    /// Starts the bootstrapper as a long-running process (e.g. with
    /// `--attest-listen`), stopped by pid when the returned handle drops.
    pub fn spawn_bootstrapper(
        &self,
        endpoints: &[String],
        extra: &[&str],
    ) -> Result<ManagedProcess> {
        ManagedProcess::spawn(
            "confidential-bootstrapper",
            self.bootstrapper_command(endpoints, extra)?,
            &self.dir.path().join("bootstrapper.log"),
        )
    }

    /// The kubelet stand-in: TLS bootstrap with the token (submits the
    /// kubelet client CSR; `approve` is called with its name, as a CSR
    /// approver would act), then registers the Node, keeps its Lease and
    /// Ready condition fresh and runs its pods until the returned [`Kubelet`]
    /// is dropped.
    pub async fn start_kubelet<F, Fut>(&self, approve: F) -> Result<Kubelet>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        self.start_kubelet_with(&KubeletOptions::default(), approve)
            .await
    }

    /// [`SimulatedNode::start_kubelet`] with the kubelet's `--node-labels` and
    /// reported version.
    pub async fn start_kubelet_with<F, Fut>(
        &self,
        options: &KubeletOptions,
        approve: F,
    ) -> Result<Kubelet>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        Kubelet::start(
            &self.name,
            &self.bootstrap_kubeconfig(),
            self.dir.path(),
            options,
            approve,
        )
        .await
    }
}
