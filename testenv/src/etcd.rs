//! A multi-member etcd on loopback, for tests of control-plane pools: each
//! member is the real etcd binary of the cached control-plane build, on its
//! own free client and peer ports, with its own data directory, and with
//! mutual TLS on both the client and the peer URLs from freshly generated
//! PKI (one etcd CA; a certificate per member that serves and peers; a
//! client certificate for the operator).
//!
//! Members are named like the control-plane nodes they belong to. A joining
//! member is started in two steps, as a joining control-plane machine does:
//! [`EtcdCluster::reserve`] picks its ports (so the caller can add the member
//! through etcd's API with its peer URL), then [`EtcdCluster::join`] starts
//! it with `--initial-cluster-state=existing`. Dropping the cluster stops
//! exactly the processes it started.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::binaries;
use crate::controlplane::free_port;
use crate::pki::{CertificateAuthority, CertifiedKey};
use crate::process::ManagedProcess;

/// Ports and URLs of a member, chosen before it starts.
#[derive(Clone, Debug)]
pub struct MemberSlot {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
}

struct RunningMember {
    slot: MemberSlot,
    process: ManagedProcess,
}

/// A running etcd cluster; see the module documentation.
pub struct EtcdCluster {
    members: BTreeMap<String, RunningMember>,
    dir: Option<tempfile::TempDir>,
    binary: PathBuf,
    ca: CertificateAuthority,
    token: String,
    /// PEM of the etcd CA (servers and clients).
    pub ca_pem: String,
    /// A client certificate signed by the etcd CA (the operator's).
    pub client: CertifiedKey,
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

impl EtcdCluster {
    /// Starts a new cluster with one member per name and waits until every
    /// member listens.
    pub async fn start(names: &[&str], timeout: Duration) -> Result<Self> {
        let binaries = tokio::task::spawn_blocking(binaries::ensure).await??;
        let dir = tempfile::Builder::new()
            .prefix("confidential-etcd-")
            .tempdir()
            .context("creating etcd dir")?;
        let ca = CertificateAuthority::new("kubectl-confidential-testenv-etcd-ca")?;
        let client = ca.issue_client("confidential-controllers", None)?;
        let token = format!(
            "testenv-{}",
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = Self {
            members: BTreeMap::new(),
            dir: Some(dir),
            binary: binaries.etcd,
            ca_pem: ca.cert.cert_pem.clone(),
            ca,
            token,
            client,
        };
        write(&cluster.dir().join("ca.crt"), &cluster.ca_pem)?;
        let slots = names
            .iter()
            .map(|n| cluster.reserve(n))
            .collect::<Result<Vec<_>>>()?;
        let initial: Vec<(String, String)> = slots
            .iter()
            .map(|s| (s.name.clone(), s.peer_url.clone()))
            .collect();
        for slot in &slots {
            cluster.spawn(slot.clone(), &initial, "new")?;
        }
        for slot in &slots {
            cluster.wait_listening(&slot.name, timeout).await?;
        }
        Ok(cluster)
    }

    /// The cluster's working directory (data, certificates, logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("."), |d| d.path())
    }

    /// Picks free ports for a member named `name`.
    pub fn reserve(&self, name: &str) -> Result<MemberSlot> {
        if self.members.contains_key(name) {
            bail!("etcd member {name} already started");
        }
        Ok(MemberSlot {
            name: name.to_owned(),
            client_url: format!("https://127.0.0.1:{}", free_port()?),
            peer_url: format!("https://127.0.0.1:{}", free_port()?),
        })
    }

    /// Starts a member that was added to the cluster through its API;
    /// `initial_cluster` is `name=peerURL` of every started member plus this
    /// one (what `member add` answers). Waits until it listens.
    pub async fn join(
        &mut self,
        slot: MemberSlot,
        initial_cluster: &[(String, String)],
        timeout: Duration,
    ) -> Result<()> {
        let name = slot.name.clone();
        self.spawn(slot, initial_cluster, "existing")?;
        self.wait_listening(&name, timeout).await
    }

    fn spawn(&mut self, slot: MemberSlot, initial: &[(String, String)], state: &str) -> Result<()> {
        let root = self.dir().join(&slot.name);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let cert = self
            .ca
            .issue_peer(&slot.name, &[IpAddr::V4(Ipv4Addr::LOCALHOST)])?;
        let (crt, key, ca) = (
            root.join("member.crt"),
            root.join("member.key"),
            self.dir().join("ca.crt"),
        );
        write(&crt, &cert.cert_pem)?;
        write(&key, &cert.key_pem)?;
        let initial_cluster = initial
            .iter()
            .map(|(n, url)| format!("{n}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Command::new(&self.binary);
        etcd.arg(format!("--name={}", slot.name))
            .arg(format!("--data-dir={}", root.join("data").display()))
            .arg(format!("--listen-client-urls={}", slot.client_url))
            .arg(format!("--advertise-client-urls={}", slot.client_url))
            .arg(format!("--listen-peer-urls={}", slot.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", slot.peer_url))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--cert-file={}", crt.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg("--client-cert-auth=true")
            .arg(format!("--trusted-ca-file={}", ca.display()))
            .arg(format!("--peer-cert-file={}", crt.display()))
            .arg(format!("--peer-key-file={}", key.display()))
            .arg("--peer-client-cert-auth=true")
            .arg(format!("--peer-trusted-ca-file={}", ca.display()))
            // Two cores shared by many builds: elections tolerate slow beats.
            .arg("--heartbeat-interval=200")
            .arg("--election-timeout=2000")
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        let process =
            ManagedProcess::spawn(&format!("etcd {}", slot.name), etcd, &root.join("etcd.log"))?;
        self.members
            .insert(slot.name.clone(), RunningMember { slot, process });
        Ok(())
    }

    async fn wait_listening(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let member = self
                .members
                .get_mut(name)
                .with_context(|| format!("no etcd member {name}"))?;
            member.process.check_running()?;
            let address = member
                .slot
                .client_url
                .trim_start_matches("https://")
                .to_owned();
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd member {name} did not listen on {address} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Client URLs of the members whose process runs.
    pub fn endpoints(&mut self) -> Vec<String> {
        self.members
            .values_mut()
            .filter_map(|m| {
                m.process
                    .check_running()
                    .is_ok()
                    .then(|| m.slot.client_url.clone())
            })
            .collect()
    }

    /// Whether the process of member `name` was started and still runs.
    pub fn running(&mut self, name: &str) -> bool {
        self.members
            .get_mut(name)
            .is_some_and(|m| m.process.check_running().is_ok())
    }

    /// Names of the members this environment started (running or not).
    pub fn started(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// Stops member `name`'s process, as deleting its machine would.
    pub fn stop(&mut self, name: &str) {
        if let Some(mut member) = self.members.remove(name) {
            member.process.stop(Duration::from_secs(5));
        }
    }

    /// The last log lines of a member.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        self.members
            .get(name)
            .map(|m| m.process.log_tail(lines))
            .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for (_, mut member) in std::mem::take(&mut self.members) {
            member.process.stop(Duration::from_secs(5));
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "testenv: etcd dir kept for inspection: {}",
                dir.keep().display()
            );
        }
    }
}
