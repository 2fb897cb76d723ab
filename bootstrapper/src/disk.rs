//! The encrypted state disk: LUKS2 through `cryptsetup`, keyed with the
//! per-disk key the gate derived for this attested machine.
//!
//! Formatting destroys data, so it happens only on an explicit answer: `cryptsetup
//! isLuks` exiting 1 ("not LUKS"). Every other outcome (another exit code, a
//! signal, `cryptsetup` missing, the device missing) is an error and nothing
//! is formatted. The decision is the pure [`classify_is_luks`]; the process
//! I/O is [`Cryptsetup`]. The probe runs before the node joins (a broken disk
//! setup costs no join token) and the key goes to `cryptsetup` on stdin,
//! never on its command line.
//!
//! The key is 32 uniformly random bytes the gate derived (HKDF), not a
//! passphrase: a slow PBKDF adds no strength, and Argon2's default memory
//! cost (up to half the VM's RAM) would crowd out the node's pods, so the
//! keyslot uses PBKDF2 at cryptsetup's minimum iteration count.
//!
//! The opened volume gets an ext4 file system only right after this node
//! formatted it ([`StateFilesystem`]): an existing volume is never given a
//! new file system, so a reboot keeps the kubelet's and containerd's state.
//!
//! Unit tests run this against recorded `cryptsetup` stand-ins (shell
//! scripts that record argv and stdin); real LUKS2 on a virtio disk runs in
//! the VM suite (`e2e/tests/vm_node.rs`).

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

mod filesystem;
pub use filesystem::StateFilesystem;

/// Name of the opened mapping: `/dev/mapper/state`.
pub const MAPPING_NAME: &str = "state";

/// What `cryptsetup isLuks` said about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksProbe {
    /// Exit 0: a LUKS header is present; open it.
    Luks,
    /// Exit 1: no LUKS header; format, then open.
    NotLuks,
}

/// The cryptsetup calls a probe result leads to, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksStep {
    Format,
    Open,
}

#[derive(Debug, Error)]
pub enum DiskError {
    #[error(
        "state device {0} does not exist: attach the state disk or fix --state-device (nothing was formatted)"
    )]
    DeviceMissing(PathBuf),
    #[error(
        "cannot run {program:?} ({source}): install cryptsetup on the node image (nothing was formatted)"
    )]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`cryptsetup isLuks {device}` failed ({status}): neither LUKS nor plainly not LUKS, so the disk is not formatted; check the device"
    )]
    ProbeFailed { device: PathBuf, status: String },
    #[error("`cryptsetup {step}` on {device} failed ({status})")]
    StepFailed {
        step: &'static str,
        device: PathBuf,
        status: String,
    },
    #[error("passing the key to cryptsetup on stdin: {0}")]
    Stdin(#[source] std::io::Error),
}

/// The pure decision: only exit code 1 means "not LUKS"; a missing code
/// (killed by a signal) or any other code is a failure.
pub fn classify_is_luks(exit_code: Option<i32>) -> Result<LuksProbe, Option<i32>> {
    match exit_code {
        Some(0) => Ok(LuksProbe::Luks),
        Some(1) => Ok(LuksProbe::NotLuks),
        other => Err(other),
    }
}

/// The steps after a probe.
pub fn plan(probe: LuksProbe) -> &'static [LuksStep] {
    match probe {
        LuksProbe::Luks => &[LuksStep::Open],
        LuksProbe::NotLuks => &[LuksStep::Format, LuksStep::Open],
    }
}

/// The argv of a step (after the program name). The key is read from
/// stdin (`--key-file -`).
pub fn step_args(step: LuksStep, device: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = match step {
        LuksStep::Format => [
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
        ]
        .map(OsString::from)
        .to_vec(),
        LuksStep::Open => ["open", "--type", "luks2", "--key-file", "-"]
            .map(OsString::from)
            .to_vec(),
    };
    args.push(device.as_os_str().to_owned());
    if step == LuksStep::Open {
        args.push(MAPPING_NAME.into());
    }
    args
}

fn step_name(step: LuksStep) -> &'static str {
    match step {
        LuksStep::Format => "luksFormat",
        LuksStep::Open => "open",
    }
}

pub(crate) fn describe(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    }
}

/// `cryptsetup`, found on `PATH` unless a program path is given.
#[derive(Debug, Clone)]
pub struct Cryptsetup {
    program: OsString,
}

impl Default for Cryptsetup {
    fn default() -> Self {
        Self {
            program: "cryptsetup".into(),
        }
    }
}

