//! `cargo xtask node-image --version v1 [--out DIR]`: builds the node image,
//! a UKI (Debian's cloud kernel + an initramfs holding the node OS + the
//! kernel command line, on systemd's EFI stub) that OVMF boots as
//! `EFI/BOOT/BOOTX64.EFI` with measured boot.
//!
//! Reproducible: the same inputs give the same bytes (sorted cpio with fixed
//! times and owners, gzip without a name or time, objcopy keeping the stub's
//! timestamp). The inputs are pinned: the kernel package version below, the
//! Debian packages of `busybox-static` and `systemd-boot-efi`, and the
//! bootstrapper binary. Versions v1 and v2 differ in `/etc/os-release`
//! (`VERSION_ID`) and `/etc/node-image-version`.

pub mod cpio;
pub mod initramfs;
pub mod runtime;
pub mod uki;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;

pub use initramfs::NodeOsInputs;

/// The Debian cloud kernel the image boots (virtio, TPM and dm-crypt support).
pub const KERNEL_PACKAGE: &str = "linux-image-6.1.0-56-cloud-amd64";
/// The kernel release inside [`KERNEL_PACKAGE`].
pub const KERNEL_RELEASE: &str = "6.1.0-56-cloud-amd64";
/// systemd's EFI stub (`systemd-boot-efi`).
pub const EFI_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// Debian's static busybox (`busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";
/// The kernel command line of every image: serial console, reboot instead of
/// hanging on a panic, quiet kernel (serial output costs boot time).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 printk.time=1";
/// Every file's mtime in the initramfs (2024-01-01T00:00:00Z).
pub const FIXED_MTIME: u32 = 1_704_067_200;

/// A node image version name: `v` followed by digits (the image reference's tag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageVersion(String);

impl std::str::FromStr for ImageVersion {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let ok = s
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            bail!("image version {s:?} must be `v` followed by digits, e.g. v1");
        }
        Ok(Self(s.to_owned()))
    }
}

impl ImageVersion {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The cache of downloaded build inputs (same place as the test
/// environment's control-plane binaries).
pub fn cache_root() -> PathBuf {
    std::env::var_os("CONFIDENTIAL_TESTENV_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| PathBuf::from(d).join("kubectl-confidential"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/kubectl-confidential"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("kubectl-confidential-cache"))
}

/// The cloud kernel's `vmlinuz`, unpacked from the Debian package into the
/// cache (`apt-get download` + `dpkg -x`, never installed as the host's kernel).
pub fn ensure_kernel() -> Result<PathBuf> {
    let dir = kernel_dir();
    let vmlinuz = dir.join(format!("boot/vmlinuz-{KERNEL_RELEASE}"));
    if vmlinuz.exists() {
        return Ok(vmlinuz);
    }
    let download = tempfile::Builder::new().prefix("kernel-deb-").tempdir()?;
    let status = Command::new("apt-get")
        .args(["download", KERNEL_PACKAGE])
        .current_dir(download.path())
        .status()
        .context("running apt-get download")?;
    if !status.success() {
        bail!("apt-get download {KERNEL_PACKAGE} failed; run scripts/install-deps");
    }
    let deb = std::fs::read_dir(download.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download wrote no .deb")?;
    let staging = cache_root().join(format!("kernel-{KERNEL_RELEASE}.partial"));
    // A leftover from an interrupted unpack is replaced.
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let status = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&staging)
        .status()
        .context("running dpkg -x")?;
    if !status.success() {
        bail!("dpkg -x {} failed", deb.display());
    }
    std::fs::rename(&staging, &dir).with_context(|| format!("moving into {}", dir.display()))?;
    Ok(vmlinuz)
}

fn kernel_dir() -> PathBuf {
    cache_root().join(format!("kernel-{KERNEL_RELEASE}"))
}

/// `lib/modules/<release>` of the cached kernel package.
pub fn ensure_kernel_modules() -> Result<PathBuf> {
    ensure_kernel()?;
    Ok(kernel_dir().join(format!("lib/modules/{KERNEL_RELEASE}")))
}

/// Everything an image is built from.
#[derive(Clone, Debug)]
pub struct NodeImageInputs {
    pub kernel: PathBuf,
    pub stub: PathBuf,
    pub os: NodeOsInputs,
}

impl NodeImageInputs {
    /// The pinned inputs of this machine, with `bootstrapper` as the node agent.
    pub fn system(bootstrapper: PathBuf) -> Result<Self> {
        for (path, package) in [(EFI_STUB, "systemd-boot-efi"), (BUSYBOX, "busybox-static")] {
            if !Path::new(path).exists() {
                bail!("{path} is missing: install {package} (scripts/install-deps)");
            }
        }
        Ok(Self {
            kernel: ensure_kernel()?,
            stub: PathBuf::from(EFI_STUB),
            os: NodeOsInputs {
                busybox: PathBuf::from(BUSYBOX),
                bootstrapper,
                extra_files: Vec::new(),
                runtime: None,
            },
        })
    }

    /// A node image: the pinned inputs plus the node runtime with `kubelet`
    /// and `kube_proxy`.
    pub fn node(bootstrapper: PathBuf, kubelet: PathBuf, kube_proxy: PathBuf) -> Result<Self> {
        let mut inputs = Self::system(bootstrapper)?;
        inputs.os.runtime = Some(runtime::NodeRuntime {
            kubelet,
            kube_proxy,
            modules_dir: ensure_kernel_modules()?,
            extra_images: Vec::new(),
        });
        Ok(inputs)
    }
}

/// The gzip-compressed newc initramfs of `version` (gzip header without
/// name and with mtime 0, so the bytes depend only on the contents).
pub fn initramfs(version: &ImageVersion, os: &NodeOsInputs) -> Result<Vec<u8>> {
    let cpio = initramfs::archive(version.as_str(), os)?.to_newc(FIXED_MTIME)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::new(6));
    gz.write_all(&cpio)?;
    Ok(gz.finish()?)
}

/// Builds the UKI of `version` into `out_dir/node-<version>.efi`, returns its path.
pub fn build(version: &ImageVersion, inputs: &NodeImageInputs, out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let sections = uki::UkiSections {
        osrel: initramfs::os_release(version.as_str()).into_bytes(),
        cmdline: KERNEL_CMDLINE.as_bytes().to_vec(),
        uname: KERNEL_RELEASE.as_bytes().to_vec(),
        linux: std::fs::read(&inputs.kernel)
            .with_context(|| format!("reading {}", inputs.kernel.display()))?,
        initrd: initramfs(version, &inputs.os)?,
    };
    let work = tempfile::Builder::new().prefix("uki-").tempdir()?;
    let out = out_dir.join(format!("node-{}.efi", version.as_str()));
    uki::assemble(&inputs.stub, &sections, work.path(), &out)?;
    Ok(out)
}
