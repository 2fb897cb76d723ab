//! The boot report the node image's init prints on the serial console
//! (version, kernel time, PCR values, the firmware's event log), parsed
//! back on the host: what the VM suites compare with the prediction.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use base64::Engine;

/// What the node image's init printed about its boot.
#[derive(Clone, Debug, PartialEq)]
pub struct BootReport {
    /// The image version (`/etc/node-image-version`).
    pub version: String,
    /// Seconds since the kernel started when init ran (`/proc/uptime`).
    pub kernel_seconds: f64,
    /// SHA-256 PCR values as the kernel read them from the vTPM.
    pub pcrs: BTreeMap<u8, [u8; 32]>,
    /// The firmware's event log (`binary_bios_measurements`).
    pub event_log: Vec<u8>,
}

const PREFIX: &str = "node-image: ";

impl BootReport {
    /// Parses the console lines the init script prints (`node-image: ...`);
    /// fails unless both the PCRs and the event log were printed completely.
    pub fn parse(console: &str) -> Result<Self> {
        let mut version = None;
        let mut kernel_seconds = None;
        let mut pcrs = BTreeMap::new();
        let mut log_b64 = String::new();
        let (mut pcrs_done, mut log_done) = (false, false);
        for line in console.lines() {
            let Some(rest) = line
                .trim_end_matches('\r')
                .split_once(PREFIX)
                .map(|(_, r)| r)
            else {
                continue;
            };
            if let Some(init) = rest.strip_prefix("init running ") {
                for field in init.split_whitespace() {
                    if let Some(v) = field.strip_prefix("version=") {
                        version = Some(v.to_owned());
                    } else if let Some(u) = field.strip_prefix("uptime=") {
                        kernel_seconds = u.parse::<f64>().ok();
                    }
                }
            } else if let Some(pcr) = rest.strip_prefix("pcr sha256 ") {
                let (index, value) = pcr.split_once(' ').context("malformed PCR line")?;
                let index: u8 = index.parse().context("PCR index")?;
                let bytes = hex::decode(value.trim())
                    .with_context(|| format!("PCR {index} value {value:?} is not hex"))?;
                let value = <[u8; 32]>::try_from(bytes)
                    .map_err(|_| anyhow::anyhow!("PCR {index} is not 32 bytes"))?;
                pcrs.insert(index, value);
            } else if rest == "END PCRS" {
                pcrs_done = true;
            } else if let Some(chunk) = rest.strip_prefix("eventlog ") {
                log_b64.push_str(chunk.trim());
            } else if rest == "END EVENTLOG" {
                log_done = true;
            }
        }
        if !pcrs_done || pcrs.len() != 24 {
            bail!("the console has {} of 24 PCR values", pcrs.len());
        }
        if !log_done {
            bail!("the console has no complete event log");
        }
        let event_log = base64::engine::general_purpose::STANDARD
            .decode(log_b64)
            .context("event log is not base64")?;
        Ok(Self {
            version: version.context("init did not print its version")?,
            kernel_seconds: kernel_seconds.context("init did not print the uptime")?,
            pcrs,
            event_log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(pcrs: u8, log_end: bool) -> String {
        let mut text =
            String::from("BdsDxe: starting\r\nnode-image: init running version=v1 uptime=3.84\n");
        text.push_str("node-image: BEGIN PCRS\n");
        for i in 0..pcrs {
            text.push_str(&format!("node-image: pcr sha256 {i} {}\n", "AB".repeat(32)));
        }
        text.push_str("node-image: END PCRS\nnode-image: BEGIN EVENTLOG\n");
        text.push_str("node-image: eventlog AAEC\nnode-image: eventlog Aw==\n");
        if log_end {
            text.push_str("node-image: END EVENTLOG\n");
        }
        text
    }

    #[test]
    fn boot_report_reads_what_init_printed() {
        let report = BootReport::parse(&console(24, true)).expect("complete console");
        assert_eq!(report.version, "v1");
        assert_eq!(report.kernel_seconds, 3.84);
        assert_eq!(report.pcrs.len(), 24);
        assert_eq!(report.pcrs[&23], [0xab; 32]);
        assert_eq!(report.event_log, [0, 1, 2, 3]);
    }

    #[test]
    fn boot_report_refuses_an_incomplete_console() {
        assert!(
            BootReport::parse(&console(23, true)).is_err(),
            "a PCR missing"
        );
        assert!(
            BootReport::parse(&console(24, false)).is_err(),
            "event log cut off"
        );
        let bad = console(24, true).replace(&"AB".repeat(32), "not hex");
        assert!(BootReport::parse(&bad).is_err(), "PCR not hex");
    }
}
