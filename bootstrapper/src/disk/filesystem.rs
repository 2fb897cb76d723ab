//! The opened state volume as a file system: ext4 made only on a volume
//! this boot formatted ([`needs_filesystem`]), then mounted where the
//! kubelet and containerd keep their state.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{DiskError, LuksProbe, MAPPING_NAME, describe};

/// The opened volume as a file system: `mkfs.ext4` and `mount`, found on
/// `PATH` unless program paths are given.
#[derive(Debug, Clone)]
pub struct StateFilesystem {
    mkfs: OsString,
    mount: OsString,
}

impl Default for StateFilesystem {
    fn default() -> Self {
        Self {
            mkfs: "mkfs.ext4".into(),
            mount: "mount".into(),
        }
    }
}

/// Whether the opened volume needs a new file system: only when this boot
/// formatted the LUKS volume (the pure decision).
pub fn needs_filesystem(probe: LuksProbe) -> bool {
    probe == LuksProbe::NotLuks
}

/// The opened volume's device.
pub fn mapping_device() -> PathBuf {
    Path::new("/dev/mapper").join(MAPPING_NAME)
}

impl StateFilesystem {
    #[cfg(test)]
    pub fn at(mkfs: impl Into<OsString>, mount: impl Into<OsString>) -> Self {
        Self {
            mkfs: mkfs.into(),
            mount: mount.into(),
        }
    }

    fn run(
        &self,
        program: &OsString,
        args: &[&std::ffi::OsStr],
        step: &'static str,
    ) -> Result<(), DiskError> {
        let status = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .status()
            .map_err(|source| DiskError::Spawn {
                program: program.clone(),
                source,
            })?;
        if !status.success() {
            return Err(DiskError::StepFailed {
                step,
                device: mapping_device(),
                status: describe(status),
            });
        }
        Ok(())
    }

    /// Creates the file system when `probe` says the volume was just
    /// formatted, then mounts it at `target`.
    pub fn mount(&self, probe: LuksProbe, target: &Path) -> Result<(), DiskError> {
        self.mount_device(&mapping_device(), probe, target)
    }

    fn mount_device(
        &self,
        device: &Path,
        probe: LuksProbe,
        target: &Path,
    ) -> Result<(), DiskError> {
        if needs_filesystem(probe) {
            self.run(
                &self.mkfs,
                &[
                    "-q".as_ref(),
                    "-L".as_ref(),
                    "state".as_ref(),
                    device.as_os_str(),
                ],
                "mkfs.ext4",
            )?;
            tracing::info!(device = %device.display(), "made the state file system");
        }
        self.run(
            &self.mount,
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                device.as_os_str(),
                target.as_os_str(),
            ],
            "mount",
        )?;
        tracing::info!(device = %device.display(), target = %target.display(), "mounted the state disk");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_testenv::standin::Standin;

    #[test]
    fn a_file_system_is_made_only_on_a_volume_this_boot_formatted() {
        for (probe, expected) in [
            (LuksProbe::NotLuks, vec!["mkfs.ext4", "mount"]),
            (LuksProbe::Luks, vec!["mount"]),
        ] {
            let mkfs = Standin::new("mkfs.ext4", &[]).expect("stand-in");
            let mount = Standin::new("mount", &[]).expect("stand-in");
            let fs = StateFilesystem::at(mkfs.program(), mount.program());
            fs.mount_device(Path::new("/dev/mapper/state"), probe, Path::new("/var/lib"))
                .expect("mounted");
            let mut ran: Vec<&str> = Vec::new();
            let mkfs_calls = mkfs.calls().expect("calls");
            let mount_calls = mount.calls().expect("calls");
            if !mkfs_calls.is_empty() {
                assert_eq!(
                    mkfs_calls[0].argv,
                    ["-q", "-L", "state", "/dev/mapper/state"]
                );
                ran.push("mkfs.ext4");
            }
            assert_eq!(
                mount_calls[0].argv,
                ["-t", "ext4", "/dev/mapper/state", "/var/lib"]
            );
            ran.push("mount");
            assert_eq!(ran, expected, "{probe:?}");
        }
    }

    #[test]
    fn a_failed_mkfs_mounts_nothing() {
        let mkfs = Standin::new("mkfs.ext4", &[("-q", 1)]).expect("stand-in");
        let mount = Standin::new("mount", &[]).expect("stand-in");
        let err = StateFilesystem::at(mkfs.program(), mount.program())
            .mount_device(
                Path::new("/dev/mapper/state"),
                LuksProbe::NotLuks,
                Path::new("/var/lib"),
            )
            .expect_err("mkfs failed");
        assert!(err.to_string().contains("mkfs.ext4"), "{err}");
        assert!(mount.calls().expect("calls").is_empty());
    }
}
