//! What a kubelet would do for our components, where no kubelet runs them:
//! once `kubectl confidential init` created the gate's Secrets (master
//! secret, serving certificate), the host writes them to files as a Secret
//! volume would, starts the gate (`confidential-webhook`) on the address
//! `init --gate-url` named, keeps the certificate files in sync (the gate
//! reloads them, so a rotation by `init --rotate-serving-cert` takes effect
//! without a restart), and runs the node operator with the playground's
//! machine provider (swtpm processes, or QEMU VMs), whose machines pin the
//! gate key derived from that master secret.
//!
//! VM machines reach the host only through QEMU's guest forwards
//! (`10.0.2.100:PORT` to the host's `127.0.0.1:PORT`), for exactly two
//! ports: the gate's join endpoint and the API server; so the gate hands
//! them the API server at its guest-visible address.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_attestation::atls::GateIdentity;
use confidential_attestation::kdf::MasterSecret;
use confidential_controllers::metrics::Metrics;
use confidential_controllers::reconciler::Settings;
use confidential_testenv::ManagedProcess;
use confidential_testenv::swtpm::SwtpmCa;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

use crate::node_images::NodeImages;
use crate::provider::SwtpmProvider;
use crate::vm_provider::{LaunchConfig, QemuProvider};
use confidential_controllers::provider::Provider;
use confidential_testenv::vm::{Accel, GUEST_HOST_IP, GuestForward};

/// Names `init` gives the gate's Secrets (see `manifests/webhook/deployment.yaml`).
const NAMESPACE: &str = confidential_api::keys::NAMESPACE;
const MASTER_SECRET: &str = "confidential-master-secret";
const MASTER_SECRET_KEY: &str = "master-secret.json";
const TLS_SECRET: &str = "confidential-webhook-tls";
/// How often the Secrets are read, as a kubelet syncs Secret volumes.
const SYNC: Duration = Duration::from_secs(1);

/// Where and how the host runs the components.
pub struct HostConfig {
    pub client: Client,
    pub kubeconfig: PathBuf,
    /// API server URL handed to joining nodes.
    pub server: String,
    pub cluster_ca_pem: String,
    /// Directory of the components' files and logs.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`: the gate's admission listener.
    pub gate_url: String,
    /// `127.0.0.1:PORT`: the gate's join listener.
    pub join_endpoint: String,
    pub ca: Arc<SwtpmCa>,
    /// What the operator's machines are.
    pub machines: HostMachines,
}

/// The machines the operator creates.
pub enum HostMachines {
    /// [`SwtpmProvider`]: processes.
    Process,
    /// [`QemuProvider`]: VMs booting `images` on `accel`.
    Vm {
        accel: Accel,
        images: Arc<NodeImages>,
    },
}

/// The running provider.
#[derive(Clone)]
pub enum HostProvider {
    Process(Arc<SwtpmProvider>),
    Vm(Arc<QemuProvider>),
}

/// The port of a `host:port` or `https://host:port` address.
fn port_of(address: &str) -> Result<u16> {
    address
        .trim_end_matches('/')
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .with_context(|| format!("{address} has no port"))
}

/// The guest forwards of VM machines: the join endpoint and the API server,
/// each on the same port number as on the host.
fn vm_forwards(config: &HostConfig) -> Result<Vec<GuestForward>> {
    [config.join_endpoint.as_str(), config.server.as_str()]
        .into_iter()
        .map(|address| {
            let port = port_of(address)?;
            Ok(GuestForward {
                guest_port: port,
                host_port: port,
            })
        })
        .collect()
}

#[derive(Default)]
struct Running {
    gate: Option<ManagedProcess>,
    operator: Option<tokio::task::JoinHandle<()>>,
    provider: Option<HostProvider>,
    reporter: Option<tokio::task::JoinHandle<()>>,
    last_error: Option<String>,
}

/// The running host; dropping it stops the gate and the operator.
pub struct Host {
    task: tokio::task::JoinHandle<()>,
    running: Arc<Mutex<Running>>,
}

fn lock(m: &Mutex<Running>) -> MutexGuard<'_, Running> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `bytes` to `path` (mode 0600) when they differ from what it holds,
/// atomically, as the kubelet updates a Secret volume.
fn sync_file(path: &Path, bytes: &[u8]) -> Result<bool> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if std::fs::read(path).is_ok_and(|current| current == bytes) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

/// The gate key every replica derives from the master-secret file's bytes.
fn gate_pin(master_json: &[u8]) -> Result<[u8; 32]> {
    #[derive(serde::Deserialize)]
    struct File {
        secret: String,
        salt: String,
    }
    let file: File = serde_json::from_slice(master_json).context("parsing the master secret")?;
    let master = MasterSecret::new(hex::decode(file.secret)?, hex::decode(file.salt)?)?;
    Ok(GateIdentity::derive(&master)?.pin())
}

