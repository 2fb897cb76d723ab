//! Predicting a node's PCRs from its image files alone, the way firmware and
//! boot loader measure it, so a publisher can sign expected values without
//! booting anything (and a verifier never trusts a booted machine's word).
//!
//! The boot this models (checked against the event log of a real boot,
//! recorded in `ovmf-uki-v1.eventlog`: OVMF under QEMU q35, swtpm vTPM, the
//! UKI as `EFI/BOOT/BOOTX64.EFI`, Debian's systemd-stub 252 and kernel 6.1):
//!
//! | PCR | events | predicted from |
//! |---|---|---|
//! | 0 | CRTM version, PEI/DXE firmware volumes (decompressed, from memory), separator | not predicted: `warnOnly` ([`UNPREDICTABLE`]) |
//! | 1 | `BootOrder`/`Boot####` variables OVMF creates from the VM's devices, separator | not predicted: `warnOnly` |
//! | 2, 3, 6 | separator only (no option ROM, no other driver) | the VM configuration |
//! | 4 | "Calling EFI Application from Boot Option", separator, Authenticode of the UKI, Authenticode of its `.linux` (the stub starts the kernel with `LoadImage`) | the UKI |
//! | 5 | separator, "Exit Boot Services Invocation", "... Returned with Success" (no GPT event: the ESP is not a GPT disk) | fixed |
//! | 7 | `SecureBoot` (0), empty `PK`, `KEK`, `db`, `dbx`, separator | Secure Boot disabled, no keys enrolled (`OVMF_VARS_4M.fd`) |
//! | 9 | the kernel's EFI stub: its load options (UTF-16 command line), the initrd | the UKI's `.cmdline` and `.initrd` |
//! | 11 | systemd-stub: for each of `.linux .osrel .cmdline .initrd .splash .dtb .pcrpkey` present, its name (with NUL) then its contents | the UKI |
//! | 12, 13 | nothing (no credentials, no system extensions, no load options override) | all zero |
//!
//! PCR 10 (IMA, runtime) and 14-23 are not part of the boot prediction.

pub mod eventlog;
pub mod pe;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::measurements::{Expected, Measurements, extend};
use eventlog::event_type::*;
use pe::{PeError, PeImage};

/// PCRs the boot prediction cannot compute from files, with the reason
/// (written next to the measurement file and shown by `compute`).
pub const UNPREDICTABLE: &[(u8, &str)] = &[
    (
        0,
        "firmware code: OVMF measures its PEI and DXE firmware volumes after decompressing them in memory; \
         the digest depends on the OVMF build and is not computed from the .fd file",
    ),
    (
        1,
        "firmware configuration: the BootOrder/Boot#### variables OVMF's boot manager creates from the \
         VM's device layout (QEMU configuration), not from the image",
    ),
];

/// Why a prediction failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PredictError {
    #[error("the UKI is not a PE image: {0}")]
    Pe(#[from] PeError),
    #[error("the UKI has no {0} section; build it with `cargo xtask node-image`")]
    MissingSection(&'static str),
    #[error("the UKI's .cmdline is not ASCII text")]
    BadCmdline,
}

/// One event the prediction expects, in the order it is extended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PredictedEvent {
    pub pcr: u8,
    pub event_type: u32,
    pub digest: [u8; 32],
    /// What was measured (for explanations).
    pub what: String,
}

/// The predicted boot: the event sequence of each predicted PCR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPrediction {
    pub events: Vec<PredictedEvent>,
}

/// PCRs the prediction computes and a policy enforces.
pub const PREDICTED_PCRS: &[u8] = &[2, 3, 4, 5, 6, 7, 9, 11, 12, 13];

/// The sections systemd-stub 252 measures into PCR 11, in its order.
const STUB_MEASURED_SECTIONS: &[&str] = &[
    ".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey",
];

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `EFI_GLOBAL_VARIABLE` (8be4df61-93ca-11d2-aa0d-00e098032b8c) as stored.
const EFI_GLOBAL_VARIABLE: [u8; 16] = [
    0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c,
];
/// `EFI_IMAGE_SECURITY_DATABASE_GUID` (d719b2cb-3d3a-4596-a3bc-dad00e67656f).
const EFI_IMAGE_SECURITY_DATABASE: [u8; 16] = [
    0xcb, 0xb2, 0x19, 0xd7, 0x3a, 0x3d, 0x96, 0x45, 0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f,
];

