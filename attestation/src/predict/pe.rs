//! PE/COFF parsing for boot prediction: the Authenticode image hash that
//! UEFI firmware (EDK2's `Tcg2MeasurePeImage`) extends into PCR 4 for each
//! EFI application it starts, and the in-memory contents of sections, which
//! systemd's stub measures into PCR 11.
//!
//! Only what these two computations need is parsed, with every offset
//! checked against the file length: a malformed image is an error, never a
//! panic or a silently different hash.

use sha2::{Digest, Sha256};

/// Why a file is not a PE image we can hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeError {
    #[error("not a PE image: {0}")]
    Malformed(&'static str),
    #[error("PE section {0:?} is not in the image")]
    MissingSection(String),
    #[error(
        "PE section {0:?} claims {1} bytes in memory; more than {MAX_SECTION_BYTES} is refused"
    )]
    SectionTooLarge(String, u32),
}

/// Largest in-memory section size accepted (a UKI's initrd is far smaller);
/// keeps a hostile header from making us allocate gigabytes of zeros.
pub const MAX_SECTION_BYTES: u32 = 1 << 30;

/// One section header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub raw_size: u32,
    pub raw_offset: u32,
}

/// A parsed PE image (borrowing the file bytes).
#[derive(Debug)]
pub struct PeImage<'a> {
    bytes: &'a [u8],
    checksum_offset: usize,
    cert_dir_offset: usize,
    cert_table: Option<(usize, usize)>,
    size_of_headers: usize,
    sections: Vec<Section>,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, PeError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(PeError::Malformed("truncated header"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, PeError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(PeError::Malformed("truncated header"))
}

fn usize_at(b: &[u8], off: usize) -> Result<usize, PeError> {
    usize::try_from(u32_at(b, off)?).map_err(|_| PeError::Malformed("offset overflows"))
}

impl<'a> PeImage<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PeError> {
        if bytes.get(..2) != Some(b"MZ") {
            return Err(PeError::Malformed("no MZ header"));
        }
        let pe = usize_at(bytes, 0x3c)?;
        if bytes.get(pe..pe + 4) != Some(b"PE\0\0") {
            return Err(PeError::Malformed("no PE signature"));
        }
        let coff = pe + 4;
        let number_of_sections = usize::from(u16_at(bytes, coff + 2)?);
        let optional_size = usize::from(u16_at(bytes, coff + 16)?);
        let opt = coff + 20;
        let (data_dirs, count_offset) = match u16_at(bytes, opt)? {
            0x10b => (opt + 96, opt + 92),   // PE32
            0x20b => (opt + 112, opt + 108), // PE32+
            _ => return Err(PeError::Malformed("unknown optional header magic")),
        };
        let checksum_offset = opt + 64;
        let size_of_headers = usize_at(bytes, opt + 60)?;
        let dir_count = usize_at(bytes, count_offset)?;
        let cert_dir_offset = data_dirs + 4 * 8;
        let cert_table = if dir_count > 4 {
            let addr = usize_at(bytes, cert_dir_offset)?;
            let size = usize_at(bytes, cert_dir_offset + 4)?;
            (size > 0).then_some((addr, size))
        } else {
            None
        };
        if let Some((addr, size)) = cert_table
            && addr.checked_add(size).is_none_or(|end| end > bytes.len())
        {
            return Err(PeError::Malformed("certificate table outside the file"));
        }
        if size_of_headers > bytes.len() || cert_dir_offset + 8 > size_of_headers {
            return Err(PeError::Malformed("headers larger than the file"));
        }
        let table = opt + optional_size;
        let mut sections = Vec::with_capacity(number_of_sections);
        for i in 0..number_of_sections {
            let h = table + i * 40;
            let raw_name = bytes
                .get(h..h + 8)
                .ok_or(PeError::Malformed("truncated section table"))?;
            let name_len = raw_name.iter().position(|&c| c == 0).unwrap_or(8);
            let section = Section {
                name: String::from_utf8_lossy(&raw_name[..name_len]).into_owned(),
                virtual_size: u32_at(bytes, h + 8)?,
                virtual_address: u32_at(bytes, h + 12)?,
                raw_size: u32_at(bytes, h + 16)?,
                raw_offset: u32_at(bytes, h + 20)?,
            };
            let end = u64::from(section.raw_offset) + u64::from(section.raw_size);
            if end > bytes.len() as u64 {
                return Err(PeError::Malformed("section data outside the file"));
            }
            sections.push(section);
        }
        Ok(Self {
            bytes,
            checksum_offset,
            cert_dir_offset,
            cert_table,
            size_of_headers,
            sections,
        })
    }

    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The Authenticode SHA-256 of the image as EDK2 computes it: headers
    /// without the checksum and the certificate-table entry, sections in
    /// file order, then any data after them except the certificate table.
    pub fn authenticode_sha256(&self) -> [u8; 32] {
        let b = self.bytes;
        let mut h = Sha256::new();
        h.update(&b[..self.checksum_offset]);
        h.update(&b[self.checksum_offset + 4..self.cert_dir_offset]);
        h.update(&b[self.cert_dir_offset + 8..self.size_of_headers]);
        let mut sections: Vec<&Section> = self.sections.iter().filter(|s| s.raw_size > 0).collect();
        sections.sort_by_key(|s| s.raw_offset);
        let mut hashed = self.size_of_headers;
        for s in sections {
            let start = s.raw_offset as usize;
            h.update(&b[start..start + s.raw_size as usize]);
            hashed += s.raw_size as usize;
        }
        let cert_size = self.cert_table.map_or(0, |(_, size)| size);
        let end = b.len().saturating_sub(cert_size);
        if end > hashed {
            h.update(&b[hashed..end]);
        }
        h.finalize().into()
    }

    /// The section's bytes as loaded in memory: `VirtualSize` bytes, the raw
    /// data zero-filled past `SizeOfRawData`.
    pub fn section_in_memory(&self, name: &str) -> Result<Vec<u8>, PeError> {
        let s = self
            .sections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| PeError::MissingSection(name.to_owned()))?;
        if s.virtual_size > MAX_SECTION_BYTES {
            return Err(PeError::SectionTooLarge(s.name.clone(), s.virtual_size));
        }
        let size = s.virtual_size as usize;
        let raw = s.raw_size.min(s.virtual_size) as usize;
        let start = s.raw_offset as usize;
        let mut data = self.bytes[start..start + raw].to_vec();
        data.resize(size, 0);
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ image: headers (0x200), one section `.text` of 0x200
    /// raw bytes with virtual size 0x10, and 5 trailing bytes.
    pub(crate) fn tiny_pe() -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        b[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
        b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        b[opt + 60..opt + 64].copy_from_slice(&0x200u32.to_le_bytes());
        b[opt + 64..opt + 68].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        b[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let sec = opt + 240;
        b[sec..sec + 5].copy_from_slice(b".text");
        b[sec + 8..sec + 12].copy_from_slice(&0x10u32.to_le_bytes());
        b[sec + 12..sec + 16].copy_from_slice(&0x1000u32.to_le_bytes());
        b[sec + 16..sec + 20].copy_from_slice(&0x200u32.to_le_bytes());
        b[sec + 20..sec + 24].copy_from_slice(&0x200u32.to_le_bytes());
        for (i, byte) in b[0x200..0x400].iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        b.extend_from_slice(b"extra");
        b
    }

    #[test]
    fn authenticode_skips_checksum_and_cert_entry_and_covers_everything_else() {
        let image = tiny_pe();
        let pe = PeImage::parse(&image).expect("parse");
        let opt = 0x84 + 20;
        let mut expected = Sha256::new();
        expected.update(&image[..opt + 64]);
        expected.update(&image[opt + 68..opt + 144]);
        expected.update(&image[opt + 152..0x200]);
        expected.update(&image[0x200..0x400]);
        expected.update(b"extra");
        let expected: [u8; 32] = expected.finalize().into();
        assert_eq!(pe.authenticode_sha256(), expected);

        // The checksum is not covered...
        let mut other = image.clone();
        other[opt + 64] ^= 1;
        assert_eq!(
            PeImage::parse(&other).expect("parse").authenticode_sha256(),
            expected
        );
        // ...but a byte of a section, of the headers, or of trailing data is.
        for offset in [0x300, opt + 70, image.len() - 1] {
            let mut other = image.clone();
            other[offset] ^= 1;
            assert_ne!(
                PeImage::parse(&other).expect("parse").authenticode_sha256(),
                expected,
                "byte {offset:#x}"
            );
        }
    }

    #[test]
    fn section_in_memory_is_virtual_size_long() {
        let image = tiny_pe();
        let pe = PeImage::parse(&image).expect("parse");
        assert_eq!(
            pe.section_in_memory(".text").expect("text"),
            image[0x200..0x210]
        );
        assert_eq!(
            pe.section_in_memory(".initrd"),
            Err(PeError::MissingSection(".initrd".into()))
        );
    }

    #[test]
    fn malformed_images_are_errors() {
        let image = tiny_pe();
        assert!(PeImage::parse(b"not a pe").is_err());
        for cut in [0x40, 0x90, 0x150, 0x300] {
            assert!(PeImage::parse(&image[..cut]).is_err(), "cut at {cut:#x}");
        }
        let mut bad = image.clone();
        bad[0x3c..0x40].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(PeImage::parse(&bad).is_err(), "PE offset past the end");
        // A section claiming 4 GiB in memory is refused, not allocated.
        let mut huge = image.clone();
        let sec = 0x84 + 20 + 240;
        huge[sec + 8..sec + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        let pe = PeImage::parse(&huge).expect("headers are fine");
        assert_eq!(
            pe.section_in_memory(".text"),
            Err(PeError::SectionTooLarge(".text".into(), u32::MAX))
        );
    }
}
