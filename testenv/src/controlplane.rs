//! Starting and stopping a real control plane on loopback.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kube::Client;

use crate::binaries::{self, Binaries};
use crate::pki::{CertifiedKey, ControlPlanePki};
use crate::process::ManagedProcess;

/// Options of a control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Extra `--flag=value` arguments for kube-apiserver.
    pub apiserver_args: Vec<String>,
    /// How long to wait for readiness.
    pub ready_timeout: Duration,
    /// The host's address on a VM network ([`crate::vm::VmNetwork`]), for
    /// nodes and their host-network pods: the API server also listens there
    /// (it binds every address), advertises it as the `kubernetes`
    /// Service's endpoint, names it in its serving certificate, and calls
    /// webhooks at their Service's endpoints (`--enable-aggregator-routing`),
    /// as an API server outside the Service network must: no ClusterIP is
    /// routed on this host; and it reaches kubelets at their InternalIP with
    /// a client certificate of the cluster CA (`kubectl logs`, `exec`).
    pub node_network: Option<std::net::Ipv4Addr>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            apiserver_args: Vec::new(),
            ready_timeout: Duration::from_secs(90),
            node_network: None,
        }
    }
}

/// A running control plane: etcd, kube-apiserver, kube-controller-manager and
/// kube-scheduler, each on free loopback ports, with their own directory.
/// Dropping it stops exactly these processes and removes the directory (kept,
/// and its path printed, when a test panics).
pub struct ControlPlane {
    // Field order is drop order: stop the consumers before etcd.
    processes: Vec<ManagedProcess>,
    dir: Option<tempfile::TempDir>,
    /// `https://127.0.0.1:<port>` of the API server.
    pub server: String,
    /// PEM of the cluster CA (serving and client certificates).
    pub ca_pem: String,
    /// The CA key, for tests that must sign (e.g. a webhook serving cert).
    pub ca_key_pem: String,
    /// Path of the admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Time from `start` to ready.
    pub startup: Duration,
}

/// A loopback port free right now (a parallel test may take it first).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Renders a kubeconfig for a client certificate.
pub fn client_kubeconfig(server: &str, ca_pem: &str, user: &str, client: &CertifiedKey) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\n\
         contexts:\n- name: testenv\n  context:\n    cluster: testenv\n    user: {user}\ncurrent-context: testenv\n",
        ca = B64.encode(ca_pem),
        cert = B64.encode(&client.cert_pem),
        key = B64.encode(&client.key_pem),
    )
}

/// Renders a kubeconfig for a bearer token (bootstrap tokens, service accounts).
pub fn token_kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: testenv\n  context:\n    cluster: testenv\n    user: {user}\ncurrent-context: testenv\n",
        ca = B64.encode(ca_pem),
    )
}

impl ControlPlane {
    /// Builds or finds the binaries, then starts a control plane.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self> {
        let binaries = tokio::task::spawn_blocking(binaries::ensure).await??;
        // A port picked as free may be taken by a parallel test before the
        // server binds it; retry the whole start a few times.
        let mut last = None;
        for _ in 0..3 {
            match Self::start_with(&binaries, &options).await {
                Ok(cp) => return Ok(cp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("control plane did not start")))
    }

    async fn start_with(bin: &Binaries, options: &ControlPlaneOptions) -> Result<Self> {
        let begun = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("confidential-testenv-")
            .tempdir()
            .context("creating control-plane dir")?;
        let root = dir.path().to_owned();
        let extra_ips: Vec<std::net::IpAddr> =
            options.node_network.into_iter().map(Into::into).collect();
        let pki = ControlPlanePki::generate_with(&extra_ips)?;
        let p = |name: &str| root.join(name);
        write(&p("ca.crt"), &pki.ca.cert.cert_pem)?;
        write(&p("ca.key"), &pki.ca.cert.key_pem)?;
        write(&p("apiserver.crt"), &pki.apiserver.cert_pem)?;
        write(&p("apiserver.key"), &pki.apiserver.key_pem)?;
        write(&p("kubelet-client.crt"), &pki.kubelet_client.cert_pem)?;
        write(&p("kubelet-client.key"), &pki.kubelet_client.key_pem)?;
        write(&p("sa.key"), &pki.service_account_key)?;
        write(&p("sa.pub"), &pki.service_account_pub)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let server = format!("https://127.0.0.1:{api_port}");

        let mut cp = ControlPlane {
            processes: Vec::new(),
            dir: Some(dir),
            server: server.clone(),
            ca_pem: pki.ca.cert.cert_pem.clone(),
            ca_key_pem: pki.ca.cert.key_pem.clone(),
            kubeconfig: p("admin.kubeconfig"),
            startup: Duration::ZERO,
        };

        let mut etcd = Command::new(&bin.etcd);
        etcd.arg("--name=testenv")
            .arg(format!("--data-dir={}", p("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!(
                "--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"
            ))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=testenv=http://127.0.0.1:{etcd_peer_port}"
            ))
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        cp.processes
            .push(ManagedProcess::spawn("etcd", etcd, &p("etcd.log"))?);
        cp.wait_for_etcd(etcd_port, options.ready_timeout).await?;