impl Cryptsetup {
    #[cfg(test)]
    pub fn at(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
        }
    }

    fn command(&self) -> Command {
        Command::new(&self.program)
    }

    fn spawn_error(&self, source: std::io::Error) -> DiskError {
        DiskError::Spawn {
            program: self.program.clone(),
            source,
        }
    }

    /// Checks the device exists and asks `cryptsetup isLuks`.
    pub fn probe(&self, device: &Path) -> Result<LuksProbe, DiskError> {
        if !device.exists() {
            return Err(DiskError::DeviceMissing(device.to_owned()));
        }
        let status = self
            .command()
            .arg("isLuks")
            .arg(device)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| self.spawn_error(e))?;
        let probe = classify_is_luks(status.code()).map_err(|_| DiskError::ProbeFailed {
            device: device.to_owned(),
            status: describe(status),
        })?;
        tracing::info!(device = %device.display(), ?probe, "probed state disk");
        Ok(probe)
    }

    /// Runs the steps `probe` leads to, each with `key` on stdin.
    pub fn apply(&self, device: &Path, probe: LuksProbe, key: &[u8]) -> Result<(), DiskError> {
        for step in plan(probe) {
            let mut child = self
                .command()
                .args(step_args(*step, device))
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| self.spawn_error(e))?;
            let written = match child.stdin.take() {
                Some(mut stdin) => stdin.write_all(key),
                None => Err(std::io::Error::other("no stdin pipe")),
            };
            // Wait even when writing failed, so no zombie is left behind.
            let status = child.wait().map_err(|e| self.spawn_error(e))?;
            written.map_err(DiskError::Stdin)?;
            if !status.success() {
                return Err(DiskError::StepFailed {
                    step: step_name(*step),
                    device: device.to_owned(),
                    status: describe(status),
                });
            }
            tracing::info!(device = %device.display(), step = step_name(*step), "state disk step done");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_testenv::standin::Standin;

    #[test]
    fn only_exit_code_one_means_not_luks() {
        assert_eq!(classify_is_luks(Some(0)), Ok(LuksProbe::Luks));
        assert_eq!(classify_is_luks(Some(1)), Ok(LuksProbe::NotLuks));
        for code in [Some(2), Some(4), Some(5), Some(127), Some(-1), None] {
            assert_eq!(classify_is_luks(code), Err(code));
        }
        assert_eq!(plan(LuksProbe::Luks), &[LuksStep::Open]);
        assert_eq!(
            plan(LuksProbe::NotLuks),
            &[LuksStep::Format, LuksStep::Open]
        );
    }

    fn device(dir: &Path) -> PathBuf {
        let device = dir.join("vdb");
        std::fs::write(&device, b"").expect("device stand-in");
        device
    }

    /// Runs probe + apply against a recorded cryptsetup exiting `is_luks`
    /// on `isLuks` and 0 otherwise.
    fn run(is_luks: i32) -> (Standin, PathBuf, Result<(), DiskError>) {
        let standin = Standin::new("cryptsetup", &[("isLuks", is_luks)]).expect("stand-in");
        let device = device(standin.dir());
        let cryptsetup = Cryptsetup::at(standin.program());
        let result = cryptsetup
            .probe(&device)
            .and_then(|probe| cryptsetup.apply(&device, probe, b"the-disk-key"));
        (standin, device, result)
    }

    #[test]
    fn luks_device_is_opened_not_formatted() {
        let (standin, device, result) = run(0);
        result.expect("opened");
        let calls = standin.calls().expect("recorded calls");
        let dev = device.display().to_string();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].argv, ["isLuks", dev.as_str()]);
        assert_eq!(calls[0].stdin, b"");
        assert_eq!(
            calls[1].argv,
            [
                "open",
                "--type",
                "luks2",
                "--key-file",
                "-",
                dev.as_str(),
                "state"
            ]
        );
        assert_eq!(calls[1].stdin, b"the-disk-key");
    }

    #[test]
    fn device_without_luks_is_formatted_then_opened() {
        let (standin, device, result) = run(1);
        result.expect("formatted and opened");
        let calls = standin.calls().expect("recorded calls");
        let dev = device.display().to_string();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(
            calls[1].argv,
            [
                "luksFormat",
                "--type",
                "luks2",
                "--batch-mode",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                "-",
                dev.as_str()
            ]
        );
        assert_eq!(calls[1].stdin, b"the-disk-key");
        assert_eq!(calls[2].argv[0], "open");
        assert_eq!(calls[2].stdin, b"the-disk-key");
        for call in &calls {
            assert!(
                !call.argv.iter().any(|a| a.contains("the-disk-key")),
                "the key must never be on the command line: {call:?}"
            );
        }
    }

    #[test]
    fn any_other_probe_failure_is_an_error_and_never_formats() {
        for code in [2, 3, 4, 5, 127] {
            let (standin, _device, result) = run(code);
            let err = result.expect_err("probe failure");
            assert!(
                matches!(err, DiskError::ProbeFailed { .. }),
                "{code}: {err}"
            );
            assert!(
                err.to_string().contains(&format!("exit code {code}")),
                "{err}"
            );
            let calls = standin.calls().expect("recorded calls");
            assert_eq!(
                calls.len(),
                1,
                "only the probe ran for exit {code}: {calls:?}"
            );
            assert_eq!(calls[0].argv[0], "isLuks");
        }
    }

    #[test]
    fn missing_cryptsetup_or_device_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = device(dir.path());
        let err = Cryptsetup::at(dir.path().join("no-cryptsetup"))
            .probe(&device)
            .expect_err("no program");
        assert!(matches!(err, DiskError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("install cryptsetup"), "{err}");

        let standin = Standin::new("cryptsetup", &[("isLuks", 1)]).expect("stand-in");
        let err = Cryptsetup::at(standin.program())
            .probe(&dir.path().join("no-such-device"))
            .expect_err("no device");
        assert!(matches!(err, DiskError::DeviceMissing(_)), "{err}");
        assert!(
            standin.calls().expect("recorded calls").is_empty(),
            "cryptsetup never ran"
        );
    }

    #[test]
    fn failing_format_stops_before_open() {
        let standin =
            Standin::new("cryptsetup", &[("isLuks", 1), ("luksFormat", 2)]).expect("stand-in");
        let device = device(standin.dir());
        let cryptsetup = Cryptsetup::at(standin.program());
        let probe = cryptsetup.probe(&device).expect("not LUKS");
        let err = cryptsetup
            .apply(&device, probe, b"k")
            .expect_err("format failed");
        assert!(err.to_string().contains("luksFormat"), "{err}");
        let calls = standin.calls().expect("recorded calls");
        assert_eq!(calls.len(), 2, "no open after a failed format: {calls:?}");
    }
}
