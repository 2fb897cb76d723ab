//! The node runtime inside the image: what turns the booted node agent into
//! a Kubernetes node (containerd, runc, the CNI plugins, the kubelet,
//! kube-proxy with `nft` and the netfilter modules), what
//! the state disk needs (`cryptsetup`, `mkfs.ext4`, the device-mapper and
//! virtio kernel modules), their configuration, and the two container
//! images a node needs without any registry (the pause image and a demo
//! workload, OCI archives imported at boot with `ctr -n k8s.io images
//! import`). Each archive's `index.json` names its image twice, by tag and
//! by digest (`repository@sha256:<manifest digest>`), so the import leaves
//! both names in containerd's store and the CRI resolves a digest-pinned
//! Pod image (what an `Enforce` ImagePolicy admits) without any registry.
//!
//! The images are baked into the initramfs rather than served by a registry
//! on this machine: then they are part of the UKI, so PCRs 4, 9 and 11
//! measure them with everything else, the policy pins them through the
//! image's measurements, and the node needs no route but the gate and the
//! API server.
//!
//! Kernel modules come from the cached kernel package; their load order is
//! computed from the `depends=` field of each module's `.modinfo` section
//! (the package ships no `modules.dep`, which `depmod` would generate at
//! install time), so init loads them with plain `insmod` in that order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::images::{Image, ImageMeta, IndexNames, LayerFile};

/// The pause (sandbox) image every pod's sandbox runs.
pub const PAUSE_IMAGE: &str = "ghcr.io/kubectl-confidential/pause:v1";
/// The demo workload by tag: prints [`DEMO_LOG_LINE`] and sleeps. Its
/// digest depends on the build machine's busybox: [`demo_image`] computes
/// it, as the node image bakes it.
pub const DEMO_IMAGE: &str = "ghcr.io/kubectl-confidential/demo:v1";
/// What the demo workload prints first.
pub const DEMO_LOG_LINE: &str = "demo workload running on a confidential node";
/// Where the OCI archives lie in the initramfs.
pub const IMAGES_DIR: &str = "usr/share/node-images";

/// Kernel modules the node loads (their dependencies are added): the
/// virtio PCI transport (a module in Debian's cloud kernel, and no other
/// module's `depends=` names it) with the disk and network drivers, device-mapper with dm-crypt and the
/// XTS mode LUKS2 uses by default (over ECB, also a module here), overlayfs for containerd's snapshotter,
/// the bridge and veth devices of the CNI bridge plugin, and fw_cfg (the
/// launch configuration).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "dm-mod",
    "dm-crypt",
    "xts",
    "ecb",
    "overlay",
    "bridge",
    "veth",
    "qemu_fw_cfg",
    // kube-proxy's nftables mode: tables, sets and maps, conntrack state,
    // DNAT to endpoints, masquerading, `fib daddr type local`, `reject` in
    // its `ip` and `ip6` tables (Services without endpoints, invalid
    // ClusterIP ports), random endpoint choice, and conntrack cleanup over
    // netlink.
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_numgen",
    "nf_conntrack_netlink",
];

/// Debian's binaries the node runs: `(archive path, host path)`. Dynamic
/// ones bring exactly the libraries `ldd` lists.
pub const SYSTEM_BINARIES: &[(&str, &str)] = &[
    ("usr/bin/containerd", "/usr/bin/containerd"),
    (
        "usr/bin/containerd-shim-runc-v2",
        "/usr/bin/containerd-shim-runc-v2",
    ),
    ("usr/bin/ctr", "/usr/bin/ctr"),
    ("usr/sbin/runc", "/usr/sbin/runc"),
    ("usr/lib/cni/bridge", "/usr/lib/cni/bridge"),
    ("usr/lib/cni/host-local", "/usr/lib/cni/host-local"),
    ("usr/lib/cni/loopback", "/usr/lib/cni/loopback"),
    ("usr/sbin/cryptsetup", "/sbin/cryptsetup"),
    ("usr/sbin/mkfs.ext4", "/sbin/mke2fs"),
    ("usr/sbin/nft", "/usr/sbin/nft"),
];

