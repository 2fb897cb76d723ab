//! A VM network: a Linux bridge on this host with its own IPv4 /24, on
//! which the host (the API server, an out-of-cluster gate, the test) and
//! the VMs reach one another at one set of addresses, as the machines of a
//! cluster network do.
//!
//! Why besides QEMU user networking (a VM's default): there every guest is
//! `10.0.2.15`, the host is reached only through per-port forwards, and the
//! host reaches a guest only through a forward of its own loopback. That
//! carries nodes whose cluster components run on the host, but not a
//! cluster whose gate runs *on a node*: the gate there must re-attest the
//! other nodes at the address they announced, and the API server must call
//! it, and a host-loopback forward means nothing inside a VM. On a bridge
//! every node has one address everyone dials.
//!
//! Nothing outlives its owner: the bridge is `cfvm<N>` (its alias records
//! the owner's pid) and each VM's tap `cfvm<N>t<M>`; dropping the network
//! deletes them, and creating one first deletes the links of owners that
//! no longer run (a test killed before its drop). Needs root (`ip link`).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, Result, bail};

/// Link names start with this.
const PREFIX: &str = "cfvm";
/// The /16 the networks' /24s are taken from (`10.213.<N>.0/24`).
const SUBNET: [u8; 2] = [10, 213];
/// The first host number given to a VM (`.1` is the host).
const FIRST_VM_HOST: u8 = 11;

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn owner_alias() -> String {
    format!("owner-pid={}", std::process::id())
}

/// Deletes the links of networks whose owner no longer runs.
fn sweep_stale() -> Result<()> {
    let links = ip(&["-o", "link", "show"])?;
    for line in links.lines() {
        // "12: cfvm3: <BROADCAST,...> ... \    alias owner-pid=123"
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        let Some(index) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let owner_alive = line
            .split("alias owner-pid=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if owner_alive {
            continue;
        }
        let taps = format!("{name}t");
        for other in links.lines() {
            if let Some(tap) = other.split(": ").nth(1)
                && tap.starts_with(&taps)
            {
                let _ = ip(&["link", "del", tap]);
            }
        }
        let _ = ip(&["link", "del", name]);
    }
    Ok(())
}

/// A bridge with its /24; the host is `.1`.
#[derive(Debug)]
pub struct VmNetwork {
    index: u8,
    next: AtomicU8,
}

impl VmNetwork {
    /// Creates the bridge of the first free /24 and gives the host its `.1`.
    pub fn create() -> Result<Self> {
        sweep_stale()?;
        for index in 0..=250u8 {
            let bridge = format!("{PREFIX}{index}");
            // Creating the link is the lock: a parallel test's create of
            // the same name fails and takes the next one.
            if ip(&["link", "add", "name", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            let network = Self {
                index,
                next: AtomicU8::new(FIRST_VM_HOST),
            };
            ip(&["link", "set", &bridge, "alias", &owner_alias()])?;
            let host = format!("{}/24", network.host_address());
            ip(&["addr", "add", &host, "dev", &bridge])?;
            ip(&["link", "set", &bridge, "up"])?;
            tracing::info!(%bridge, %host, "VM network created");
            return Ok(network);
        }
        bail!("no free VM network: {PREFIX}0..{PREFIX}250 all exist")
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        format!("{PREFIX}{}", self.index)
    }

    /// The host's address on this network (the VMs' gateway).
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], self.index, 1)
    }

    /// A new port for one VM: its tap on the bridge (up) and its address.
    pub fn attach(&self) -> Result<NetworkPort> {
        let host = self.next.fetch_add(1, Ordering::SeqCst);
        if host < FIRST_VM_HOST || host == 255 {
            bail!("VM network {} is full", self.bridge());
        }
        let tap = format!("{}t{host}", self.bridge());
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        let port = NetworkPort {
            tap: tap.clone(),
            address: Ipv4Addr::new(SUBNET[0], SUBNET[1], self.index, host),
            gateway: self.host_address(),
            mac: format!("52:54:00:d5:{:02x}:{host:02x}", self.index),
        };
        ip(&["link", "set", &tap, "master", &self.bridge()])?;
        ip(&["link", "set", &tap, "up"])?;
        Ok(port)
    }
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        if let Err(err) = ip(&["link", "del", &self.bridge()]) {
            tracing::warn!(%err, "deleting the VM network's bridge");
        }
    }
}

/// One VM's place on a [`VmNetwork`]: its tap (deleted on drop) and address.
#[derive(Debug)]
pub struct NetworkPort {
    pub tap: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Unique on the bridge (QEMU's default MAC is the same for every VM).
    pub mac: String,
}

impl NetworkPort {
    /// The launch configuration lines that give the node this address.
    pub fn node_config(&self) -> String {
        format!(
            "{}={}/24\n{}={}\n",
            super::ENV_NODE_ADDRESS,
            self.address,
            super::ENV_NODE_GATEWAY,
            self.gateway
        )
    }
}

impl Drop for NetworkPort {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.tap]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str) -> Option<String> {
        ip(&["-o", "link", "show", "dev", name]).ok()
    }

    /// A network's links exist while it is owned and go with it; a network
    /// left by an owner that no longer runs is swept by the next one.
    #[test]
    fn links_live_exactly_as_long_as_their_owner() -> Result<()> {
        let network = VmNetwork::create()?;
        let bridge = network.bridge();
        let port = network.attach()?;
        let second = network.attach()?;
        assert_ne!(port.address, second.address);
        assert_ne!(port.mac, second.mac);
        assert_eq!(port.gateway, network.host_address());
        let tap = link(&port.tap).context("the tap exists")?;
        assert!(tap.contains(&format!("master {bridge}")), "{tap}");
        assert!(
            ip(&["-o", "addr", "show", "dev", &bridge])?
                .contains(&format!("{}/24", network.host_address()))
        );
        assert_eq!(
            port.node_config(),
            format!(
                "CONFIDENTIAL_NODE_ADDRESS={}/24\nCONFIDENTIAL_NODE_GATEWAY={}\n",
                port.address,
                network.host_address()
            )
        );
        let tap_name = port.tap.clone();
        drop(port);
        assert!(link(&tap_name).is_none(), "the tap goes with its port");
        drop(second);
        drop(network);
        assert!(link(&bridge).is_none(), "the bridge goes with its network");

        // An owner killed before its drop: a pid that does not run.
        let stale = VmNetwork::create()?;
        let stale_bridge = stale.bridge();
        let stale_tap = stale.attach()?;
        ip(&["link", "set", &stale_bridge, "alias", "owner-pid=999999999"])?;
        let tap_name = stale_tap.tap.clone();
        std::mem::forget(stale_tap);
        std::mem::forget(stale);
        let next = VmNetwork::create()?;
        assert!(link(&stale_bridge).is_none() || next.bridge() == stale_bridge);
        assert!(link(&tap_name).is_none(), "the stale tap was swept");
        Ok(())
    }
}
