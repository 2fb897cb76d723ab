//! Serde helpers for byte fields (base64 in JSON, so evidence stays readable
//! and stable across versions) and a small big-endian reader for the TPM wire
//! structures the validators parse themselves (no libtss2 on the verifier).

use thiserror::Error;

/// A TPM structure could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed TPM structure: {0}")]
pub struct WireError(pub &'static str);

/// Big-endian cursor over TPM marshalled bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: u16 size then that many bytes.
    pub fn tpm2b(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// `#[serde(with = "b64")]` for `Vec<u8>`.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "hex_map")]` for `BTreeMap<u32, Vec<u8>>` (PCR index → value).
pub mod hex_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<u32, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k.to_string(), hex::encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u32, Vec<u8>>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                let k = k.parse::<u32>().map_err(serde::de::Error::custom)?;
                let v = hex::decode(v).map_err(serde::de::Error::custom)?;
                Ok((k, v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_short_input() {
        let mut r = Reader::new(&[0, 5, 1, 2]);
        assert_eq!(r.tpm2b("x"), Err(WireError("x")));
    }
}