/// What the runtime is built from beyond Debian's packages.
#[derive(Clone, Debug)]
pub struct NodeRuntime {
    /// The kubelet (same Kubernetes version as the control plane).
    pub kubelet: PathBuf,
    /// kube-proxy (same version), the node's Service proxy (nftables mode).
    pub kube_proxy: PathBuf,
    /// `lib/modules/<release>` of the image's kernel.
    pub modules_dir: PathBuf,
    /// Container images baked besides the pause and demo images (e.g. the
    /// gate's and the operator's, for a node that runs them): measured
    /// with the rest of the image, imported at boot by tag and by digest.
    pub extra_images: Vec<BakedImage>,
}

/// A file the runtime adds: archive path, mode, contents.
pub type RuntimeFile = (String, u32, Vec<u8>);

/// The `depends=` modules of a module file's `.modinfo` strings.
pub fn modinfo_depends(module: &[u8]) -> Vec<String> {
    module
        .split(|b| *b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Orders `wanted` and their dependencies so each module comes after what
/// it depends on (`depends` maps a module to its direct dependencies).
pub fn load_order(wanted: &[&str], depends: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if out.iter().any(|m| m == name) {
            return Ok(());
        }
        if path.iter().any(|m| m == name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        let deps = depends
            .get(name)
            .with_context(|| format!("kernel module {name} is not in the kernel package"))?;
        path.push(name.to_owned());
        for dep in deps {
            visit(dep, depends, path, out)?;
        }
        path.pop();
        out.push(name.to_owned());
        Ok(())
    }
    let mut out = Vec::new();
    for name in wanted {
        visit(name, depends, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Module names (`-` and `_` as the file is named) to their files.
fn module_files(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                files.insert(name.to_owned(), path.clone());
            }
        }
    }
    Ok(files)
}

/// Looks a dependency name up: `depends=` spells names with `_` or `-` as
/// the module's file is named, so try both.
fn find<'a>(files: &'a BTreeMap<String, PathBuf>, name: &str) -> Option<(String, &'a PathBuf)> {
    [
        name.to_owned(),
        name.replace('_', "-"),
        name.replace('-', "_"),
    ]
    .into_iter()
    .find_map(|n| files.get(&n).map(|p| (n, p)))
}

/// The modules to load, in order, as `(name, contents)`.
pub fn kernel_modules(modules_dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let files = module_files(modules_dir)?;
    let mut depends = BTreeMap::new();
    let mut contents = BTreeMap::new();
    let mut todo: Vec<String> = MODULES.iter().map(|m| (*m).to_owned()).collect();
    while let Some(name) = todo.pop() {
        if depends.contains_key(&name) {
            continue;
        }
        let (file_name, path) = find(&files, &name)
            .with_context(|| format!("kernel module {name} is not in {}", modules_dir.display()))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let deps: Vec<String> = modinfo_depends(&bytes)
            .into_iter()
            .map(|d| find(&files, &d).map_or(d, |(n, _)| n))
            .collect();
        todo.extend(deps.iter().cloned());
        depends.insert(file_name.clone(), deps);
        if file_name != name {
            depends.insert(name.clone(), vec![file_name.clone()]);
        }
        contents.insert(file_name, bytes);
    }
    let order = load_order(MODULES, &depends)?;
    Ok(order
        .into_iter()
        .filter_map(|name| contents.remove(&name).map(|bytes| (name, bytes)))
        .collect())
}

/// containerd's configuration: the CRI plugin with the baked pause image,
/// runc without `pivot_root` (the node's root is the initramfs, which
/// cannot be pivoted away from), cgroupfs, and the CNI plugins above.
pub fn containerd_config() -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        NoPivotRoot = true
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"#
    )
}