/// `UEFI_VARIABLE_DATA` of a measured variable (its digest is what is extended).
fn variable_data(guid: &[u8; 16], name: &str, data: &[u8]) -> Vec<u8> {
    let name16: Vec<u8> = name.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut out = guid.to_vec();
    out.extend_from_slice(&(name.encode_utf16().count() as u64).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&name16);
    out.extend_from_slice(data);
    out
}

fn separator(pcr: u8) -> PredictedEvent {
    PredictedEvent {
        pcr,
        event_type: EV_SEPARATOR,
        digest: sha256(&[0, 0, 0, 0]),
        what: "separator".into(),
    }
}

fn action(pcr: u8, text: &str) -> PredictedEvent {
    PredictedEvent {
        pcr,
        event_type: EV_EFI_ACTION,
        digest: sha256(text.as_bytes()),
        what: format!("EFI action {text:?}"),
    }
}

/// Predicts the boot of `uki` (the file bytes) under OVMF with Secure Boot
/// disabled, as described in the module documentation.
pub fn predict_uki_boot(uki: &[u8]) -> Result<BootPrediction, PredictError> {
    let image = PeImage::parse(uki)?;
    let section = |name: &'static str| {
        image
            .section_in_memory(name)
            .map_err(|_| PredictError::MissingSection(name))
    };
    let linux = section(".linux")?;
    let cmdline = section(".cmdline")?;
    let initrd = section(".initrd")?;
    let kernel = PeImage::parse(&linux)?;
    let cmdline_text = std::str::from_utf8(&cmdline)
        .ok()
        .filter(|c| c.is_ascii())
        .ok_or(PredictError::BadCmdline)?;

    // Events of each PCR are in order; PCRs are independent of each other.
    let mut events = firmware_events();
    events.push(PredictedEvent {
        pcr: 4,
        event_type: EV_EFI_BOOT_SERVICES_APPLICATION,
        digest: image.authenticode_sha256(),
        what: "UKI (Authenticode)".into(),
    });
    // systemd-stub measures its payload sections.
    for name in STUB_MEASURED_SECTIONS {
        let Ok(data) = image.section_in_memory(name) else {
            continue;
        };
        let mut name_bytes = name.as_bytes().to_vec();
        name_bytes.push(0);
        events.push(PredictedEvent {
            pcr: 11,
            event_type: EV_IPL,
            digest: sha256(&name_bytes),
            what: format!("section name {name}"),
        });
        events.push(PredictedEvent {
            pcr: 11,
            event_type: EV_IPL,
            digest: sha256(&data),
            what: format!("section {name}"),
        });
    }
    // The stub starts the kernel with LoadImage: the firmware measures it.
    events.push(PredictedEvent {
        pcr: 4,
        event_type: EV_EFI_BOOT_SERVICES_APPLICATION,
        digest: kernel.authenticode_sha256(),
        what: "kernel .linux (Authenticode)".into(),
    });
    // The kernel's EFI stub measures its command line and initrd.
    let mut options: Vec<u8> = cmdline_text
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    options.extend_from_slice(&[0, 0]);
    events.push(PredictedEvent {
        pcr: 9,
        event_type: EV_EVENT_TAG,
        digest: sha256(&options),
        what: "kernel load options (UTF-16 command line)".into(),
    });
    events.push(PredictedEvent {
        pcr: 9,
        event_type: EV_EVENT_TAG,
        digest: sha256(&initrd),
        what: "Linux initrd".into(),
    });
    Ok(BootPrediction { events })
}

