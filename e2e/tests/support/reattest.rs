//! What the re-attestation suite and its benchmark share: a real control
//! plane with the CRDs, an AttestationPolicy trusting the swtpm EK CA and one
//! publisher-signed node image, a pool, the real gate binary
//! (`confidential-webhook` with its join listener and re-attestation), and
//! simulated nodes that join through the real bootstrapper and keep serving
//! `/v1/attest` on their own loopback address (`127.0.x.y`), which their
//! kubelet stand-in reports as the Node's `InternalIP`: exactly how the gate
//! finds a node in a cluster.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::{AttestationPolicy, NodeAttestation, NodeVersion};
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::node::{IMAGE_PCR, Kubelet, KubeletOptions, NodeImage, SimulatedNode};
use confidential_testenv::pki::CertificateAuthority;
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};
use confidential_testenv::{
    ManagedProcess, TestCluster, crds_dir, eventually, install_crds, unique_name,
};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Timing of the gate's re-attestation in an environment.
#[derive(Clone, Debug)]
pub struct Timing {
    pub period: &'static str,
    pub grace: &'static str,
    pub concurrency: usize,
}

/// A cluster with a policy, a pool and the real gate binary.
pub struct Env {
    pub ca: SwtpmCa,
    pub image: NodeImage,
    pub policy: String,
    pub pool: String,
    publisher: Publisher,
    pub join_addr: String,
    pub webhook_addr: String,
    /// Port every node serves `/v1/attest` on (each on its own address).
    pub attest_port: u16,
    /// The gate identity the nodes pin (derived from the master secret).
    pub gate_pin: [u8; 32],
    pub gate: ManagedProcess,
    gate_args: Vec<String>,
    dir: tempfile::TempDir,
    /// Declared last: stops after the gate.
    pub cluster: TestCluster,
}