/// The pod network of the node: a bridge with host-local addresses, no
/// masquerading (pods talk to nothing outside the node).
pub fn cni_config() -> String {
    r#"{
  "cniVersion": "1.0.0",
  "name": "node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "10.244.0.0/24" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "loopback" }
  ]
}
"#
    .to_owned()
}

/// The kubelet's configuration file: cgroupfs (no systemd in the image),
/// containerd's socket, no swap failure, the static CPU manager off, its
/// state on the encrypted disk (`/var/lib/kubelet`). Its API (logs, exec,
/// port-forward for the API server) accepts client certificates of the
/// cluster CA the gate handed the node at join (written at boot to
/// `/run/kubelet/ca.crt`), authorized by the API server (Webhook), as in
/// a kubeadm cluster; anonymous requests are refused.
pub fn kubelet_config() -> String {
    r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
cpuManagerPolicy: none
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: /run/kubelet/ca.crt
authorization:
  mode: Webhook
rotateCertificates: true
serverTLSBootstrap: false
resolvConf: /etc/resolv.conf
podPidsLimit: 256
registerNode: true
syncFrequency: 10s
nodeStatusUpdateFrequency: 10s
imageGCHighThresholdPercent: 100
evictionHard:
  memory.available: "20Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
"#
    .to_owned()
}

/// The layer of a busybox-based image: busybox at `/bin/busybox`.
fn busybox_layer(busybox: &[u8]) -> Vec<LayerFile> {
    let mut files = crate::images::user_files();
    files.push(LayerFile {
        path: "bin/busybox".into(),
        mode: 0o755,
        contents: busybox.to_vec(),
    });
    files
}

fn node_image_meta(name: &str) -> ImageMeta {
    ImageMeta {
        name: name.to_owned(),
        version: "1".to_owned(),
        revision: "node-image".to_owned(),
        source: "https://github.com/kubectl-confidential/kubectl-confidential".to_owned(),
        mtime: u64::from(super::FIXED_MTIME),
    }
}

/// A container image baked into the node image.
#[derive(Clone, Debug)]
pub struct BakedImage {
    /// Its file name under [`IMAGES_DIR`].
    pub file_name: String,
    /// `repository:tag`.
    pub reference: String,
    /// `repository@sha256:<manifest digest>`.
    pub digest_reference: String,
    /// `sha256:<manifest digest>`.
    pub digest: String,
    /// The OCI archive `ctr images import` reads: its index names the image
    /// by tag and by digest.
    pub archive: Vec<u8>,
}

impl BakedImage {
    /// `image` as the archive `file_name` under [`IMAGES_DIR`].
    pub fn new(file_name: &str, image: &Image) -> Result<Self> {
        Ok(Self {
            file_name: file_name.to_owned(),
            reference: image.reference(),
            digest_reference: image.digest_reference(),
            digest: image.digest().to_owned(),
            archive: image.archive_named(IndexNames::TagAndDigest)?,
        })
    }
}

fn pause_image(busybox: &[u8]) -> Result<BakedImage> {
    let image = crate::images::image_with_entrypoint(
        &node_image_meta("pause"),
        &busybox_layer(busybox),
        &["/bin/busybox", "sleep", "2147483647"],
    )?;
    debug_assert_eq!(image.reference(), PAUSE_IMAGE);
    BakedImage::new("pause.tar", &image)
}

/// The demo workload image as the node image bakes it with `busybox`.
pub fn demo_image(busybox: &[u8]) -> Result<BakedImage> {
    let demo_script =
        format!("echo \"{DEMO_LOG_LINE}\"; while true; do /bin/busybox sleep 3600; done");
    let image = crate::images::image_with_entrypoint(
        &node_image_meta("demo"),
        &busybox_layer(busybox),
        &["/bin/busybox", "sh", "-c", demo_script.as_str()],
    )?;
    debug_assert_eq!(image.reference(), DEMO_IMAGE);
    BakedImage::new("demo.tar", &image)
}

