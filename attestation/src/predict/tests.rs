//! Prediction checked against a recorded boot: the event log and PCR values
//! of node image v1 booted under OVMF with a swtpm vTPM (captured from the
//! VM's console by `e2e/tests/vm_boot.rs`'s setup).

use super::*;

const LOG: &[u8] = include_bytes!("ovmf-uki-v1.eventlog");
const PCRS: &str = include_str!("ovmf-uki-v1.pcrs");

fn recorded_pcrs() -> BTreeMap<u8, [u8; 32]> {
    PCRS.lines()
        .map(|line| {
            let (index, value) = line.split_once(' ').expect("index value");
            let bytes = hex::decode(value).expect("hex");
            (
                index.parse().expect("index"),
                bytes.try_into().expect("32 bytes"),
            )
        })
        .collect()
}

#[test]
fn replaying_the_recorded_log_gives_the_pcrs_the_vtpm_held() {
    let events = eventlog::parse(LOG).expect("parse");
    let replayed = eventlog::replay(&events);
    let recorded = recorded_pcrs();
    assert_eq!(
        replayed.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5, 6, 7, 9, 11],
        "PCRs the firmware, the stub and the kernel's EFI stub extend"
    );
    for (pcr, value) in &replayed {
        assert_eq!(recorded[pcr], *value, "PCR {pcr}");
    }
}

#[test]
fn firmware_events_predict_pcrs_2_3_5_6_7_of_the_recorded_boot() {
    let prediction = BootPrediction {
        events: firmware_events(),
    };
    let predicted = prediction.pcr_values();
    let recorded = recorded_pcrs();
    for pcr in [2, 3, 5, 6, 7] {
        assert_eq!(predicted[&pcr], recorded[&pcr], "PCR {pcr}");
    }
    let log = eventlog::parse(LOG).expect("parse");
    let differences = prediction.differences(&log);
    for pcr in [2, 3, 5, 6, 7] {
        assert!(!differences.contains_key(&pcr), "{differences:?}");
    }
    // PCR 4 starts with the boot manager's action and separator, then the
    // UKI the firmware-only prediction does not have.
    assert!(differences[&4].contains("event 2: unpredicted EV_EFI_BOOT_SERVICES_APPLICATION"));
}

#[test]
fn a_changed_event_is_named_by_pcr_and_position() {
    let mut log = eventlog::parse(LOG).expect("parse");
    let prediction = BootPrediction {
        events: firmware_events(),
    };
    let db = log
        .iter_mut()
        .find(|e| e.pcr == 7 && e.data.len() == 36 && e.sha256 != [0; 32])
        .expect("a PCR 7 variable event");
    db.sha256[0] ^= 1;
    let differences = prediction.differences(&log);
    assert!(differences[&7].starts_with("event "), "{differences:?}");
    assert!(
        differences[&7].contains("predicted variable"),
        "{differences:?}"
    );
}

#[test]
fn truncated_or_foreign_logs_are_refused() {
    assert!(matches!(
        eventlog::parse(&LOG[..LOG.len() - 3]),
        Err(eventlog::EventLogError::Truncated(_))
    ));
    assert_eq!(
        eventlog::parse(&[0u8; 64]),
        Err(eventlog::EventLogError::NotCryptoAgile)
    );
}
