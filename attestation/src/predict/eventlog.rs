//! The firmware's TPM event log (TCG PC Client "crypto agile" format, as
//! Linux exposes it in `/sys/kernel/security/tpm0/binary_bios_measurements`)
//! and its replay into PCR values.
//!
//! The log is what a booted machine says it measured; replaying it must give
//! the PCRs its TPM holds. Predictions are compared event by event with a
//! recorded log, which is how a mismatch is explained ("PCR 4, event 3: the
//! UKI's hash differs") rather than only detected.

use std::collections::BTreeMap;

use crate::measurements::extend;

/// TCG algorithm identifier of SHA-256.
const TPM_ALG_SHA256: u16 = 0x000b;

/// Event types this crate names (TCG PC Client PFP, section 10.4.1).
pub mod event_type {
    pub const EV_POST_CODE: u32 = 0x1;
    pub const EV_NO_ACTION: u32 = 0x3;
    pub const EV_SEPARATOR: u32 = 0x4;
    pub const EV_EVENT_TAG: u32 = 0x6;
    pub const EV_S_CRTM_VERSION: u32 = 0x8;
    pub const EV_IPL: u32 = 0xd;
    pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
    pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
    pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
    pub const EV_EFI_GPT_EVENT: u32 = 0x8000_0006;
    pub const EV_EFI_ACTION: u32 = 0x8000_0007;
    pub const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
    pub const EV_EFI_HANDOFF_TABLES: u32 = 0x8000_0009;
    pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00e0;
}

/// Why an event log could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventLogError {
    #[error("event log truncated at byte {0}")]
    Truncated(usize),
    #[error("event log does not start with a TCG crypto-agile Spec ID event")]
    NotCryptoAgile,
    #[error("event log has no SHA-256 digests")]
    NoSha256,
    #[error("event log names digest algorithm {0:#06x}, which its Spec ID event does not list")]
    UnknownAlgorithm(u16),
    #[error("event log event {index} extends PCR {pcr}; PCRs go up to 23")]
    BadPcr { index: usize, pcr: u32 },
}

/// One measurement event (its SHA-256 digest; other banks are skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub pcr: u8,
    pub event_type: u32,
    pub sha256: [u8; 32],
    pub data: Vec<u8>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EventLogError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(EventLogError::Truncated(self.pos))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn u16(&mut self) -> Result<u16, EventLogError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, EventLogError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn len(&mut self) -> Result<usize, EventLogError> {
        let at = self.pos;
        usize::try_from(self.u32()?).map_err(|_| EventLogError::Truncated(at))
    }
}

/// Parses a crypto-agile event log; the leading Spec ID event (SHA-1 format,
/// `EV_NO_ACTION`) gives the digest sizes and is not returned.
pub fn parse(bytes: &[u8]) -> Result<Vec<Event>, EventLogError> {
    let mut r = Reader { bytes, pos: 0 };
    // TCG_PCClientPCREvent: pcr, type, SHA-1 digest, size, data.
    let _pcr = r.u32()?;
    let first_type = r.u32()?;
    r.take(20)?;
    let spec_len = r.len()?;
    let spec = r.take(spec_len)?;
    if first_type != event_type::EV_NO_ACTION || !spec.starts_with(b"Spec ID Event03\0") {
        return Err(EventLogError::NotCryptoAgile);
    }
    // TCG_EfiSpecIdEvent: signature[16], platformClass u32, versions u8 x3,
    // uintnSize u8, numberOfAlgorithms u32, {algId u16, digestSize u16}...
    let mut spec_reader = Reader {
        bytes: spec,
        pos: 24,
    };
    let count = spec_reader.u32()?;
    let mut sizes = BTreeMap::new();
    for _ in 0..count {
        let alg = spec_reader.u16()?;
        let size = spec_reader.u16()?;
        sizes.insert(alg, usize::from(size));
    }
    if sizes.get(&TPM_ALG_SHA256) != Some(&32) {
        return Err(EventLogError::NoSha256);
    }
    let mut events = Vec::new();
    while r.pos < bytes.len() {
        let index = events.len();
        let pcr = r.u32()?;
        let event_type = r.u32()?;
        let digest_count = r.u32()?;
        let mut sha256 = None;
        for _ in 0..digest_count {
            let alg = r.u16()?;
            let size = *sizes
                .get(&alg)
                .ok_or(EventLogError::UnknownAlgorithm(alg))?;
            let digest = r.take(size)?;
            if alg == TPM_ALG_SHA256 {
                sha256 = <[u8; 32]>::try_from(digest).ok();
            }
        }
        let data_len = r.len()?;
        let data = r.take(data_len)?.to_vec();
        let pcr = u8::try_from(pcr)
            .ok()
            .filter(|p| *p <= crate::measurements::MAX_PCR)
            .ok_or(EventLogError::BadPcr { index, pcr })?;
        events.push(Event {
            pcr,
            event_type,
            sha256: sha256.ok_or(EventLogError::NoSha256)?,
            data,
        });
    }
    Ok(events)
}

/// Whether an event is extended into its PCR (`EV_NO_ACTION` is log-only).
pub fn is_extended(event: &Event) -> bool {
    event.event_type != event_type::EV_NO_ACTION
}

/// Replays events into SHA-256 PCR values (PCRs no event touches are absent).
pub fn replay(events: &[Event]) -> BTreeMap<u8, [u8; 32]> {
    let mut pcrs = BTreeMap::new();
    for event in events.iter().filter(|e| is_extended(e)) {
        let pcr = pcrs.entry(event.pcr).or_insert([0u8; 32]);
        *pcr = extend(pcr, &event.sha256);
    }
    pcrs
}

/// The name of an event type, for explanations.
pub fn event_type_name(t: u32) -> String {
    use event_type::*;
    let name = match t {
        EV_POST_CODE => "EV_POST_CODE",
        EV_NO_ACTION => "EV_NO_ACTION",
        EV_SEPARATOR => "EV_SEPARATOR",
        EV_EVENT_TAG => "EV_EVENT_TAG",
        EV_S_CRTM_VERSION => "EV_S_CRTM_VERSION",
        EV_IPL => "EV_IPL",
        EV_EFI_VARIABLE_DRIVER_CONFIG => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        EV_EFI_VARIABLE_BOOT => "EV_EFI_VARIABLE_BOOT",
        EV_EFI_BOOT_SERVICES_APPLICATION => "EV_EFI_BOOT_SERVICES_APPLICATION",
        EV_EFI_GPT_EVENT => "EV_EFI_GPT_EVENT",
        EV_EFI_ACTION => "EV_EFI_ACTION",
        EV_EFI_PLATFORM_FIRMWARE_BLOB => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        EV_EFI_HANDOFF_TABLES => "EV_EFI_HANDOFF_TABLES",
        EV_EFI_VARIABLE_AUTHORITY => "EV_EFI_VARIABLE_AUTHORITY",
        _ => return format!("{t:#x}"),
    };
    name.to_owned()
}