/// The demo workload image the node images of this machine bake (from its
/// busybox, [`super::BUSYBOX`]): what a Pod pins by digest.
pub fn system_demo_image() -> Result<BakedImage> {
    let busybox = std::fs::read(super::BUSYBOX).with_context(|| {
        format!(
            "reading {} (busybox-static; scripts/install-deps installs it)",
            super::BUSYBOX
        )
    })?;
    demo_image(&busybox)
}

/// The pause and demo images, sorted by file name.
pub fn container_images(busybox: &[u8]) -> Result<Vec<BakedImage>> {
    Ok(vec![demo_image(busybox)?, pause_image(busybox)?])
}

/// Every file the runtime adds besides the binaries: configuration, the
/// ordered module list and the modules, the container images.
pub fn files(runtime: &NodeRuntime, busybox: &[u8]) -> Result<Vec<RuntimeFile>> {
    let mut out: Vec<RuntimeFile> = vec![
        (
            "etc/containerd/config.toml".into(),
            0o644,
            containerd_config().into_bytes(),
        ),
        (
            "etc/cni/net.d/10-node.conflist".into(),
            0o644,
            cni_config().into_bytes(),
        ),
        (
            "etc/kubernetes/kubelet.yaml".into(),
            0o644,
            kubelet_config().into_bytes(),
        ),
        (
            "etc/resolv.conf".into(),
            0o644,
            b"nameserver 127.0.0.1\n".to_vec(),
        ),
        ("etc/hosts".into(), 0o644, b"127.0.0.1 localhost\n".to_vec()),
        (
            "etc/mke2fs.conf".into(),
            0o644,
            std::fs::read("/etc/mke2fs.conf").context("reading /etc/mke2fs.conf (e2fsprogs)")?,
        ),
    ];
    let modules = kernel_modules(&runtime.modules_dir)?;
    let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
    out.push(("etc/node-modules".into(), 0o644, order.into_bytes()));
    for (name, bytes) in modules {
        out.push((format!("lib/modules/{name}.ko"), 0o644, bytes));
    }
    let mut images = container_images(busybox)?;
    images.extend(runtime.extra_images.iter().cloned());
    let mut names = std::collections::BTreeSet::new();
    for image in images {
        if !names.insert(image.file_name.clone()) {
            bail!("two baked images are named {}", image.file_name);
        }
        if !image.file_name.ends_with(".tar") || image.file_name.contains('/') {
            bail!(
                "baked image file {:?}: a plain name ending in .tar (init imports {IMAGES_DIR}/*.tar)",
                image.file_name
            );
        }
        out.push((
            format!("{IMAGES_DIR}/{}", image.file_name),
            0o644,
            image.archive,
        ));
    }
    Ok(out)
}

