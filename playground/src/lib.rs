//! The local playground: a confidential cluster on real components on one
//! machine. It starts only what a cloud would provide — the control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, from the
//! test environment) and machines (swtpm-backed simulated confidential
//! nodes, or QEMU VMs booting the node image: [`Machines`]) — and everything confidential is installed by the real
//! `kubectl confidential init` binary, exactly as on any cluster. No
//! kubelet runs our pods here, so `init` runs in its out-of-cluster mode
//! (`--gate-url`) and the playground's [`host`] does what a kubelet would:
//! it runs the gate (`confidential-webhook`) as a process from the Secrets
//! `init` created, keeps its certificate files in sync with them (so
//! `init --rotate-serving-cert` works here too), and runs the node operator
//! with the playground's machine provider.
//!
//! The playground writes the admin's trust material into its directory:
//! a publisher key and the signed measurement files of two node images
//! (`node-v1.json`, `node-v2.json` and their `.sig`; for VM machines
//! predicted from the UKIs of `cargo xtask node-image`, never read from a
//! booted VM), the swtpm EK CA, and `playground.env` with the addresses
//! `init` needs.

pub mod host;
pub mod node_images;
pub mod provider;
pub mod vm_provider;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::NodeVersion;
use confidential_testenv::fixtures::{Publisher, node_image_file};
use confidential_testenv::node::NodeImage;
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{ControlPlane, ControlPlaneOptions};
use kube::Client;
use kube::api::Api;

pub use provider::SwtpmProvider;
pub use vm_provider::QemuProvider;

/// What the playground's machines are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Machines {
    /// swtpm-backed processes: the real bootstrapper and the kubelet
    /// stand-in (fast; no firmware, no kernel).
    #[default]
    Process,
    /// QEMU VMs booting the node image under OVMF with a swtpm vTPM
    /// ([`vm_provider`]), on `accel`.
    Vm {
        accel: confidential_testenv::vm::Accel,
    },
}

/// The node images the playground's publisher signed measurements for.
pub const IMAGE_V1: &str = "registry.example/confidential-node:v1";
pub const IMAGE_V2: &str = "registry.example/confidential-node:v2";
/// Kubernetes version of the simulated kubelets.
pub const KUBERNETES_VERSION: &str = "v1.35.4";
/// Name of the policy and pool `init` creates.
pub const DEFAULT: &str = "default";

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Nodes in the default pool (passed to `init --replicas`).
    pub nodes: i32,
    /// `maxSurge` of the pool's rollouts (passed to `init --max-surge`).
    pub max_surge: i32,
    /// Directory for the trust material, `playground.env` and logs (a
    /// temporary one, removed at the end, when unset).
    pub dir: Option<PathBuf>,
    /// Run `kubectl confidential init` (else the user runs it, see
    /// [`Playground::init_args`]).
    pub init: bool,
    /// What the machines are.
    pub machines: Machines,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            max_surge: 1,
            dir: None,
            init: true,
            machines: Machines::Process,
        }
    }
}

/// The admin's local files the playground prepared.
#[derive(Clone, Debug)]
pub struct TrustFiles {
    pub measurements_v1: PathBuf,
    pub measurements_v2: PathBuf,
    pub publisher_key: PathBuf,
    pub ek_ca: PathBuf,
    pub master_secret: PathBuf,
    pub cluster_file: PathBuf,
}

/// A running playground; dropping it stops everything it started.
pub struct Playground {
    pub client: Client,
    pub files: TrustFiles,
    /// Where the API server calls the gate (`init --gate-url`).
    pub gate_url: String,
    /// Where machines reach the join endpoint (`init --join-exposure external=`).
    pub join_endpoint: String,
    pub dir: PathBuf,
    pub host: host::Host,
    _tempdir: Option<tempfile::TempDir>,
    /// Declared last: the control plane stops after everything using it.
    pub control_plane: ControlPlane,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The path of a binary of this workspace (built when missing).
pub fn plugin_binary() -> Result<PathBuf> {
    confidential_testenv::workspace_binary(
        "kubectl-confidential",
        "kubectl-confidential",
        "KUBECTL_CONFIDENTIAL_BIN",
    )
}

impl Playground {
    /// Starts the control plane, prepares the trust material, starts the
    /// component host and (with `options.init`) runs
    /// `kubectl confidential init`; nodes join in the background (see
    /// [`Playground::wait_for_pool`]).
    pub async fn start(options: Options) -> Result<Self> {
        let (tempdir, dir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                (None, dir.canonicalize()?)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("confidential-playground-")
                    .tempdir()?;
                let path = t.path().to_owned();
                (Some(t), path)
            }
        };
        let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
        let client = control_plane.client().await?;