impl Host {
    pub fn start(config: HostConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("creating {}", config.dir.display()))?;
        std::fs::write(config.dir.join("cluster-ca.crt"), &config.cluster_ca_pem)?;
        let running = Arc::new(Mutex::new(Running::default()));
        let task = tokio::spawn({
            let running = running.clone();
            async move {
                loop {
                    let result = sync(&config, &running).await;
                    {
                        let mut state = lock(&running);
                        match result {
                            Ok(()) => state.last_error = None,
                            Err(err) => {
                                let text = format!("{err:#}");
                                if state.last_error.as_deref() != Some(text.as_str()) {
                                    tracing::warn!(error = %text, "playground host");
                                    state.last_error = Some(text);
                                }
                            }
                        }
                    }
                    tokio::time::sleep(SYNC).await;
                }
            }
        });
        Ok(Self { task, running })
    }

    /// The machine provider, once the operator runs.
    pub fn provider(&self) -> Option<HostProvider> {
        lock(&self.running).provider.clone()
    }

    /// Whether the gate process was started.
    pub fn gate_started(&self) -> bool {
        lock(&self.running).gate.is_some()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.task.abort();
        let mut state = lock(&self.running);
        if let Some(operator) = state.operator.take() {
            operator.abort();
        }
        if let Some(reporter) = state.reporter.take() {
            reporter.abort();
        }
        // Dropping the machines stops their kubelets, bootstrappers and
        // TPMs; VMs are stopped here, whoever else still holds the provider
        // (the aborted operator task may not have been dropped yet).
        if let Some(HostProvider::Vm(provider)) = state.provider.take() {
            provider.shutdown();
        }
        if let Some(mut gate) = state.gate.take() {
            gate.stop(Duration::from_secs(5));
        }
    }
}

async fn sync(config: &HostConfig, running: &Mutex<Running>) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(config.client.clone(), NAMESPACE);
    let Some(master) = secrets.get_opt(MASTER_SECRET).await? else {
        return Ok(());
    };
    let Some(tls) = secrets.get_opt(TLS_SECRET).await? else {
        return Ok(());
    };
    let master_json = data(&master, MASTER_SECRET_KEY)
        .with_context(|| format!("Secret {MASTER_SECRET} has no {MASTER_SECRET_KEY}"))?;
    let d = &config.dir;
    sync_file(&d.join("master-secret.json"), master_json)?;
    let (Some(cert), Some(key)) = (data(&tls, "tls.crt"), data(&tls, "tls.key")) else {
        return Ok(());
    };
    // Key first: the gate reloads when the certificate changes.
    sync_file(&d.join("tls.key"), key)?;
    if sync_file(&d.join("tls.crt"), cert)? && lock(running).gate.is_some() {
        tracing::info!(
            "playground host: the gate's serving certificate changed; the gate reloads it"
        );
    }
    let mut state = lock(running);
    if let Some(gate) = state.gate.as_mut() {
        gate.check_running()
            .context("the gate (confidential-webhook) stopped")?;
    } else {
        state.gate = Some(spawn_gate(config)?);
        tracing::info!(url = %config.gate_url, join = %config.join_endpoint, "playground host: started the gate");
    }
    if state.operator.is_none() {
        let pin = gate_pin(master_json)?;
        let (provider, operated): (HostProvider, Arc<dyn Provider>) = match &config.machines {
            HostMachines::Process => {
                let provider = Arc::new(SwtpmProvider::new(
                    config.ca.clone(),
                    vec![config.join_endpoint.clone()],
                    pin,
                ));
                (HostProvider::Process(provider.clone()), provider)
            }
            HostMachines::Vm { accel, images } => {
                let launch = LaunchConfig {
                    gate_endpoints: vec![format!(
                        "{GUEST_HOST_IP}:{}",
                        port_of(&config.join_endpoint)?
                    )],
                    gate_pin: pin,
                    forwards: vm_forwards(config)?,
                };
                let provider = Arc::new(QemuProvider::new(
                    config.ca.clone(),
                    images.clone(),
                    launch,
                    *accel,
                    &config.dir.join("machines"),
                )?);
                state.reporter = Some(provider.report_to(config.client.clone()));
                (HostProvider::Vm(provider.clone()), provider)
            }
        };
        state.operator = Some(tokio::spawn(confidential_controllers::operator::run(
            config.client.clone(),
            operated,
            Metrics::new(),
            Settings::default(),
            None,
        )));
        state.provider = Some(provider);
        tracing::info!("playground host: started the node operator");
    }
    Ok(())
}

/// The API server URL the gate hands joining machines: VMs reach it at the
/// guest-visible address of its forward.
fn nodes_api_server(config: &HostConfig) -> Result<String> {
    Ok(match config.machines {
        HostMachines::Process => config.server.clone(),
        HostMachines::Vm { .. } => {
            format!("https://{GUEST_HOST_IP}:{}", port_of(&config.server)?)
        }
    })
}

fn spawn_gate(config: &HostConfig) -> Result<ManagedProcess> {
    let d = &config.dir;
    let listen = config
        .gate_url
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let mut gate = Command::new(confidential_testenv::workspace_binary(
        "confidential-webhook",
        "confidential-webhook",
        "CONFIDENTIAL_WEBHOOK_BIN",
    )?);
    gate.env("RUST_LOG", "info")
        .arg(format!("--listen={listen}"))
        .arg(format!("--tls-cert={}", d.join("tls.crt").display()))
        .arg(format!("--tls-key={}", d.join("tls.key").display()))
        .arg("--tls-reload-interval=1s")
        .arg(format!("--kubeconfig={}", config.kubeconfig.display()))
        .arg(format!("--join-listen={}", config.join_endpoint))
        .arg(format!(
            "--join-master-secret-file={}",
            d.join("master-secret.json").display()
        ))
        .arg(format!("--join-api-server={}", nodes_api_server(config)?))
        .arg(format!(
            "--join-ca-file={}",
            d.join("cluster-ca.crt").display()
        ))
        .arg(format!("--join-policy={}", crate::DEFAULT))
        .arg(format!("--join-default-pool={}", crate::DEFAULT));
    ManagedProcess::spawn("confidential-webhook", gate, &d.join("gate.log"))
}
