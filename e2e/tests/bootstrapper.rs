//! The real `confidential-bootstrapper` binary, with a real swtpm, against
//! what a hostile host can put on the node's path: an impostor gate (a real
//! aTLS server presenting another cluster's gate identity), and a state disk
//! `cryptsetup` cannot classify. Each refusal is checked on its own, with
//! what it must leave untouched: no request reaches the impostor, no disk key
//! or kubelet bootstrap kubeconfig is written, nothing is formatted.
//!
//! `cryptsetup` is a recorded stand-in on the child's `PATH`
//! ([`confidential_testenv::standin`]): this machine's kernel has no
//! device-mapper, so real LUKS runs only in the VM suite.

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use confidential_attestation::atls::{self, AtlsPeer, GateIdentity};
use confidential_attestation::kdf::MasterSecret;
use confidential_testenv::node::{NodeImage, SimulatedNode, bootstrapper_binary};
use confidential_testenv::standin::Standin;
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::unique_name;
use http_body_util::Full;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The cluster the node's launch configuration trusts.
fn cluster_gate_pin() -> Result<[u8; 32]> {
    Ok(GateIdentity::derive(&MasterSecret::new(vec![0x42; 32], b"cluster".to_vec())?)?.pin())
}

/// A real aTLS server with another master secret's gate identity, behind a
/// TCP relay: counts connections that reached it and HTTP requests that
/// arrived, and refuses every request.
struct Impostor {
    addr: String,
    pin: [u8; 32],
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Impostor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Impostor {
    async fn start() -> Result<Self> {
        confidential_testenv::install_crypto_provider();
        let identity =
            GateIdentity::derive(&MasterSecret::new(vec![0x66; 32], b"impostor".to_vec())?)?;
        let tls_listener = TcpListener::bind("127.0.0.1:0").await?;
        let tls_addr = tls_listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let config = identity.server_config()?;
        let server = tokio::spawn(async move {
            let served = atls::serve(tls_listener, config, move |_peer: AtlsPeer| {
                let counted = counted.clone();
                atls::service_fn(move |_req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(
                            br#"{"reason":"impostor","message":"the impostor read the request"}"#,
                        )));
                        *resp.status_mut() = hyper::StatusCode::FORBIDDEN;
                        Ok(resp)
                    }
                })
            })
            .await;
            if let Err(e) = served {
                eprintln!("impostor server stopped: {e}");
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await?;
        let addr = front.local_addr()?.to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let relay = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = front.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(tls_addr).await
                        && let Err(e) =
                            tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                    {
                        eprintln!("impostor relay: {e}");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            pin: identity.pin(),
            connections,
            requests,
            tasks: vec![server, relay],
        })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn boot(ca: &SwtpmCa) -> Result<SimulatedNode> {
    SimulatedNode::boot(
        ca,
        &unique_name("node"),
        &NodeImage::new("node-image:v1"),
        cluster_gate_pin()?,
    )
}

async fn output(cmd: std::process::Command) -> Result<(Output, String)> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("bootstrapper timed out")??;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_refuses_a_gate_with_another_key_before_sending_anything() -> Result<()> {
    let impostor = Impostor::start().await?;
    let ca = SwtpmCa::new()?;
    let node = boot(&ca)?;
    let out = node
        .run_bootstrapper(std::slice::from_ref(&impostor.addr), &[])
        .await?;
    assert!(!out.success, "joined an impostor:\n{}", out.log);
    assert!(out.log.contains("is not the cluster's gate"), "{}", out.log);
    assert!(
        out.log.contains(&hex::encode(cluster_gate_pin()?)),
        "expected pin named:\n{}",
        out.log
    );
    assert!(
        out.log.contains(&hex::encode(impostor.pin)),
        "presented pin named:\n{}",
        out.log
    );
    assert!(
        impostor.connections() >= 1,
        "the node did reach the impostor"
    );
    assert_eq!(
        impostor.requests(),
        0,
        "no HTTP request (no evidence) reached the impostor"
    );
    assert!(!node.disk_key_file().exists(), "no disk key written");
    assert!(
        !node.bootstrap_kubeconfig().exists(),
        "no kubelet bootstrap kubeconfig written"
    );

    // Control: pinned (through the environment, as a launch configuration
    // passes it) to the impostor's key, the same node does send its request,
    // so the counter above could have seen one.
    let mut cmd = std::process::Command::new(bootstrapper_binary()?);
    cmd.env("CONFIDENTIAL_GATE_PIN", hex::encode(impostor.pin))
        .args(["--endpoint", &impostor.addr, "--node-name", &node.name])
        .args(["--tcti", &node.swtpm.tcti()])
        .args(["--disk-uuid", "00000000-0000-4000-8000-000000000009"])
        .arg("--disk-key-file")
        .arg(node.disk_key_file())
        .arg("--ak-state")
        .arg(node.dir().join("ak.blob"))
        .args(["--max-attempts", "1", "--pcrs", "4"]);
    let (out, log) = output(cmd).await?;
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("impostor read the request"), "{log}");
    assert!(
        impostor.requests() >= 1,
        "the pinned server receives the join request"
    );
    assert!(
        !node.disk_key_file().exists(),
        "a refusal writes no disk key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_gate_pin_is_a_usage_error() -> Result<()> {
    let impostor = Impostor::start().await?;
    let base = |pin: Option<&str>| -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(bootstrapper_binary()?);
        cmd.env_remove("CONFIDENTIAL_GATE_PIN")
            .args(["--endpoint", &impostor.addr, "--node-name", "node-a"])
            .args(["--disk-uuid", "00000000-0000-4000-8000-000000000009"])
            .args(["--tcti", "swtpm:host=127.0.0.1,port=1"]);
        if let Some(pin) = pin {
            cmd.args(["--gate-pin", pin]);
        }
        Ok(cmd)
    };
    for (pin, expected) in [
        (None, "--gate-pin"),
        (Some("not-hex"), "not hex"),
        (Some("abcd"), "2 bytes"),
        (Some(""), "0 bytes"),
    ] {
        let (out, log) = output(base(pin)?).await?;
        assert_eq!(out.status.code(), Some(2), "{pin:?}: {log}");
        assert!(log.contains(expected), "{pin:?}: {log}");
    }
    assert_eq!(impostor.connections(), 0, "a usage error contacts nobody");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_disk_that_cryptsetup_cannot_classify_stops_the_node_before_it_joins() -> Result<()> {
    let impostor = Impostor::start().await?;
    let ca = SwtpmCa::new()?;
    let node = boot(&ca)?;
    let device = node.dir().join("vdb");
    std::fs::write(&device, b"")?;
    let device_arg = device.display().to_string();

    // isLuks fails with a code other than 0/1: an error, never a format.
    for code in [2, 4, 5] {
        let cryptsetup = Standin::new("cryptsetup", &[("isLuks", code)])?;
        let mut cmd = node.bootstrapper_command(
            std::slice::from_ref(&impostor.addr),
            &["--state-device", &device_arg],
        )?;
        cmd.env("PATH", cryptsetup.path_env());
        let (out, log) = output(cmd).await?;
        assert_eq!(out.status.code(), Some(1), "{log}");
        assert!(log.contains(&format!("exit code {code}")), "{log}");
        assert!(log.contains("not formatted"), "{log}");
        let calls = cryptsetup.calls()?;
        assert_eq!(calls.len(), 1, "only the probe ran: {calls:?}");
        assert_eq!(calls[0].argv, ["isLuks", device_arg.as_str()]);
    }

    // The device is missing: cryptsetup is not even asked.
    let cryptsetup = Standin::new("cryptsetup", &[("isLuks", 1)])?;
    let missing = node.dir().join("no-such-disk").display().to_string();
    let mut cmd = node.bootstrapper_command(
        std::slice::from_ref(&impostor.addr),
        &["--state-device", &missing],
    )?;
    cmd.env("PATH", cryptsetup.path_env());
    let (out, log) = output(cmd).await?;
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("does not exist"), "{log}");
    assert!(cryptsetup.calls()?.is_empty());

    // cryptsetup is not installed.
    let empty = tempfile::tempdir()?;
    let mut cmd = node.bootstrapper_command(
        std::slice::from_ref(&impostor.addr),
        &["--state-device", &device_arg],
    )?;
    cmd.env("PATH", empty.path());
    let (out, log) = output(cmd).await?;
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("install cryptsetup"), "{log}");

    assert_eq!(
        impostor.connections(),
        0,
        "a disk that cannot be set up costs no join"
    );
    Ok(())
}