        // The admin's trust: the swtpm EK CA (materialised by setting up
        // one TPM) and a publisher key that signed both images' measurements.
        let ca = Arc::new(tokio::task::spawn_blocking(SwtpmCa::new).await??);
        {
            let ca = ca.clone();
            tokio::task::spawn_blocking(move || Swtpm::start(&ca).map(drop)).await??;
        }
        let publisher = Publisher::random("playground");
        let files = TrustFiles {
            measurements_v1: dir.join("node-v1.json"),
            measurements_v2: dir.join("node-v2.json"),
            publisher_key: dir.join("publisher.pub"),
            ek_ca: dir.join("ek-ca.pem"),
            master_secret: dir.join("confidential-master-secret.json"),
            cluster_file: dir.join("confidential-cluster.json"),
        };
        if files.master_secret.exists() {
            bail!(
                "{} exists from an earlier run; use another --dir or remove it",
                files.master_secret.display()
            );
        }
        let images = match options.machines {
            Machines::Process => None,
            Machines::Vm { .. } => {
                Some(Arc::new(node_images::NodeImages::new(&dir.join("images"))?))
            }
        };
        // The measurement files, signed as `kubectl confidential measurements
        // sign` signs: for process machines as their simulated firmware
        // measures the images, for VMs predicted from the UKIs.
        for (path, image) in [
            (&files.measurements_v1, IMAGE_V1),
            (&files.measurements_v2, IMAGE_V2),
        ] {
            let file = match &images {
                None => node_image_file(&NodeImage::new(image)),
                Some(images) => {
                    let images = images.clone();
                    tokio::task::spawn_blocking(move || images.measurement_file(image)).await??
                }
            };
            publisher.write_signed(path, &file)?;
        }
        publisher.write_public_key(&files.publisher_key)?;
        write(&files.ek_ca, &ca.issuer_pem()?)?;

        let gate_url = format!("https://127.0.0.1:{}", free_port()?);
        let join_endpoint = format!("127.0.0.1:{}", free_port()?);
        let host = host::Host::start(host::HostConfig {
            client: client.clone(),
            kubeconfig: control_plane.kubeconfig.clone(),
            server: control_plane.server.clone(),
            cluster_ca_pem: control_plane.ca_pem.clone(),
            dir: dir.join("components"),
            gate_url: gate_url.clone(),
            join_endpoint: join_endpoint.clone(),
            ca,
            machines: match (options.machines, images) {
                (Machines::Vm { accel }, Some(images)) => host::HostMachines::Vm { accel, images },
                _ => host::HostMachines::Process,
            },
        })?;
        let playground = Self {
            client,
            files,
            gate_url,
            join_endpoint,
            dir,
            host,
            _tempdir: tempdir,
            control_plane,
        };
        playground.write_env(&options)?;
        if options.init {
            playground.run_init(&options).await?;
        }
        Ok(playground)
    }

    /// The arguments of `kubectl confidential init` for this playground.
    pub fn init_args(&self, options: &Options) -> Vec<String> {
        let f = &self.files;
        let p = |p: &Path| p.display().to_string();
        vec![
            "init".into(),
            format!("--gate-url={}", self.gate_url),
            format!("--join-exposure=external={}", self.join_endpoint),
            format!("--measurements={}", p(&f.measurements_v1)),
            format!("--measurements={}", p(&f.measurements_v2)),
            format!("--publisher-key={}", p(&f.publisher_key)),
            format!("--ek-ca={}", p(&f.ek_ca)),
            format!("--replicas={}", options.nodes),
            format!("--max-surge={}", options.max_surge),
            format!("--kubernetes-version={KUBERNETES_VERSION}"),
            format!("--master-secret-out={}", p(&f.master_secret)),
            format!("--cluster-file={}", p(&f.cluster_file)),
        ]
    }