        let mut apiserver = Command::new(&bin.kube_apiserver);
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .args(match options.node_network {
                None => vec![
                    "--bind-address=127.0.0.1".to_owned(),
                    "--advertise-address=127.0.0.1".to_owned(),
                ],
                Some(address) => vec![
                    "--bind-address=0.0.0.0".to_owned(),
                    format!("--advertise-address={address}"),
                    "--enable-aggregator-routing=true".to_owned(),
                    // Logs, exec and port-forward reach a node's kubelet at
                    // its address, with a client certificate it trusts.
                    "--kubelet-preferred-address-types=InternalIP,Hostname".to_owned(),
                    format!(
                        "--kubelet-client-certificate={}",
                        p("kubelet-client.crt").display()
                    ),
                    format!("--kubelet-client-key={}", p("kubelet-client.key").display()),
                ],
            })
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--cert-dir={}", p("apiserver-certs").display()))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt").display()))
            .arg(format!(
                "--tls-private-key-file={}",
                p("apiserver.key").display()
            ))
            .arg(format!("--client-ca-file={}", p("ca.crt").display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--enable-bootstrap-token-auth=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                p("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key").display()
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--max-requests-inflight=1000")
            .arg("--max-mutating-requests-inflight=500")
            .args(&options.apiserver_args);
        cp.processes.push(ManagedProcess::spawn(
            "kube-apiserver",
            apiserver,
            &p("kube-apiserver.log"),
        )?);

        write(
            &cp.kubeconfig,
            &client_kubeconfig(&server, &cp.ca_pem, "admin", &pki.admin),
        )?;
        write(
            &p("controller-manager.kubeconfig"),
            &client_kubeconfig(
                &server,
                &cp.ca_pem,
                "system:kube-controller-manager",
                &pki.controller_manager,
            ),
        )?;
        write(
            &p("scheduler.kubeconfig"),
            &client_kubeconfig(&server, &cp.ca_pem, "system:kube-scheduler", &pki.scheduler),
        )?;
        let client = cp.client().await?;
        cp.wait_for_readyz(&client, options.ready_timeout).await?;

        let mut kcm = Command::new(&bin.kube_controller_manager);
        kcm.arg(format!(
            "--kubeconfig={}",
            p("controller-manager.kubeconfig").display()
        ))
        .arg(format!(
            "--authentication-kubeconfig={}",
            p("controller-manager.kubeconfig").display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            p("controller-manager.kubeconfig").display()
        ))
        .arg("--secure-port=0")
        .arg("--leader-elect=false")
        .arg("--controllers=*,bootstrapsigner,tokencleaner")
        .arg(format!(
            "--cluster-signing-cert-file={}",
            p("ca.crt").display()
        ))
        .arg(format!(
            "--cluster-signing-key-file={}",
            p("ca.key").display()
        ))
        .arg(format!("--root-ca-file={}", p("ca.crt").display()))
        .arg(format!(
            "--service-account-private-key-file={}",
            p("sa.key").display()
        ))
        .arg("--use-service-account-credentials=true")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--kube-api-qps=200")
        .arg("--kube-api-burst=400");
        cp.processes.push(ManagedProcess::spawn(
            "kube-controller-manager",
            kcm,
            &p("kube-controller-manager.log"),
        )?);

        let mut scheduler = Command::new(&bin.kube_scheduler);
        scheduler
            .arg(format!(
                "--kubeconfig={}",
                p("scheduler.kubeconfig").display()
            ))
            .arg(format!(
                "--authentication-kubeconfig={}",
                p("scheduler.kubeconfig").display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                p("scheduler.kubeconfig").display()
            ))
            .arg("--secure-port=0")
            .arg("--leader-elect=false");
        cp.processes.push(ManagedProcess::spawn(
            "kube-scheduler",
            scheduler,
            &p("kube-scheduler.log"),
        )?);

        cp.wait_for_controllers(&client, options.ready_timeout)
            .await?;
        cp.startup = begun.elapsed();
        Ok(cp)
    }

    /// A client authenticated as cluster admin (`system:masters`).
    pub async fn client(&self) -> Result<Client> {
        crate::client_from_kubeconfig(&self.kubeconfig).await
    }

    /// The control plane's working directory (certificates, logs, kubeconfigs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("."), |d| d.path())
    }

    /// The started processes (for pids and logs).
    pub fn processes(&self) -> &[ManagedProcess] {
        &self.processes
    }

    /// Fails if any process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.processes
            .iter_mut()
            .try_for_each(ManagedProcess::check_running)
    }

    async fn wait_for_etcd(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not listen on port {port} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_readyz(&mut self, client: &Client, timeout: Duration) -> Result<()> {
        use tracing::instrument::WithSubscriber as _;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let req = http::Request::get("/readyz").body(Vec::new())?;
            // Refused connections and 500s are what a starting API server
            // answers; kube's client logs each at ERROR, which reads as a
            // failure to a newcomer. This probe's own requests log nothing.
            let probe = client
                .request_text(req)
                .with_subscriber(tracing::subscriber::NoSubscriber::default());
            match probe.await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("kube-apiserver not ready within {timeout:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until the controller-manager acts: its service-account controller
    /// creates `default/default`.
    async fn wait_for_controllers(&mut self, client: &Client, timeout: Duration) -> Result<()> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        use tracing::instrument::WithSubscriber as _;
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), "default");
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let probe = accounts
                .get_opt("default")
                .with_subscriber(tracing::subscriber::NoSubscriber::default());
            if probe.await.ok().flatten().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default service account within {timeout:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(mut process) = self.processes.pop() {
            process.stop(Duration::from_secs(5));
            drop(process);
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "testenv: control-plane dir kept for inspection: {}",
                kept.display()
            );
        }
    }
}
