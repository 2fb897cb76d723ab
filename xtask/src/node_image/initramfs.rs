//! The node OS as an initramfs: busybox as init and shell, the
//! `confidential-bootstrapper` with exactly the shared libraries `ldd` says
//! it loads (plus the TPM device TCTI, which the TSS loader opens with
//! `dlopen` and `ldd` cannot see), an init script, and the image's identity
//! (`/etc/os-release`, `/etc/node-image-version`).
//!
//! Everything is read from the build machine into memory and placed at
//! fixed archive paths, so no build path and no file time leaks into the
//! image. A node image adds the node runtime ([`super::runtime`]) and an
//! init script that boots the node to a Kubernetes node.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::cpio::{Archive, EntryKind};

/// The TCTI the bootstrapper opens inside the VM (`device:/dev/tpmrm0`): the
/// TSS's TCTI loader `dlopen`s it, so `ldd` does not list it.
const DLOPENED_LIBRARIES: &[&str] = &["/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0"];

/// The files the node OS is built from.
#[derive(Clone, Debug)]
pub struct NodeOsInputs {
    /// A static busybox (Debian's `busybox-static`).
    pub busybox: PathBuf,
    /// The `confidential-bootstrapper` binary.
    pub bootstrapper: PathBuf,
    /// Further files as `(archive path, host file, mode)`.
    pub extra_files: Vec<(String, PathBuf, u32)>,
    /// The node runtime (containerd, runc, CNI, kubelet, the state disk's
    /// tools and kernel modules, the baked images); `None` for an image that
    /// only reports its boot.
    pub runtime: Option<super::runtime::NodeRuntime>,
}

/// The init script of an image without the node runtime: the boot report,
/// then idle.
pub fn init_script() -> String {
    format!(
        "{}{}",
        boot_report_script(),
        r#"echo "node-image: waiting (this image carries no node runtime)"
while true; do sleep 3600; done
"#
    )
}

/// The init script of a node: the boot report, then the node's boot
/// ([`NODE_BOOT_SCRIPT`]).
pub fn node_init_script() -> String {
    format!("{}{NODE_BOOT_SCRIPT}", boot_report_script())
}

/// The start of every init script: mounts the kernel file systems, prints
/// the image version and the boot measurements (PCR values as the kernel
/// reads them from the TPM, and the firmware's event log; both public, what
/// a verifier is shown anyway) on the console.
fn boot_report_script() -> String {
    r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
echo "node-image: init running version=$(cat /etc/node-image-version) uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "node-image: BEGIN PCRS"
for i in $(seq 0 23); do
  echo "node-image: pcr sha256 $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i 2>/dev/null || echo unreadable)"
done
echo "node-image: END PCRS"
echo "node-image: BEGIN EVENTLOG"
cat /sys/kernel/security/tpm0/binary_bios_measurements | base64 | sed 's/^/node-image: eventlog /'
echo "node-image: END EVENTLOG"
"#
    .to_owned()
}

/// The node's boot after the report. The launch configuration (fw_cfg, set
/// by whoever starts the VM, so untrusted) is read line by line and only
/// the known keys are exported, never sourced as shell: the host
/// cannot run code in the measured node through it, and the bootstrapper
/// validates every value before the node uses it (a bad value stops the
/// boot). `CONFIDENTIAL_NODE_LABELS` (the pool and image identity labels the
/// operator's machine provider sets) goes to the kubelet's `--node-labels`
/// as one quoted argument, so it cannot add flags; the gate's admission
/// refuses a Node whose identity labels differ from its attestation. The disks are told apart by their virtio serials: `state` (LUKS2,
/// set up by the bootstrapper with the gate's key, mounted at /var/lib) and
/// `machine` (holds the TPM-wrapped AK, useless elsewhere, and the cluster
/// ID: what the node needs before it can unlock anything).
pub const NODE_BOOT_SCRIPT: &str = r#"step() { echo "node-image: step $1 uptime=$(cut -d' ' -f1 /proc/uptime)"; }
idle() { echo "node-image: $1"; while true; do sleep 3600; done; }
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
step modules
for m in $(cat /etc/node-modules); do insmod /lib/modules/$m.ko || echo "node-image: insmod $m failed"; done
mkdir -p /sys/fs/cgroup /run/kubelet /run/containerd /run/cryptsetup /machine /var/log /var/lib
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +cpuset +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
config=/sys/firmware/qemu_fw_cfg/by_name/opt/confidential/node.env/raw
[ -r "$config" ] || idle "no launch configuration (fw_cfg opt/confidential/node.env); waiting"
while IFS='=' read -r key value; do
  case "$key" in
    CONFIDENTIAL_GATE_ENDPOINTS|CONFIDENTIAL_GATE_PIN|CONFIDENTIAL_NODE_NAME|CONFIDENTIAL_DISK_UUID|CONFIDENTIAL_POOL|CONFIDENTIAL_MAX_ATTEMPTS|CONFIDENTIAL_NODE_LABELS|CONFIDENTIAL_ATTEST_ENDPOINT|CONFIDENTIAL_NODE_ADDRESS|CONFIDENTIAL_NODE_GATEWAY) export "$key=$value";;
    *) echo "node-image: ignoring launch configuration key ${key%%[!A-Z_]*}";;
  esac