    /// `playground.env`: what a shell (the tour) needs to drive the playground.
    fn write_env(&self, options: &Options) -> Result<()> {
        let kubectl = confidential_testenv::binaries::kubectl()?;
        let quoted = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let f = &self.files;
        let demo = node_images::demo_image()?;
        let machines = match options.machines {
            Machines::Process => "process",
            Machines::Vm { .. } => "vm",
        };
        let lines = [
            (
                "KUBECONFIG",
                self.control_plane.kubeconfig.display().to_string(),
            ),
            ("PLAYGROUND_DIR", self.dir.display().to_string()),
            ("PLAYGROUND_KUBECTL", kubectl.display().to_string()),
            ("PLAYGROUND_GATE_URL", self.gate_url.clone()),
            ("PLAYGROUND_JOIN_ENDPOINT", self.join_endpoint.clone()),
            (
                "PLAYGROUND_MEASUREMENTS_V1",
                f.measurements_v1.display().to_string(),
            ),
            (
                "PLAYGROUND_MEASUREMENTS_V2",
                f.measurements_v2.display().to_string(),
            ),
            (
                "PLAYGROUND_PUBLISHER_KEY",
                f.publisher_key.display().to_string(),
            ),
            ("PLAYGROUND_EK_CA", f.ek_ca.display().to_string()),
            (
                "PLAYGROUND_CLUSTER_FILE",
                f.cluster_file.display().to_string(),
            ),
            (
                "PLAYGROUND_MASTER_SECRET",
                f.master_secret.display().to_string(),
            ),
            ("PLAYGROUND_IMAGE_V1", IMAGE_V1.to_owned()),
            ("PLAYGROUND_IMAGE_V2", IMAGE_V2.to_owned()),
            ("PLAYGROUND_NODES", options.nodes.to_string()),
            ("PLAYGROUND_MACHINES", machines.to_owned()),
            // The demo workload baked into the node images: by digest (what
            // an Enforce ImagePolicy admits) and by tag (what it refuses).
            ("PLAYGROUND_DEMO_IMAGE", demo.digest_reference.clone()),
            ("PLAYGROUND_DEMO_DIGEST", demo.digest.clone()),
            ("PLAYGROUND_DEMO_IMAGE_TAG", demo.reference.clone()),
            (
                "PLAYGROUND_INIT_ARGS",
                self.init_args(options)[1..].join(" "),
            ),
        ];
        let text: String = lines
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", quoted(v)))
            .collect();
        // Written last and atomically: its presence means the playground is up.
        let tmp = self.dir.join(".playground.env.tmp");
        write(&tmp, &text)?;
        std::fs::rename(&tmp, self.dir.join("playground.env")).context("publishing playground.env")
    }

    /// Runs the real `kubectl confidential init` against this playground.
    async fn run_init(&self, options: &Options) -> Result<()> {
        let mut command = tokio::process::Command::new(plugin_binary()?);
        command
            .args(self.init_args(options))
            .env("KUBECONFIG", &self.control_plane.kubeconfig)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let status = command
            .status()
            .await
            .context("running kubectl-confidential init")?;
        if !status.success() {
            bail!("kubectl confidential init failed ({status}); see its output above");
        }
        Ok(())
    }

    /// Waits until the default pool reports `replicas` nodes up to date on
    /// `image` and no outdated ones, printing progress.
    pub async fn wait_for_pool(&self, image: &str, timeout: Duration) -> Result<()> {
        let pools: Api<NodeVersion> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let nv = pools.get(DEFAULT).await?;
            let s = nv.status.clone().unwrap_or_default();
            let line = format!(
                "pool {DEFAULT}: {}/{} up to date, {} outdated, {} pending",
                s.up_to_date_count,
                nv.spec.replicas,
                s.outdated_count,
                s.pending.len()
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
            if nv.spec.image == image
                && s.up_to_date_count == nv.spec.replicas
                && s.outdated_count == 0
                && s.observed_generation == nv.metadata.generation
                && !confidential_api::conditions::is_true(
                    &s.conditions,
                    confidential_api::conditions::types::ROLLOUT_PROGRESSING,
                )
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the pool did not reach {image} within {timeout:?} ({last})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Rolls the default pool to `image` with the real
    /// `kubectl confidential upgrade --image IMAGE --wait`.
    pub async fn upgrade(&self, image: &str) -> Result<()> {
        let status = tokio::process::Command::new(plugin_binary()?)
            .args(["upgrade", "--image", image, "--wait"])
            .env("KUBECONFIG", &self.control_plane.kubeconfig)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .context("running kubectl-confidential upgrade")?;
        if !status.success() {
            bail!("kubectl confidential upgrade --image {image} failed ({status})");
        }
        Ok(())
    }

    /// A `kubectl` command (the one built with the control plane) for this cluster.
    pub fn kubectl(&self) -> Result<Command> {
        let mut command = Command::new(confidential_testenv::binaries::kubectl()?);
        command.env("KUBECONFIG", &self.control_plane.kubeconfig);
        Ok(command)
    }
}