/// One joined node: its TPM, the bootstrapper serving `/v1/attest`, its
/// kubelet stand-in (none in benchmarks that only need the endpoint).
pub struct JoinedNode {
    pub node: SimulatedNode,
    pub attest: ManagedProcess,
    pub ip: Ipv4Addr,
    pub kubelet: Option<Kubelet>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A loopback address of its own for node `index` (Linux routes all of
/// 127.0.0.0/8 to `lo`), distinct across the processes of one test run.
pub fn node_ip(index: u32) -> Ipv4Addr {
    let pid = std::process::id();
    let index = index + 1;
    Ipv4Addr::new(
        127,
        u8::try_from(pid % 200 + 20).unwrap_or(20),
        u8::try_from(index / 250).unwrap_or(0),
        u8::try_from(index % 250 + 1).unwrap_or(1),
    )
}

/// The policy spec trusting `image` with `pcr_value` at [`IMAGE_PCR`],
/// signed by `publisher`.
pub fn policy_spec(
    ca_pem: &str,
    publisher: &Publisher,
    image: &str,
    pcr_value: [u8; 32],
) -> Result<serde_json::Value> {
    let file = fixtures::measurement_file(image, &[(u8::try_from(IMAGE_PCR)?, pcr_value, false)]);
    Ok(serde_json::to_value(fixtures::policy_spec(
        Some(ca_pem),
        &[publisher],
        vec![publisher.entry(&file)],
    ))?)
}

impl Env {
    pub async fn start(timing: Timing) -> Result<Self> {
        let cluster = TestCluster::start().await?;
        let client = cluster.client.clone();
        install_crds(&client, &crds_dir()).await?;
        confidential_testenv::allow_node_bootstrap(&client).await?;
        let cp = cluster
            .control_plane
            .as_ref()
            .context("needs a private control plane (the gate runs as a local process)")?;

        let ca = SwtpmCa::new()?;
        drop(Swtpm::start(&ca)?);
        let image = NodeImage::new(&unique_name("node-image"));
        let publisher = Publisher::random("test-publisher");
        let policy = unique_name("policy");
        let pool = unique_name("pool");
        let spec = policy_spec(
            &ca.issuer_pem()?,
            &publisher,
            &image.name,
            image.expected_pcr(),
        )?;
        let policy_obj: AttestationPolicy =
            serde_json::from_value(json!({ "metadata": { "name": policy }, "spec": spec }))?;
        Api::<AttestationPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy_obj)
            .await?;
        let version: NodeVersion = serde_json::from_value(json!({
            "metadata": { "name": pool },
            "spec": { "image": image.name, "kubernetesVersion": "v1.35.0", "replicas": 1 }
        }))?;
        Api::<NodeVersion>::all(client.clone())
            .create(&PostParams::default(), &version)
            .await?;

        // The gate binary: serving certificate, master secret, cluster CA.
        let dir = tempfile::Builder::new()
            .prefix("reattest-gate-")
            .tempdir()?;
        let d = dir.path();
        let serving_ca = CertificateAuthority::new("reattest-test-gate-ca")?;
        let serving = serving_ca.issue_server(
            "confidential-webhook",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        std::fs::write(d.join("tls.crt"), &serving.cert_pem)?;
        std::fs::write(d.join("tls.key"), &serving.key_pem)?;
        let (secret, salt) = ([0x42u8; 32], b"reattest-salt");
        std::fs::write(
            d.join("master-secret.json"),
            json!({ "secret": hex::encode(secret), "salt": hex::encode(salt) }).to_string(),
        )?;
        let gate_pin = confidential_attestation::atls::GateIdentity::derive(
            &confidential_attestation::kdf::MasterSecret::new(secret.to_vec(), salt.to_vec())?,
        )?
        .pin();
        std::fs::write(d.join("cluster-ca.crt"), &cp.ca_pem)?;
        let (webhook_port, join_port, attest_port) = (free_port()?, free_port()?, free_port()?);
        let gate_args: Vec<String> = vec![
            format!("--listen=127.0.0.1:{webhook_port}"),
            format!("--tls-cert={}", d.join("tls.crt").display()),
            format!("--tls-key={}", d.join("tls.key").display()),
            format!("--kubeconfig={}", cp.kubeconfig.display()),
            format!("--join-listen=127.0.0.1:{join_port}"),
            format!(
                "--join-master-secret-file={}",
                d.join("master-secret.json").display()
            ),
            format!("--join-api-server={}", cp.server),
            format!("--join-ca-file={}", d.join("cluster-ca.crt").display()),
            format!("--join-policy={policy}"),
            format!("--join-default-pool={pool}"),
            format!("--reattest-period={}", timing.period),
            format!("--reattest-grace={}", timing.grace),
            format!("--reattest-port={attest_port}"),
            format!("--reattest-concurrency={}", timing.concurrency),
            "--reattest-timeout=5s".to_owned(),
            // Every machine of these suites joins from 127.0.0.1.
            "--join-attempts-burst=1000".to_owned(),
            "--join-attempts-per-minute=6000".to_owned(),
        ];
        let mut command = std::process::Command::new(gate_binary()?);
        command
            .env("RUST_LOG", "info,confidential_webhook::reattest=debug")
            .args(&gate_args);
        let gate = ManagedProcess::spawn("confidential-webhook", command, &d.join("gate.log"))?;
        let join_addr = format!("127.0.0.1:{join_port}");
        let mut env = Self {
            ca,
            image,
            policy,
            pool,
            publisher,
            join_addr,
            webhook_addr: format!("127.0.0.1:{webhook_port}"),
            attest_port,
            gate_pin,
            gate,
            gate_args,
            dir,
            cluster,
        };
        env.wait_for_gate().await?;
        Ok(env)
    }

    async fn wait_for_gate(&mut self) -> Result<()> {
        let gate = &mut self.gate;
        let addr = self.join_addr.clone();
        eventually("the gate's join listener", Duration::from_secs(60), || {
            let running = gate.check_running();
            let addr = addr.clone();
            async move {
                running?;
                Ok(tokio::net::TcpStream::connect(&addr).await.ok().map(drop))
            }
        })
        .await
    }

    /// Stops the gate and starts it again with `--reattest-period` set to
    /// `period` (same ports, same cluster), logging to `log_name`; a fresh
    /// process sweeps within a few seconds of starting.
    pub async fn restart_gate(&mut self, period: &str, log_name: &str) -> Result<()> {
        self.gate.stop(Duration::from_secs(5));
        let mut command = std::process::Command::new(gate_binary()?);
        command.env("RUST_LOG", "info");
        for arg in &self.gate_args {
            if arg.starts_with("--reattest-period=") {
                command.arg(format!("--reattest-period={period}"));
            } else {
                command.arg(arg);
            }
        }
        self.gate = ManagedProcess::spawn(
            "confidential-webhook",
            command,
            &self.dir.path().join(log_name),
        )?;
        self.wait_for_gate().await
    }

    pub fn client(&self) -> Client {
        self.cluster.client.clone()
    }

    /// Boots a machine running the trusted image, joins it through the real
    /// bootstrapper, which then serves `/v1/attest` on `ip`; with `kubelet`,
    /// its kubelet stand-in registers the Node with `ip` as InternalIP.
    pub async fn join(&self, name: &str, ip: Ipv4Addr, kubelet: bool) -> Result<JoinedNode> {
        let node = SimulatedNode::boot(&self.ca, name, &self.image, self.gate_pin)?;
        let listen = format!("{ip}:{}", self.attest_port);
        let mut attest = node.spawn_bootstrapper(
            std::slice::from_ref(&self.join_addr),
            &["--pcrs", "4,15", "--attest-listen", &listen],
        )?;
        eventually(
            &format!("{name} to join and serve /v1/attest on {listen}"),
            Duration::from_secs(120),
            || {
                let running = attest.check_running();
                let listen = listen.clone();
                async move {
                    running?;
                    Ok(tokio::net::TcpStream::connect(&listen).await.ok().map(drop))
                }
            },
        )
        .await?;
        let kubelet = if kubelet {
            let admin = self.client();
            let options = KubeletOptions {
                internal_ip: Some(IpAddr::V4(ip)),
                ..Default::default()
            };
            Some(
                node.start_kubelet_with(&options, |csr| async move { approve(&admin, &csr).await })
                    .await?,
            )
        } else {
            None
        };
        Ok(JoinedNode {
            node,
            attest,
            ip,
            kubelet,
        })
    }

    /// Changes the trusted value of the image's PCR (re-signed by the
    /// trusted publisher), as an admin does when a measurement is no
    /// longer trusted.
    pub async fn distrust_image_pcr(&self) -> Result<()> {
        let spec = policy_spec(
            &self.ca.issuer_pem()?,
            &self.publisher,
            &self.image.name,
            NodeImage::new("a-newer-image-release").expected_pcr(),
        )?;
        Api::<AttestationPolicy>::all(self.client())
            .patch(
                &self.policy,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    pub async fn attestation(&self, name: &str) -> Result<NodeAttestation> {
        Ok(Api::<NodeAttestation>::all(self.client()).get(name).await?)
    }

    /// Waits until `check` holds for the NodeAttestation `name`.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&NodeAttestation) -> bool,
    ) -> Result<NodeAttestation> {
        let api = Api::<NodeAttestation>::all(self.client());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let att = api.get(name).await?;
            if check(&att) {
                return Ok(att);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; NodeAttestation {name} is {:?} with status {:?}\ngate log:\n{}",
                    att.spec.verdict,
                    att.status,
                    self.gate.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for an Event with `reason` about `kind`/`name` (they live in
    /// `default`, as for every cluster-scoped object); returns the reasons
    /// of all Events about it.
    pub async fn wait_for_events(
        &self,
        kind: &str,
        name: &str,
        reason: &str,
    ) -> Result<Vec<String>> {
        let api = Api::<Event>::namespaced(self.client(), "default");
        eventually(
            &format!("an Event {reason} about {kind} {name}"),
            Duration::from_secs(60),
            || {
                let api = api.clone();
                async move {
                    let reasons: Vec<String> = api
                        .list(&ListParams::default())
                        .await?
                        .items
                        .into_iter()
                        .filter(|e| {
                            e.regarding.as_ref().is_some_and(|r| {
                                r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name)
                            })
                        })
                        .filter_map(|e| e.reason)
                        .collect();
                    Ok(reasons.iter().any(|r| r == reason).then_some(reasons))
                }
            },
        )
        .await
    }

    /// The gate's `/metrics` text (over HTTPS, the gate's own serving CA).
    pub fn metrics(&self) -> Result<String> {
        let out = std::process::Command::new("curl")
            .args(["-sk", "--max-time", "10"])
            .arg(format!("https://{}/metrics", self.webhook_addr))
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!(
                "curl /metrics failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// CPU seconds (user + system) the gate process used so far.
    pub fn gate_cpu_seconds(&self) -> Result<f64> {
        let pid = self.gate.pid().context("the gate is not running")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command (which may hold spaces) start after ')'.
        let rest = stat.rsplit_once(')').context("unexpected /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11).context("no utime")?.parse()?;
        let stime: f64 = fields.get(12).context("no stime")?.parse()?;
        Ok((utime + stime) / clock_ticks()?)
    }
}

fn clock_ticks() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf")?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// The gate binary (`$CONFIDENTIAL_WEBHOOK_BIN`, else the workspace's).
pub fn gate_binary() -> Result<PathBuf> {
    confidential_testenv::workspace_binary(
        "confidential-webhook",
        "confidential-webhook",
        "CONFIDENTIAL_WEBHOOK_BIN",
    )
}

/// Approves a CSR as the test's stand-in for the controllers' approver.
pub async fn approve(client: &Client, csr: &str) -> Result<()> {
    let approval = json!({ "status": { "conditions": [{
        "type": "Approved", "status": "True", "reason": "TestApproved", "message": "approved by the re-attestation test"
    }]}});
    Api::<CertificateSigningRequest>::all(client.clone())
        .patch_approval(csr, &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    Ok(())
}
