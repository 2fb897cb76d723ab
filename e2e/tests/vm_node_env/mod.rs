//! The environment of the VM node suite (`vm_node.rs`) and its benchmark: a
//! real control plane, the real gate (`confidential-webhook` as a process)
//! with an AttestationPolicy built from the PCRs *predicted* from the node
//! image's UKI (never from a booted VM), a pool, the operator's kubelet CSR
//! approver, and VM nodes booted from the node image under OVMF with their
//! own vTPM.
//!
//! The guest reaches exactly two host ports: the gate's join port as
//! `10.0.2.100:9443` and the API server as `10.0.2.100:6443` (QEMU user
//! networking, `restrict=on`, one `guestfwd` each). The gate hands nodes
//! that address as the API server; the test control plane's serving
//! certificate names it (`confidential_testenv::pki`).

#![allow(dead_code)] // the suite and the bench use different parts

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::{AttestationPolicy, NodeAttestation, NodeVersion};
use confidential_attestation::predict::pe::PeImage;
use confidential_attestation::predict::predict_uki_boot;
use confidential_testenv::fixtures::{Publisher, measurement_file, policy_spec};
use confidential_testenv::pki::CertificateAuthority;
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::vm::{Accel, GUEST_HOST_IP, GuestForward, Vm, VmDisk, VmOptions};
use confidential_testenv::{
    ManagedProcess, TestCluster, allow_node_bootstrap, crds_dir, install_crds, unique_name,
    workspace_binary,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::json;
use xtask::node_image::runtime::BakedImage;
use xtask::node_image::{ImageVersion, NodeImageInputs, build};

/// The gate's join port as the guest dials it.
pub const GUEST_GATE_PORT: u16 = 9443;
/// The API server's port as the guest dials it.
pub const GUEST_API_PORT: u16 = 6443;
/// VM memory (the issue's bound: at most 1 GiB per VM).
pub const NODE_MEMORY_MIB: u32 = 1024;
/// The image every test boots.
pub const IMAGE: &str = "vm-node:v1";

/// One VM test at a time: under TCG a VM takes a whole core.
pub static ONE_VM_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a step may take: TCG is 10-50x slower than KVM.
pub fn patience(accel: Accel, kvm_seconds: u64) -> Duration {
    match accel {
        Accel::Kvm => Duration::from_secs(kvm_seconds),
        Accel::Tcg => Duration::from_secs(kvm_seconds * 10),
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Builds the node image v1 (with the kubelet) into `dir`.
pub fn build_node_image(dir: &Path) -> Result<PathBuf> {
    build_node_image_with(dir, Vec::new())
}

/// [`build_node_image`] with more container images baked in.
pub fn build_node_image_with(dir: &Path, extra_images: Vec<BakedImage>) -> Result<PathBuf> {
    let bootstrapper = workspace_binary(
        "confidential-bootstrapper",
        "confidential-bootstrapper",
        "CONFIDENTIAL_BOOTSTRAPPER",
    )?;
    let kubelet = confidential_testenv::binaries::ensure_kubelet()?;
    let kube_proxy = confidential_testenv::binaries::ensure_kube_proxy()?;
    let mut inputs = NodeImageInputs::node(bootstrapper, kubelet, kube_proxy)?;
    inputs
        .os
        .runtime
        .as_mut()
        .context("a node image has the node runtime")?
        .extra_images = extra_images;
    build(&"v1".parse::<ImageVersion>()?, &inputs, dir)
}

/// Waits until a gate re-verified `name`'s NodeAttestation (`Verified`
/// True with a `lastVerified` time), and returns that time.
pub async fn wait_reattested(
    client: &kube::Client,
    name: &str,
    timeout: Duration,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    let attestations = Api::<NodeAttestation>::all(client.clone());
    confidential_testenv::eventually(&format!("a gate to re-attest {name}"), timeout, || {
        let attestations = attestations.clone();
        let name = name.to_owned();
        async move {
            let status = attestations.get(&name).await?.status.unwrap_or_default();
            let verified = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Verified" && c.status == "True");
            Ok(status.last_verified.filter(|_| verified))
        }
    })
    .await
}

/// Whether a Node reports Ready.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until Node `name` is Ready while `vm` keeps running (fails at once
/// when QEMU or its vTPM stopped); the console is in the error.
pub async fn wait_node_ready(
    client: &kube::Client,
    vm: Vm,
    name: &str,
    timeout: Duration,
) -> Result<Vm> {
    let nodes = Api::<Node>::all(client.clone());
    let vm = std::sync::Arc::new(std::sync::Mutex::new(vm));
    let watched = vm.clone();
    let result =
        confidential_testenv::eventually(&format!("Node {name} to be Ready"), timeout, || {
            let nodes = nodes.clone();
            let name = name.to_owned();
            let running = watched
                .lock()
                .map_err(|_| anyhow::anyhow!("VM lock"))
                .and_then(|mut vm| vm.check_running());
            async move {
                running?;
                Ok(nodes.get_opt(&name).await?.filter(node_ready).map(|_| ()))
            }
        })
        .await;
    drop(watched);
    let vm = std::sync::Arc::try_unwrap(vm)
        .map_err(|_| anyhow::anyhow!("VM still shared"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("VM lock"))?;
    result.with_context(|| format!("console:\n{}", vm.console()))?;
    Ok(vm)
}

/// A copy of `uki` with one byte of its initramfs changed: the gzip
/// header's modification time, which the kernel's decompressor ignores, so
/// the tampered image still boots the same node OS and only the
/// measurements (PCRs 4, 9 and 11) tell it apart.
pub fn tamper_initramfs(uki: &Path, out: &Path) -> Result<()> {
    let mut bytes = std::fs::read(uki)?;
    let initrd = PeImage::parse(&bytes)?
        .sections()
        .iter()
        .find(|s| s.name == ".initrd")
        .cloned()
        .context("the UKI has no .initrd section")?;
    let offset = initrd.raw_offset as usize;
    if bytes.get(offset..offset + 2) != Some(&[0x1f, 0x8b][..]) {
        bail!("the .initrd section is not gzip");
    }
    bytes[offset + 4] ^= 0x01;
    std::fs::write(out, bytes)?;
    Ok(())
}

/// A cluster with the gate and the approver, trusting the node image.
pub struct NodeEnv {
    // Drop order: the gate before the control plane.
    gate: ManagedProcess,
    approver: tokio::task::JoinHandle<()>,
    pub cluster: TestCluster,
    pub ca: SwtpmCa,
    pub uki: PathBuf,
    pub gate_pin: String,
    /// The admin's local trust inputs for `kubectl confidential verify`:
    /// the signed measurement file and the publisher key (under `dir`).
    pub measurements: PathBuf,
    pub publisher_key: PathBuf,
    pub forwards: Vec<GuestForward>,
    pub accel: Accel,
    pub dir: tempfile::TempDir,
}

impl Drop for NodeEnv {
    fn drop(&mut self) {
        self.approver.abort();
        self.gate.stop(Duration::from_secs(5));
    }
}

impl NodeEnv {
    pub async fn start() -> Result<Self> {
        let accel = Accel::from_env()?;
        let dir = tempfile::Builder::new().prefix("vm-node-").tempdir()?;
        let image_dir = dir.path().to_owned();
        let uki = tokio::task::spawn_blocking(move || build_node_image(&image_dir)).await??;
        let predicted = predict_uki_boot(&std::fs::read(&uki)?)?.pcr_values();

        let cluster = TestCluster::start().await?;
        let client = cluster.client.clone();
        install_crds(&client, &crds_dir()).await?;
        allow_node_bootstrap(&client).await?;
        let cp = cluster
            .control_plane
            .as_ref()
            .context("the VM suite needs a private control plane")?;
        let api_port: u16 = cp
            .server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("API server port")?;

        // The local EK CA materialises with the first manufactured TPM.
        let ca = SwtpmCa::new()?;
        drop(Swtpm::start(&ca)?);
        // The policy pins every PCR predicted from the UKI file, signed by
        // the image's publisher: the shared fixtures, as every suite makes it.
        let publisher = Publisher::random("vm-publisher");
        let pcrs: Vec<(u8, [u8; 32], bool)> = predicted
            .iter()
            .map(|(pcr, value)| (*pcr, *value, false))
            .collect();
        let file = measurement_file(IMAGE, &pcrs);
        let policy = unique_name("vm-policy");
        let pool = unique_name("vm-pool");
        let policy_obj = AttestationPolicy::new(
            &policy,
            policy_spec(
                Some(&ca.issuer_pem()?),
                &[&publisher],
                vec![publisher.entry(&file)],
            ),
        );
        Api::<AttestationPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy_obj)
            .await?;
        let version: NodeVersion = serde_json::from_value(json!({
            "metadata": { "name": pool },
            "spec": { "image": IMAGE, "kubernetesVersion": "v1.35.4", "replicas": 1 }
        }))?;
        Api::<NodeVersion>::all(client.clone())
            .create(&PostParams::default(), &version)
            .await?;

        // The gate, as the binary runs in a cluster.
        let d = dir.path();
        let measurements = d.join("measurements.json");
        publisher.write_signed(&measurements, &file)?;
        let publisher_key = d.join("publisher.pub");
        publisher.write_public_key(&publisher_key)?;
        let master = d.join("master.json");
        std::fs::write(
            &master,
            json!({ "secret": "5a".repeat(32), "salt": hex::encode(b"vm-node-salt") }).to_string(),
        )?;
        std::fs::write(d.join("cluster-ca.crt"), &cp.ca_pem)?;
        let serving_ca = CertificateAuthority::new("vm-node-gate-ca")?;
        let serving = serving_ca.issue_server(
            "confidential-webhook",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        std::fs::write(d.join("gate.crt"), &serving.cert_pem)?;
        std::fs::write(d.join("gate.key"), &serving.key_pem)?;
        let webhook = workspace_binary(
            "confidential-webhook",
            "confidential-webhook",
            "CONFIDENTIAL_WEBHOOK_BIN",
        )?;
        let pin_out = Command::new(&webhook)
            .arg("gate-pin")
            .arg("--join-master-secret-file")
            .arg(&master)
            .output()?;
        if !pin_out.status.success() {
            bail!(
                "gate-pin failed: {}",
                String::from_utf8_lossy(&pin_out.stderr)
            );
        }
        let gate_pin = String::from_utf8(pin_out.stdout)?.trim().to_owned();
        let join_port = free_port()?;
        let mut cmd = Command::new(&webhook);
        cmd.arg(format!("--listen=127.0.0.1:{}", free_port()?))
            .arg(format!("--tls-cert={}", d.join("gate.crt").display()))
            .arg(format!("--tls-key={}", d.join("gate.key").display()))
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg(format!("--join-listen=127.0.0.1:{join_port}"))
            .arg(format!("--join-master-secret-file={}", master.display()))
            .arg(format!(
                "--join-api-server=https://{GUEST_HOST_IP}:{GUEST_API_PORT}"
            ))
            .arg(format!(
                "--join-ca-file={}",
                d.join("cluster-ca.crt").display()
            ))
            .arg(format!("--join-policy={policy}"))
            .arg(format!("--join-default-pool={pool}"))
            // Re-attestation dials each VM through its forwarded endpoint;
            // often, so a suite sees it, with room for TCG's slow guests.
            .arg("--reattest-period=15s")
            .arg("--reattest-timeout=60s");
        let mut gate = ManagedProcess::spawn("confidential-webhook", cmd, &d.join("gate.log"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", join_port)).is_err() {
            gate.check_running()?;
            if std::time::Instant::now() > deadline {
                bail!("the gate did not listen on {join_port} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The operator's kubelet CSR approver (approves only attested names).
        let approver = tokio::spawn(confidential_controllers::csr::run(
            client.clone(),
            confidential_controllers::metrics::Metrics::new(),
        ));
        Ok(Self {
            gate,
            approver,
            cluster,
            ca,
            uki,
            gate_pin,
            measurements,
            publisher_key,
            forwards: vec![
                GuestForward {
                    guest_port: GUEST_GATE_PORT,
                    host_port: join_port,
                },
                GuestForward {
                    guest_port: GUEST_API_PORT,
                    host_port: api_port,
                },
            ],
            accel,
            dir,
        })
    }

    /// The gate's log so far.
    pub fn gate_log(&self) -> String {
        std::fs::read_to_string(self.gate.log_path()).unwrap_or_default()
    }

    /// A node's launch configuration.
    pub fn node_config(&self, node: &str, disk_uuid: &str) -> String {
        format!(
            "CONFIDENTIAL_GATE_ENDPOINTS={GUEST_HOST_IP}:{GUEST_GATE_PORT}\n\
             CONFIDENTIAL_GATE_PIN={}\n\
             CONFIDENTIAL_NODE_NAME={node}\n\
             CONFIDENTIAL_DISK_UUID={disk_uuid}\n\
             CONFIDENTIAL_MAX_ATTEMPTS=3\n",
            self.gate_pin
        )
    }

    /// Boots `uki` as node `node` with these disks and vTPM state.
    pub fn boot(
        &self,
        uki: &Path,
        node: &str,
        disk_uuid: &str,
        disks: &[VmDisk],
        tpm_state: &Path,
    ) -> Result<Vm> {
        let options = VmOptions {
            memory_mib: NODE_MEMORY_MIB,
            forwards: self.forwards.clone(),
            disks: disks.to_vec(),
            tpm_state: Some(tpm_state.to_owned()),
            node_config: Some(self.node_config(node, disk_uuid)),
            attest_forward: true,
            network: None,
        };
        Vm::boot_with(&self.ca, uki, self.accel, &options)
    }

    /// A fresh state disk and machine disk under the env's directory.
    pub fn disks(&self, prefix: &str) -> Result<Vec<VmDisk>> {
        let d = self.dir.path();
        Ok(vec![
            VmDisk::blank(&d.join(format!("{prefix}-state.img")), 1024, "state")?,
            VmDisk::machine(&d.join(format!("{prefix}-machine.img")))?,
        ])
    }

    /// Waits for `needle` on the console of `vm` without blocking the
    /// runtime; fails early when the node says it stopped (an idle line of
    /// its init) unless that is what the caller waits for.
    pub async fn console(vm: Vm, needle: &str, timeout: Duration) -> Result<(Vm, Duration)> {
        let needle = needle.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut vm = vm;
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let step = Duration::from_secs(5).min(timeout);
                match vm.wait_for_console(&needle, step) {
                    Ok(at) => return Ok((vm, at)),
                    Err(e) if std::time::Instant::now() > deadline => return Err(e),
                    Err(_) => {}
                }
                let console = vm.console();
                if let Some(stopped) = STOPPED_MARKERS.iter().find(|m| console.contains(**m)) {
                    bail!("the node stopped ({stopped:?}) before {needle:?}; console:\n{console}");
                }
            }
        })
        .await?
    }

    /// Whether Node `name` exists.
    pub async fn node_exists(&self, name: &str) -> Result<bool> {
        Ok(Api::<Node>::all(self.cluster.client.clone())
            .get_opt(name)
            .await?
            .is_some())
    }
}

/// What the node's init prints when it gives up.
const STOPPED_MARKERS: &[&str] = &["; waiting\n", "the node stays down", "kubelet exited"];

/// The LUKS header version of a disk image, if it starts with one.
pub fn luks_version(disk: &Path) -> Result<Option<u16>> {
    use std::io::Read as _;
    let mut head = [0u8; 8];
    std::fs::File::open(disk)?.read_exact(&mut head)?;
    Ok((head[..6] == *b"LUKS\xba\xbe").then(|| u16::from_be_bytes([head[6], head[7]])))
}

/// The value after `key=` on the console line containing `marker`.
pub fn console_field(console: &str, marker: &str, key: &str) -> Option<String> {
    console
        .lines()
        .rev()
        .filter(|l| l.contains(marker))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{key}=")).map(str::to_owned))
        })
}

/// A fresh disk UUID.
pub fn disk_uuid() -> String {
    let bytes: [u8; 16] = rand_bytes();
    let h = hex::encode(bytes);
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn rand_bytes() -> [u8; 16] {
    use p256::elliptic_curve::rand_core::RngCore as _;
    let mut b = [0u8; 16];
    p256::elliptic_curve::rand_core::OsRng.fill_bytes(&mut b);
    b
}

/// A node name not used before.
pub fn node_name() -> String {
    unique_name("vm-node")
}