done < "$config"
# The node's address: on a cluster network, the one its launch configuration
# gives; else QEMU user networking's fixed one. `ip` parses the values (one
# quoted argument each), and a value it refuses stops the boot.
step network
address=${CONFIDENTIAL_NODE_ADDRESS:-10.0.2.15/24}
gateway=${CONFIDENTIAL_NODE_GATEWAY:-10.0.2.2}
node_ip=${address%/*}
ip link set lo up
ip link set eth0 up
ip addr add "$address" dev eth0 || idle "cannot set the node address; waiting"
ip route add default via "$gateway" || idle "cannot route through the gateway; waiting"
# A node routes its pods' traffic (and kube-proxy's DNAT of it).
echo 1 > /proc/sys/net/ipv4/ip_forward
echo "node-image: network address=$node_ip"
state= machine=
for d in /sys/block/vd*; do
  case "$(cat $d/serial 2>/dev/null)" in
    state) state=/dev/${d##*/};;
    machine) machine=/dev/${d##*/};;
  esac
done
[ -n "$state" ] && [ -n "$machine" ] || idle "no state or machine disk attached; waiting"
mount -t ext4 "$machine" /machine || idle "cannot mount the machine disk $machine; waiting"
step join
# Through a pipe: the console is a terminal, and the logs are read as plain
# text. After the join the bootstrapper keeps serving /v1/attest on port 9444
# (the gate re-attests the node there; `kubectl confidential verify` asks
# there), so the boot goes on when it wrote the joined file, not when it exits.
{ confidential-bootstrapper --tcti device:/dev/tpmrm0 --pcrs 0,1,2,3,4,5,6,7,8,9,10,11,12,13 --state-device "$state" --state-mount /var/lib --ak-state /machine/ak.blob --cluster-id-state /machine/cluster-id --kubelet-bootstrap-kubeconfig /run/kubelet/bootstrap-kubeconfig --attest-listen 0.0.0.0:9444 --joined-file /run/bootstrapper.joined; echo "node-image: bootstrapper failed exit=$?"; } 2>&1 | cat &
bootstrapper=$!
while [ ! -e /run/bootstrapper.joined ] && kill -0 $bootstrapper 2>/dev/null; do usleep 200000; done
# The AK state and the cluster ID must survive a power cut from here on.
sync
[ -e /run/bootstrapper.joined ] || { wait $bootstrapper; idle "bootstrapper failed; the node stays down"; }
boots=$(( $(cat /var/lib/node-boots 2>/dev/null || echo 0) + 1 ))
echo $boots > /var/lib/node-boots
sync
echo "node-image: state disk open boots=$boots luks-uuid=$(cryptsetup luksUUID "$state")"
step containerd
mkdir -p /var/lib/containerd /var/lib/kubelet /var/log/pods
containerd --config /etc/containerd/config.toml > /var/log/containerd.log 2>&1 &
while [ ! -S /run/containerd/containerd.sock ]; do sleep 1; done
for image in /usr/share/node-images/*.tar; do
  ctr -n k8s.io images import --all-platforms "$image" > /dev/null || echo "node-image: import $image failed"
done
step kubelet
# The cluster CA the gate handed over at join (in the bootstrap kubeconfig
# the bootstrapper wrote): the kubelet's API accepts the API server's client
# certificate by it.
sed -n 's/^ *certificate-authority-data: //p' /run/kubelet/bootstrap-kubeconfig | base64 -d > /run/kubelet/ca.crt
[ -s /run/kubelet/ca.crt ] || idle "no cluster CA in the bootstrap kubeconfig; waiting"
kubelet --config /etc/kubernetes/kubelet.yaml   --bootstrap-kubeconfig /run/kubelet/bootstrap-kubeconfig --kubeconfig /var/lib/kubelet/kubeconfig   --hostname-override "$CONFIDENTIAL_NODE_NAME" ${CONFIDENTIAL_NODE_LABELS:+"--node-labels=$CONFIDENTIAL_NODE_LABELS"} --node-ip "$node_ip" > /var/log/kubelet.log 2>&1 &
kubelet=$!
# The Service proxy (nftables), with the node's own credentials once the
# kubelet's TLS bootstrap wrote them: ClusterIPs work on the node and in its
# pods. Service traffic is masqueraded, so replies from outside the node
# find their way back to pod addresses no one else routes.
{
  while [ ! -s /var/lib/kubelet/kubeconfig ]; do sleep 1; done
  kube-proxy --proxy-mode=nftables --kubeconfig=/var/lib/kubelet/kubeconfig --hostname-override="$CONFIDENTIAL_NODE_NAME" --cluster-cidr=10.244.0.0/16 --masquerade-all --metrics-bind-address=127.0.0.1:10249 > /var/log/kube-proxy.log 2>&1
  tail -n 20 /var/log/kube-proxy.log | sed 's/^/node-image: kube-proxy-log /'
  echo "node-image: kube-proxy exited"
} &
# Only the node's own state goes to the console, which the host reads: no
# workload output (pod logs stay on the encrypted disk), and the kubelet's
# log only when it died (the reason the node is down).
while kill -0 $kubelet 2>/dev/null; do sleep 5; done
tail -n 40 /var/log/kubelet.log | sed 's/^/node-image: kubelet-log /'
idle "kubelet exited"
"#;

/// `/etc/os-release` of an image version.
pub fn os_release(version: &str) -> String {
    format!(
        "ID=confidential-node\nNAME=\"kubectl-confidential node\"\nVERSION_ID={version}\nPRETTY_NAME=\"kubectl-confidential node {version}\"\n"
    )
}

/// Whether an ELF file has a program interpreter (is dynamically linked):
/// static binaries (busybox, Go binaries) need no libraries.
fn is_dynamic(path: &Path) -> Result<bool> {
    let out = Command::new("readelf")
        .arg("--program-headers")
        .arg(path)
        .output()
        .with_context(|| format!("running readelf on {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{} is not an ELF file: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).contains("INTERP"))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn archive_path(host: &Path) -> Result<String> {
    let text = host.to_str().context("non-UTF-8 library path")?;
    Ok(text.trim_start_matches('/').to_owned())
}

/// Builds the initramfs archive of image `version`.
pub fn archive(version: &str, inputs: &NodeOsInputs) -> Result<Archive> {
    let mut archive = Archive::default();
    for dir in ["dev", "proc", "sys", "run", "tmp", "var", "etc"] {
        archive.add(dir, EntryKind::Directory)?;
    }
    archive.add(
        "bin/busybox",
        EntryKind::File {
            mode: 0o755,
            contents: read(&inputs.busybox)?,
        },
    )?;
    let init = match inputs.runtime {
        Some(_) => node_init_script(),
        None => init_script(),
    };
    archive.add(
        "init",
        EntryKind::File {
            mode: 0o755,
            contents: init.into_bytes(),
        },
    )?;
    archive.add(
        "etc/os-release",
        EntryKind::File {
            mode: 0o644,
            contents: os_release(version).into_bytes(),
        },
    )?;
    archive.add(
        "etc/node-image-version",
        EntryKind::File {
            mode: 0o644,
            contents: format!("{version}\n").into_bytes(),
        },
    )?;
    archive.add(
        "usr/bin/confidential-bootstrapper",
        EntryKind::File {
            mode: 0o755,
            contents: read(&inputs.bootstrapper)?,
        },
    )?;
    let mut libraries = crate::ldd::libraries(&inputs.bootstrapper)?;
    for extra in DLOPENED_LIBRARIES {
        libraries.push(PathBuf::from(extra));
        libraries.extend(crate::ldd::libraries(Path::new(extra))?);
    }
    let mut binaries = inputs.extra_files.clone();
    if let Some(runtime) = &inputs.runtime {
        binaries.extend(super::runtime::binaries(runtime)?);
        let busybox = read(&inputs.busybox)?;
        for (path, mode, contents) in super::runtime::files(runtime, &busybox)? {
            archive.add(&path, EntryKind::File { mode, contents })?;
        }
    }
    for (path, host, mode) in &binaries {
        archive.add(
            path,
            EntryKind::File {
                mode: *mode,
                contents: read(host)?,
            },
        )?;
        if is_dynamic(host)? {
            libraries.extend(crate::ldd::libraries(host)?);
        }
    }
    libraries.sort();
    libraries.dedup();
    for lib in libraries {
        // The contents of the file the path resolves to, at the path the
        // dynamic loader looks for (symlinks on the build machine flattened).
        archive.add(
            &archive_path(&lib)?,
            EntryKind::File {
                mode: 0o755,
                contents: read(&lib)?,
            },
        )?;
    }
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_differ_in_os_release() {
        assert!(os_release("v1").contains("VERSION_ID=v1\n"));
        assert_ne!(os_release("v1"), os_release("v2"));
    }
}
