//! The simulated cloud of the playground: a machine is a real swtpm whose PCRs
//! the "firmware" extends with the node image's components, the real
//! `confidential-bootstrapper` joining through the gate over aTLS (and then
//! serving `/v1/attest` on the machine's own loopback address), and the
//! kubelet stand-in doing TLS bootstrap (its CSR approved by the operator's
//! approver), registering the Node and heartbeating. The node operator drives
//! it through the same [`Provider`] trait a cloud or Cluster API provider
//! implements.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL, image_label_value};
use confidential_controllers::provider::{
    Leave, LeaveRequest, Machine, MachineRequest, Provider, ProviderError,
};
use confidential_testenv::ManagedProcess;
use confidential_testenv::node::{IMAGE_PCR, Kubelet, KubeletOptions, NodeImage, SimulatedNode};
use confidential_testenv::swtpm::SwtpmCa;
use futures::future::BoxFuture;
use tokio::task::JoinHandle;

/// A booted machine: its TPM, its bootstrapper (serving `/v1/attest`) and
/// its kubelet live as long as this does.
struct Running {
    _kubelet: Kubelet,
    _bootstrapper: ManagedProcess,
    _node: SimulatedNode,
}

struct Slot {
    machine: Machine,
    boot: JoinHandle<()>,
    running: Arc<Mutex<Option<Running>>>,
}

/// Machines backed by swtpm and the real bootstrapper.
pub struct SwtpmProvider {
    ca: Arc<SwtpmCa>,
    join_endpoints: Vec<String>,
    /// The gate key every machine's launch configuration pins.
    gate_pin: [u8; 32],
    slots: Mutex<BTreeMap<String, Slot>>,
    /// Machines so far: each gets its own loopback address.
    booted: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The port of every node's attestation endpoint, as on real nodes: the
/// gate's re-attestation and `kubectl confidential verify` use it by default.
pub const ATTEST_PORT: u16 = 9444;
/// The PCR the bootstrapper extends with the cluster ID after joining.
const CLUSTER_ID_PCR: u32 = 15;

/// The `n`th machine's own loopback address (127.0.0.0/8 is all local), so
/// every node serves `/v1/attest` on its InternalIP and the default port.
fn machine_address(n: u32) -> Ipv4Addr {
    let n = n % (250 * 250);
    let (high, low) = (n / 250, n % 250);
    Ipv4Addr::new(
        127,
        1 + u8::try_from(high).unwrap_or(0),
        0,
        1 + u8::try_from(low).unwrap_or(0),
    )
}

impl SwtpmProvider {
    pub fn new(ca: Arc<SwtpmCa>, join_endpoints: Vec<String>, gate_pin: [u8; 32]) -> Self {
        Self {
            ca,
            join_endpoints,
            gate_pin,
            slots: Mutex::new(BTreeMap::new()),
            // A random start: two playgrounds on one host rarely pick the
            // same addresses.
            booted: AtomicU32::new(u32::from(rand::random::<u16>())),
        }
    }

    /// Names of machines whose node booted, joined and runs its kubelet.
    pub fn running(&self) -> Vec<String> {
        lock(&self.slots)
            .iter()
            .filter(|(_, s)| lock(&s.running).is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Boots one machine: TPM + firmware measurements, the bootstrapper joins
/// and then serves `/v1/attest` on the machine's address, then the kubelet.
async fn boot(
    ca: Arc<SwtpmCa>,
    endpoints: Vec<String>,
    gate_pin: [u8; 32],
    address: Ipv4Addr,
    request: MachineRequest,
) -> anyhow::Result<Running> {
    let image = NodeImage::new(&request.image);
    let name = request.name.clone();
    let node =
        tokio::task::spawn_blocking(move || SimulatedNode::boot(&ca, &name, &image, gate_pin))
            .await??;
    let attest = format!("{address}:{ATTEST_PORT}");
    let pcrs = format!("{IMAGE_PCR},{CLUSTER_ID_PCR}");
    let mut bootstrapper = node.spawn_bootstrapper(
        &endpoints,
        &[
            "--pool",
            &request.pool,
            "--pcrs",
            &pcrs,
            "--attest-listen",
            &attest,
        ],
    )?;
    // The bootstrapper writes the kubelet's bootstrap kubeconfig (atomically)
    // once it joined, then serves /v1/attest.
    let kubeconfig = node.bootstrap_kubeconfig();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while !kubeconfig.exists() {
        if let Err(err) = bootstrapper.check_running() {
            anyhow::bail!(
                "bootstrapper of {} failed: {err:#}\n{}",
                request.name,
                bootstrapper.log_tail(30)
            );
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("bootstrapper of {} did not join within 180s", request.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The kubelet registers with --node-labels for pool and image, as the
    // attestation fixed them; the operator's CSR approver approves its CSR.
    let options = KubeletOptions {
        labels: BTreeMap::from([
            (LABEL_NODE_POOL.to_owned(), request.pool.clone()),
            (
                LABEL_NODE_IMAGE.to_owned(),
                image_label_value(&request.image),
            ),
        ]),
        kubelet_version: request.kubernetes_version.clone(),
        provider_id: Some(format!("swtpm://{}", request.name)),
        internal_ip: Some(IpAddr::V4(address)),
        ..KubeletOptions::default()
    };
    let kubelet = node
        .start_kubelet_with(&options, |_csr| async { Ok(()) })
        .await?;
    Ok(Running {
        _kubelet: kubelet,
        _bootstrapper: bootstrapper,
        _node: node,
    })
}

impl Provider for SwtpmProvider {
    fn create_machine<'a>(
        &'a self,
        request: &'a MachineRequest,
    ) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            let mut slots = lock(&self.slots);
            if let Some(slot) = slots.get(&request.name) {
                return Ok(slot.machine.clone());
            }
            let machine = Machine {
                name: request.name.clone(),
                pool: request.pool.clone(),
                image: request.image.clone(),
                provider_id: format!("swtpm://{}", request.name),
            };
            let running = Arc::new(Mutex::new(None));
            let boot = tokio::spawn({
                let (ca, endpoints, request, running) = (
                    self.ca.clone(),
                    self.join_endpoints.clone(),
                    request.clone(),
                    running.clone(),
                );
                let gate_pin = self.gate_pin;
                let address = machine_address(self.booted.fetch_add(1, Ordering::Relaxed));
                async move {
                    match boot(ca, endpoints, gate_pin, address, request.clone()).await {
                        Ok(machine) => {
                            tracing::info!(node = %request.name, image = %request.image, "machine joined");
                            *lock(&running) = Some(machine);
                        }
                        Err(err) => {
                            tracing::warn!(node = %request.name, error = %format!("{err:#}"), "machine failed to join")
                        }
                    }
                }
            });
            slots.insert(
                request.name.clone(),
                Slot {
                    machine: machine.clone(),
                    boot,
                    running,
                },
            );
            Ok(machine)
        })
    }

    fn delete_machine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            if let Some(slot) = lock(&self.slots).remove(name) {
                slot.boot.abort();
                // Dropping the machine stops its kubelet heartbeats and its swtpm.
                lock(&slot.running).take();
                tracing::info!(node = %name, "machine deleted");
            }
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

/// The playground's control plane runs on the host, outside any pool: its
/// machines are workers and run no etcd.
const NO_CONTROL_PLANE_MACHINES: &str = "the playground's machines are workers and run no etcd: control-plane pools are not supported there";
