//! Files holding secrets (the state disk key, the kubelet bootstrap
//! kubeconfig with its token, the AK state): mode 0600, also when a file of
//! that name already exists with wider permissions.
//!
//! A secret is written to a fresh temporary file created 0600 in the same
//! directory and renamed over the target, so its bytes never sit in a file
//! others can read, and a symlink planted at the target is replaced instead of
//! followed.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Owner read/write only.
pub const SECRET_MODE: u32 = 0o600;

/// Writes `bytes` to `path` with mode 0600, replacing whatever was there.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path)?;
    let result = (|| -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SECRET_MODE)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // The mode passed to open is filtered by the umask; make sure.
        file.set_permissions(std::fs::Permissions::from_mode(SECRET_MODE))
            .with_context(|| format!("restricting {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        // Best effort: the temporary file may not even exist.
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::debug!(path = %tmp.display(), error = %e, "no temporary file to remove");
        }
    }
    result.with_context(|| format!("writing secret file {}", path.display()))
}

/// Restricts an existing secret file to 0600 (a no-op when it is absent).
pub fn restrict_existing(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => anyhow::bail!(
            "{} is a symlink; a secret file must be a regular file (remove the link)",
            path.display()
        ),
        Ok(_) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(SECRET_MODE))
            .with_context(|| format!("restricting {} to mode 0600", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
}

fn temporary_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn new_secret_file_is_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.key");
        write_secret(&path, b"key").expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"key");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no leftovers"
        );
    }

    #[test]
    fn existing_world_readable_file_is_replaced_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bootstrap.kubeconfig");
        std::fs::write(&path, b"old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_secret(&path, b"new").expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").expect("write");
        let path = dir.path().join("disk.key");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        write_secret(&path, b"key").expect("written");
        assert_eq!(std::fs::read(&victim).expect("read"), b"untouched");
        assert!(
            !std::fs::symlink_metadata(&path)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"key");
    }

    #[test]
    fn restrict_existing_tightens_and_ignores_absent_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ak.blob");
        restrict_existing(&path).expect("absent is fine");
        std::fs::write(&path, b"blob").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        restrict_existing(&path).expect("restricted");
        assert_eq!(mode(&path), 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let err = restrict_existing(&link).expect_err("symlink refused");
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let err =
            write_secret(Path::new("/proc/no-such-dir/disk.key"), b"k").expect_err("cannot write");
        assert!(
            format!("{err:#}").contains("/proc/no-such-dir/disk.key"),
            "{err:#}"
        );
    }
}