/// The binaries: Debian's and the kubelet, `(archive path, host path, mode)`.
pub fn binaries(runtime: &NodeRuntime) -> Result<Vec<(String, PathBuf, u32)>> {
    let mut out = Vec::new();
    for (path, host) in SYSTEM_BINARIES {
        if !Path::new(host).exists() {
            bail!(
                "{host} is missing: run scripts/install-deps (containerd, runc, containernetworking-plugins, cryptsetup-bin, e2fsprogs, nftables)"
            );
        }
        out.push(((*path).to_owned(), PathBuf::from(host), 0o755));
    }
    for (name, host) in [
        ("kubelet", &runtime.kubelet),
        ("kube-proxy", &runtime.kube_proxy),
    ] {
        if !host.is_file() {
            bail!("the {name} {} is missing", host.display());
        }
        out.push((format!("usr/bin/{name}"), host.clone(), 0o755));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_reads_the_field() {
        let modinfo = b"\0license=GPL\0depends=dm-mod,dm-bufio\0intree=Y\0";
        assert_eq!(modinfo_depends(modinfo), ["dm-mod", "dm-bufio"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let depends = BTreeMap::from([
            ("dm-crypt".to_owned(), vec!["dm-mod".to_owned()]),
            ("dm-mod".to_owned(), vec![]),
            (
                "bridge".to_owned(),
                vec!["stp".to_owned(), "llc".to_owned()],
            ),
            ("stp".to_owned(), vec!["llc".to_owned()]),
            ("llc".to_owned(), vec![]),
        ]);
        assert_eq!(
            load_order(&["dm-crypt", "bridge"], &depends).expect("order"),
            ["dm-mod", "dm-crypt", "llc", "stp", "bridge"]
        );
        let err = load_order(&["missing"], &depends).expect_err("unknown");
        assert!(err.to_string().contains("missing"), "{err}");
        let cycle = BTreeMap::from([
            ("a".to_owned(), vec!["b".to_owned()]),
            ("b".to_owned(), vec!["a".to_owned()]),
        ]);
        assert!(load_order(&["a"], &cycle).is_err());
    }

    #[test]
    fn baked_images_have_the_names_the_configuration_uses() {
        let images = container_images(b"not really busybox").expect("images");
        let names: Vec<&str> = images.iter().map(|i| i.file_name.as_str()).collect();
        assert_eq!(names, ["demo.tar", "pause.tar"]);
        assert_eq!(images[0].reference, DEMO_IMAGE);
        assert_eq!(images[1].reference, PAUSE_IMAGE);
        assert!(containerd_config().contains(PAUSE_IMAGE));
    }

    /// The index of each archive names the same manifest by tag and by
    /// digest: what `ctr images import` turns into two names in the store.
    #[test]
    fn each_baked_archive_names_its_manifest_by_tag_and_by_digest() {
        for image in container_images(b"not really busybox").expect("images") {
            let mut archive = tar::Archive::new(image.archive.as_slice());
            let mut index = None;
            let mut manifest_blob = false;
            let blob_path = format!(
                "blobs/sha256/{}",
                image.digest.trim_start_matches("sha256:")
            );
            for entry in archive.entries().expect("entries") {
                let mut entry = entry.expect("entry");
                let path = entry.path().expect("path").display().to_string();
                if path == "index.json" {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut entry, &mut text).expect("read");
                    index = Some(serde_json::from_str::<serde_json::Value>(&text).expect("json"));
                }
                manifest_blob |= path == blob_path;
            }
            assert!(manifest_blob, "{} carries its manifest", image.file_name);
            let index = index.expect("index.json");
            let entries = index["manifests"].as_array().expect("manifests");
            let named: Vec<(&str, &str)> = entries
                .iter()
                .map(|m| {
                    (
                        m["annotations"]["io.containerd.image.name"]
                            .as_str()
                            .expect("name"),
                        m["digest"].as_str().expect("digest"),
                    )
                })
                .collect();
            assert_eq!(
                named,
                [
                    (image.reference.as_str(), image.digest.as_str()),
                    (image.digest_reference.as_str(), image.digest.as_str()),
                ]
            );
            let (repository, tag) = image.reference.rsplit_once(':').expect("tag");
            assert_eq!(tag, "v1");
            assert_eq!(
                image.digest_reference,
                format!("{repository}@{}", image.digest)
            );
        }
    }

    #[test]
    fn the_demo_digest_follows_the_busybox_it_is_built_from() {
        let a = demo_image(b"one busybox").expect("demo");
        let b = demo_image(b"one busybox").expect("demo");
        let c = demo_image(b"another busybox").expect("demo");
        assert_eq!(a.digest, b.digest, "reproducible");
        assert_eq!(a.archive, b.archive, "reproducible");
        assert_ne!(a.digest, c.digest);
        assert!(
            a.digest.len() == 71 && a.digest.starts_with("sha256:"),
            "{}",
            a.digest
        );
    }
}
