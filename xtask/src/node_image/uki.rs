//! Assembles a unified kernel image (UKI) from systemd's EFI stub
//! (`linuxx64.efi.stub` of `systemd-boot-efi`) with `objcopy`, using the
//! section layout systemd documents for stub 252 (`.osrel` at 0x20000,
//! `.cmdline` at 0x30000, `.linux` at 0x2000000, `.initrd` at 0x3000000;
//! `.uname` is placed after `.cmdline`; newer stubs measure it, 252 ignores it).
//!
//! The firmware measures the whole PE file (Authenticode hash, PCR 4) and
//! the stub measures each of these sections (PCR 11), so the section set and
//! their contents are the image's identity. `objcopy` writes the current
//! time into the PE header (and ignores `SOURCE_DATE_EPOCH`), so the
//! assembled file gets the stub's own timestamp back and a recomputed PE
//! checksum: the output depends only on the inputs (checked by the
//! reproducibility test).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The payload sections of a UKI, in the order they are laid out.
#[derive(Clone, Debug)]
pub struct UkiSections {
    pub osrel: Vec<u8>,
    pub cmdline: Vec<u8>,
    pub uname: Vec<u8>,
    pub linux: Vec<u8>,
    pub initrd: Vec<u8>,
}

impl UkiSections {
    /// `(section name, virtual address, contents)` in layout order.
    fn layout(&self) -> [(&'static str, u64, &[u8]); 5] {
        [
            (".osrel", 0x20000, &self.osrel),
            (".cmdline", 0x30000, &self.cmdline),
            (".uname", 0x40000, &self.uname),
            (".linux", 0x200_0000, &self.linux),
            (".initrd", 0x300_0000, &self.initrd),
        ]
    }
}

/// Writes the UKI to `out`; `work` is an empty scratch directory.
pub fn assemble(stub: &Path, sections: &UkiSections, work: &Path, out: &Path) -> Result<()> {
    // The kernel must end before the initrd's address.
    let linux_end = 0x200_0000 + sections.linux.len() as u64;
    if linux_end > 0x300_0000 {
        bail!(
            "the kernel is {} bytes and would overlap the .initrd section; move .initrd up",
            sections.linux.len()
        );
    }
    let mut cmd = Command::new("objcopy");
    for (name, vma, contents) in sections.layout() {
        let file = work.join(name.trim_start_matches('.'));
        std::fs::write(&file, contents).with_context(|| format!("writing {}", file.display()))?;
        cmd.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma:#x}"));
    }
    cmd.arg(stub).arg(out);
    let output = cmd.output().context("running objcopy (binutils)")?;
    if !output.status.success() {
        bail!(
            "objcopy failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut uki = std::fs::read(out).with_context(|| format!("reading {}", out.display()))?;
    let stub_bytes = std::fs::read(stub).with_context(|| format!("reading {}", stub.display()))?;
    let timestamp = pe_timestamp(&stub_bytes).context("the EFI stub is not a PE image")?;
    set_timestamp_and_checksum(&mut uki, timestamp).context("objcopy wrote no PE image")?;
    std::fs::write(out, &uki).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn pe_offset(pe: &[u8]) -> Option<usize> {
    let off = u32::from_le_bytes(pe.get(0x3c..0x40)?.try_into().ok()?) as usize;
    (pe.get(off..off + 4)? == b"PE\0\0").then_some(off)
}

/// The COFF header's TimeDateStamp.
fn pe_timestamp(pe: &[u8]) -> Option<u32> {
    let off = pe_offset(pe)? + 8;
    Some(u32::from_le_bytes(pe.get(off..off + 4)?.try_into().ok()?))
}

/// Sets TimeDateStamp and recomputes the optional header's CheckSum (the
/// 16-bit one's-complement sum of the file with the field zeroed, plus the
/// file length, as `imagehlp`'s `CheckSumMappedFile` computes it).
pub fn set_timestamp_and_checksum(pe: &mut [u8], timestamp: u32) -> Option<()> {
    let off = pe_offset(pe)?;
    pe.get_mut(off + 8..off + 12)?
        .copy_from_slice(&timestamp.to_le_bytes());
    let checksum_at = off + 24 + 64;
    pe.get_mut(checksum_at..checksum_at + 4)?.fill(0);
    let mut sum: u64 = 0;
    for chunk in pe.chunks(2) {
        let word = u64::from(chunk[0]) | u64::from(chunk.get(1).copied().unwrap_or(0)) << 8;
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    let checksum = u32::try_from(sum)
        .ok()?
        .wrapping_add(u32::try_from(pe.len()).ok()?);
    pe[checksum_at..checksum_at + 4].copy_from_slice(&checksum.to_le_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_the_one_the_stub_was_linked_with() {
        // systemd-boot-efi ships the stub with a valid PE checksum; recomputing
        // it over the same bytes must give the same value.
        let stub = std::fs::read(crate::node_image::EFI_STUB)
            .expect("the systemd-boot-efi stub (scripts/install-deps installs it)");
        let timestamp = pe_timestamp(&stub).expect("PE");
        let mut copy = stub.clone();
        set_timestamp_and_checksum(&mut copy, timestamp).expect("PE");
        assert_eq!(copy, stub);
        set_timestamp_and_checksum(&mut copy, timestamp ^ 1).expect("PE");
        assert_ne!(copy, stub, "the timestamp is written");
    }
}
