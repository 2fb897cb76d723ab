//! The node image booted for real: `cargo xtask node-image` builds a UKI,
//! QEMU boots it under OVMF with a swtpm vTPM, and the PCRs the kernel reads
//! from the vTPM (printed by the image's init on the serial console) must
//! equal what `measurements compute --uki` predicts from the file alone, for
//! every PCR a policy enforces.
//!
//! The VM runs on KVM; `CONFIDENTIAL_VM_ACCEL=tcg` boots with QEMU's
//! emulator instead (same firmware, TPM and measurements) on machines whose
//! KVM cannot run guests. Without either, the boot test fails with the reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_attestation::measurements::MeasurementFile;
use confidential_attestation::predict::{PREDICTED_PCRS, eventlog, pe::PeImage, predict_uki_boot};
use confidential_testenv::swtpm::SwtpmCa;
use confidential_testenv::vm::{Accel, BootReport, Vm};
use confidential_testenv::workspace_binary;
use xtask::node_image::{ImageVersion, NodeImageInputs, build};

fn build_image(version: &str, out: &std::path::Path) -> Result<PathBuf> {
    let bootstrapper = workspace_binary(
        "confidential-bootstrapper",
        "confidential-bootstrapper",
        "CONFIDENTIAL_BOOTSTRAPPER",
    )?;
    let inputs = NodeImageInputs::system(bootstrapper)?;
    build(&version.parse::<ImageVersion>()?, &inputs, out)
}

#[test]
fn node_image_builds_are_reproducible_and_versions_differ() -> Result<()> {
    let first = tempfile::tempdir()?;
    let second = tempfile::tempdir()?;
    let a = std::fs::read(build_image("v1", first.path())?)?;
    let b = std::fs::read(build_image("v1", second.path())?)?;
    assert!(a == b, "two builds of v1 differ");
    let v2 = std::fs::read(build_image("v2", second.path())?)?;
    assert!(a != v2, "v1 and v2 are the same bytes");
    let (p1, p2) = (
        predict_uki_boot(&a)?.pcr_values(),
        predict_uki_boot(&v2)?.pcr_values(),
    );
    let differing: Vec<u8> = p1.keys().copied().filter(|k| p1[k] != p2[k]).collect();
    // v2 differs in .osrel and in a file of the initramfs.
    assert_eq!(differing, [4, 9, 11]);
    Ok(())
}

#[test]
fn one_byte_changed_in_the_initramfs_changes_the_predicted_pcrs_4_9_and_11() -> Result<()> {
    let out = tempfile::tempdir()?;
    let uki = std::fs::read(build_image("v1", out.path())?)?;
    let initrd = PeImage::parse(&uki)?
        .sections()
        .iter()
        .find(|s| s.name == ".initrd")
        .cloned()
        .context("no .initrd section")?;
    let mut tampered = uki.clone();
    let offset = initrd.raw_offset as usize + initrd.virtual_size as usize / 2;
    tampered[offset] ^= 0x01;
    let good = predict_uki_boot(&uki)?.pcr_values();
    let bad = predict_uki_boot(&tampered)?.pcr_values();
    let differing: Vec<u8> = good.keys().copied().filter(|k| good[k] != bad[k]).collect();
    // PCR 4: the firmware's Authenticode hash of the UKI; PCR 9: the kernel's
    // measurement of the initrd; PCR 11: the stub's measurement of .initrd.
    assert_eq!(differing, [4, 9, 11]);
    Ok(())
}

#[test]
fn measurements_compute_uki_writes_the_prediction_and_says_why_pcrs_0_and_1_are_left_out()
-> Result<()> {
    let out = tempfile::tempdir()?;
    let uki_path = build_image("v1", out.path())?;
    let plugin = workspace_binary(
        "kubectl-confidential",
        "kubectl-confidential",
        "KUBECTL_CONFIDENTIAL_BIN",
    )?;
    let output = std::process::Command::new(plugin)
        .args(["measurements", "compute", "--image", "node:v1", "--uki"])
        .arg(&uki_path)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let file = MeasurementFile::from_canonical_json(&output.stdout)?;
    assert_eq!(file.image, "node:v1");
    let predicted = predict_uki_boot(&std::fs::read(&uki_path)?)?.pcr_values();
    let written: BTreeMap<u8, [u8; 32]> = file
        .measurements
        .iter()
        .map(|(pcr, e)| {
            assert!(!e.warn_only, "PCR {pcr} is predicted, so enforced");
            (pcr, e.expected)
        })
        .collect();
    assert_eq!(written, predicted);
    assert!(stderr.contains("PCR 0 is not in the file"), "{stderr}");
    assert!(stderr.contains("PCR 1 is not in the file"), "{stderr}");

    // A file that is not a UKI is refused with the reason, and prints no file.
    let not_uki = out.path().join("not-a-uki.efi");
    std::fs::write(&not_uki, b"MZ but nothing else")?;
    let output = std::process::Command::new(workspace_binary(
        "kubectl-confidential",
        "kubectl-confidential",
        "KUBECTL_CONFIDENTIAL_BIN",
    )?)
    .args(["measurements", "compute", "--image", "node:v1", "--uki"])
    .arg(&not_uki)
    .output()?;
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not a PE image"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn booted_vm_pcrs_equal_the_prediction_from_the_uki() -> Result<()> {
    let accel = Accel::from_env()?;
    let out = tempfile::tempdir()?;
    let uki_path = build_image("v1", out.path())?;
    let uki = std::fs::read(&uki_path)?;
    let prediction = predict_uki_boot(&uki)?;

    let ca = SwtpmCa::new()?;
    let mut vm = Vm::boot(&ca, &uki_path, accel)?;
    let timeout = match accel {
        Accel::Kvm => Duration::from_secs(120),
        Accel::Tcg => Duration::from_secs(600),
    };
    let init_at = vm.wait_for_console("node-image: init running", timeout)?;
    vm.wait_for_console("node-image: END EVENTLOG", timeout)?;
    let report = BootReport::parse(&vm.console())?;
    eprintln!(
        "VM ({accel:?}): init after {:.2} s (kernel {:.2} s, firmware and stub {:.2} s), QEMU RSS {} KiB",
        init_at.as_secs_f64(),
        report.kernel_seconds,
        init_at.as_secs_f64() - report.kernel_seconds,
        vm.qemu_rss_kib().unwrap_or(0)
    );
    drop(vm);
    assert_eq!(report.version, "v1");

    // The event log the firmware kept replays to the PCRs the vTPM holds.
    let events = eventlog::parse(&report.event_log)?;
    for (pcr, value) in eventlog::replay(&events) {
        assert_eq!(report.pcrs[&pcr], value, "event log replay of PCR {pcr}");
    }
    // Every predicted (enforced) PCR equals the booted one.
    let predicted = prediction.pcr_values();
    let differences = prediction.differences(&events);
    let mismatched: BTreeMap<u8, String> = PREDICTED_PCRS
        .iter()
        .filter(|pcr| predicted[pcr] != report.pcrs[pcr])
        .map(|pcr| {
            (
                *pcr,
                differences
                    .get(pcr)
                    .cloned()
                    .unwrap_or_else(|| "no event log difference".into()),
            )
        })
        .collect();
    assert!(
        mismatched.is_empty(),
        "predicted != booted: {mismatched:#?}"
    );
    assert_eq!(predicted.len(), PREDICTED_PCRS.len());
    Ok(())
}