/// What OVMF measures whatever it boots (PCRs 2, 3, 5, 6, 7 and the start
/// of PCR 4), with Secure Boot disabled and no option ROM.
pub fn firmware_events() -> Vec<PredictedEvent> {
    let mut events = Vec::new();
    // PCR 7: Secure Boot state, measured before the boot manager runs.
    let secure_boot_vars: [(&[u8; 16], &str, &[u8]); 5] = [
        (&EFI_GLOBAL_VARIABLE, "SecureBoot", &[0]),
        (&EFI_GLOBAL_VARIABLE, "PK", &[]),
        (&EFI_GLOBAL_VARIABLE, "KEK", &[]),
        (&EFI_IMAGE_SECURITY_DATABASE, "db", &[]),
        (&EFI_IMAGE_SECURITY_DATABASE, "dbx", &[]),
    ];
    for (guid, name, data) in secure_boot_vars {
        events.push(PredictedEvent {
            pcr: 7,
            event_type: EV_EFI_VARIABLE_DRIVER_CONFIG,
            digest: sha256(&variable_data(guid, name, data)),
            what: format!("variable {name} (Secure Boot disabled, no keys)"),
        });
    }
    events.push(separator(7));
    // The boot manager starts the UKI.
    events.push(action(4, "Calling EFI Application from Boot Option"));
    for pcr in [2, 3, 4, 5, 6] {
        events.push(separator(pcr));
    }
    events.push(action(5, "Exit Boot Services Invocation"));
    events.push(action(5, "Exit Boot Services Returned with Success"));
    events
}

impl BootPrediction {
    /// The predicted value of each of [`PREDICTED_PCRS`] (all-zero when no
    /// event extends it).
    pub fn pcr_values(&self) -> BTreeMap<u8, [u8; 32]> {
        let mut pcrs: BTreeMap<u8, [u8; 32]> =
            PREDICTED_PCRS.iter().map(|&p| (p, [0u8; 32])).collect();
        for event in &self.events {
            if let Some(pcr) = pcrs.get_mut(&event.pcr) {
                *pcr = extend(pcr, &event.digest);
            }
        }
        pcrs
    }

    /// The expected measurements: predicted PCRs enforced; the
    /// [`UNPREDICTABLE`] ones `warnOnly` with `reference` values (e.g. of a
    /// reference boot) when given, else left out.
    pub fn measurements(
        &self,
        reference: &BTreeMap<u8, [u8; 32]>,
    ) -> Result<Measurements, crate::measurements::MeasurementError> {
        let mut values: BTreeMap<u8, Expected> = self
            .pcr_values()
            .into_iter()
            .map(|(pcr, expected)| {
                (
                    pcr,
                    Expected {
                        expected,
                        warn_only: false,
                    },
                )
            })
            .collect();
        for (pcr, _) in UNPREDICTABLE {
            if let Some(value) = reference.get(pcr) {
                values.insert(
                    *pcr,
                    Expected {
                        expected: *value,
                        warn_only: true,
                    },
                );
            }
        }
        Measurements::new(values)
    }

    /// Compares with a recorded event log: for each predicted PCR whose
    /// events differ, the first differing event, in words.
    pub fn differences(&self, log: &[eventlog::Event]) -> BTreeMap<u8, String> {
        let mut out = BTreeMap::new();
        for &pcr in PREDICTED_PCRS {
            let predicted: Vec<&PredictedEvent> =
                self.events.iter().filter(|e| e.pcr == pcr).collect();
            let actual: Vec<&eventlog::Event> = log
                .iter()
                .filter(|e| e.pcr == pcr && eventlog::is_extended(e))
                .collect();
            let n = predicted.len().max(actual.len());
            for i in 0..n {
                match (predicted.get(i), actual.get(i)) {
                    (Some(p), Some(a)) if p.digest == a.sha256 => continue,
                    (Some(p), Some(a)) => {
                        out.insert(
                            pcr,
                            format!(
                                "event {i}: predicted {} ({}), measured {} {}",
                                p.what,
                                hex::encode(p.digest),
                                eventlog::event_type_name(a.event_type),
                                hex::encode(a.sha256)
                            ),
                        );
                    }
                    (Some(p), None) => {
                        out.insert(
                            pcr,
                            format!("event {i}: predicted {} was not measured", p.what),
                        );
                    }
                    (None, Some(a)) => {
                        out.insert(
                            pcr,
                            format!(
                                "event {i}: unpredicted {} {}",
                                eventlog::event_type_name(a.event_type),
                                hex::encode(a.sha256)
                            ),
                        );
                    }
                    (None, None) => {}
                }
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
