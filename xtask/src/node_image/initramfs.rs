//! The node OS as an initramfs: busybox as init and shell, the
//! `confidential-bootstrapper` with exactly the shared libraries `ldd` says
//! it loads (plus the TPM device TCTI, which the TSS loader opens with
//! `dlopen` and `ldd` cannot see), an init script, and the image's identity
//! (`/etc/os-release`, `/etc/node-image-version`).
//!
//! Everything is read from the build machine into memory and placed at
//! fixed archive paths, so no build path and no file time leaks into the
//! image. The kubelet, containerd, runc and the CNI plugins join this list
//! in "Boot to Ready" (see [`NodeOsInputs::extra_files`]).

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
    /// Further files as `(archive path, host file, mode)`: where the kubelet,
    /// containerd, runc and CNI plugins go once the node runs them.
    pub extra_files: Vec<(String, PathBuf, u32)>,
}

/// The init script: mounts the kernel file systems, prints the image version
/// and the boot measurements (PCR values as the kernel reads them from the
/// TPM, and the firmware's event log; both public, what a verifier is shown
/// anyway) on the console, then hands over to the node agent.
pub fn init_script() -> String {
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
# Boot to Ready starts here: the state disk, containerd, the kubelet and
# `confidential-bootstrapper` (with --tcti device:/dev/tpmrm0) are started
# by this script once the image carries them.
echo "node-image: waiting (the node agent is not started by this image yet)"
while true; do sleep 3600; done
"#
    .to_owned()
}

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
    archive.add(
        "init",
        EntryKind::File {
            mode: 0o755,
            contents: init_script().into_bytes(),
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
    for (path, host, mode) in &inputs.extra_files {
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
