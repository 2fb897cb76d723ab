//! Hand-built PKCS#10 certificate requests for attack tests.
//!
//! rcgen (like most CSR builders) only makes well-formed subjects: one value
//! per attribute type, one attribute per RDN, UTF8String values. The attacks
//! on a CSR approver live exactly in the shapes it cannot make: two common
//! names (Go's x509, hence kube-apiserver and the KCM signer, keep the LAST),
//! multi-valued RDNs, BMPString or T61String values, a second organization,
//! subject alternative names. This module writes such requests in DER by
//! hand and signs them with a real key, so the self-signature is valid and
//! the API server accepts them as it would an attacker's.

use anyhow::Result;
use rcgen::{PublicKeyData, SigningKey};

/// ASN.1 string type of a subject attribute value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringType {
    Utf8,
    Printable,
    T61,
    Ia5,
    /// UCS-2, big endian.
    Bmp,
}

impl StringType {
    fn tag(self) -> u8 {
        match self {
            StringType::Utf8 => 0x0c,
            StringType::Printable => 0x13,
            StringType::T61 => 0x14,
            StringType::Ia5 => 0x16,
            StringType::Bmp => 0x1e,
        }
    }

    fn encode(self, value: &str) -> Vec<u8> {
        match self {
            StringType::Bmp => value.encode_utf16().flat_map(u16::to_be_bytes).collect(),
            _ => value.as_bytes().to_vec(),
        }
    }
}

/// The DER of `2.5.4.3` (commonName).
pub const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// The DER of `2.5.4.10` (organizationName).
pub const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
/// The DER of `2.5.4.11` (organizationalUnitName).
pub const OID_ORGANIZATIONAL_UNIT: &[u8] = &[0x55, 0x04, 0x0b];

/// One attribute of a subject RDN.
#[derive(Clone, Debug)]
pub struct NameAttribute {
    /// Content octets of the attribute type OID.
    pub oid: Vec<u8>,
    pub string_type: StringType,
    pub value: String,
}

impl NameAttribute {
    pub fn common_name(value: &str) -> Self {
        Self::new(OID_COMMON_NAME, StringType::Utf8, value)
    }

    pub fn organization(value: &str) -> Self {
        Self::new(OID_ORGANIZATION, StringType::Utf8, value)
    }

    pub fn new(oid: &[u8], string_type: StringType, value: &str) -> Self {
        Self {
            oid: oid.to_vec(),
            string_type,
            value: value.to_owned(),
        }
    }

    /// The same attribute in another string type.
    pub fn as_type(mut self, string_type: StringType) -> Self {
        self.string_type = string_type;
        self
    }
}

/// What goes into a hand-built request.
#[derive(Clone, Debug, Default)]
pub struct RawRequest {
    /// The subject, RDN by RDN (an RDN with several attributes is a
    /// multi-valued RDN).
    pub subject: Vec<Vec<NameAttribute>>,
    /// DNS names requested as subjectAltName (an extensionRequest attribute).
    pub dns_names: Vec<String>,
    /// Corrupt the signature after signing.
    pub break_signature: bool,
}

impl RawRequest {
    /// A subject of one single-valued RDN per attribute, in order.
    pub fn subject(attributes: Vec<NameAttribute>) -> Self {
        Self {
            subject: attributes.into_iter().map(|a| vec![a]).collect(),
            ..Default::default()
        }
    }

    /// The PEM of this request signed with `key` (ECDSA P-256 keys only, as
    /// `rcgen::KeyPair::generate` makes).
    pub fn pem(&self, key: &rcgen::KeyPair) -> Result<String> {
        use base64::Engine;
        let der = self.der(key)?;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line)?);
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE REQUEST-----\n");
        Ok(pem)
    }

    /// The DER of this request signed with `key`.
    pub fn der(&self, key: &rcgen::KeyPair) -> Result<Vec<u8>> {
        anyhow::ensure!(
            *key.algorithm() == rcgen::PKCS_ECDSA_P256_SHA256,
            "hand-built requests are signed with ECDSA P-256 keys only"
        );
        let subject = tlv(
            0x30,
            &self
                .subject
                .iter()
                .flat_map(|rdn| tlv(0x31, &rdn.iter().flat_map(attribute).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
        );
        let attributes = if self.dns_names.is_empty() {
            Vec::new()
        } else {
            let names: Vec<u8> = self
                .dns_names
                .iter()
                .flat_map(|n| tlv(0x82, n.as_bytes()))
                .collect();
            let san = [
                tlv(0x06, &[0x55, 0x1d, 0x11]),
                tlv(0x04, &tlv(0x30, &names)),
            ]
            .concat();
            let extensions = tlv(0x30, &tlv(0x30, &san));
            tlv(
                0x30,
                &[
                    tlv(
                        0x06,
                        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e],
                    ),
                    tlv(0x31, &extensions),
                ]
                .concat(),
            )
        };
        let info = tlv(
            0x30,
            &[
                tlv(0x02, &[0]),
                subject,
                key.subject_public_key_info(),
                tlv(0xa0, &attributes),
            ]
            .concat(),
        );
        let mut signature = key.sign(&info)?;
        if self.break_signature
            && let Some(last) = signature.last_mut()
        {
            *last ^= 1;
        }
        let algorithm = tlv(
            0x30,
            &tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
        );
        let bits = [&[0u8][..], &signature].concat();
        Ok(tlv(0x30, &[info, algorithm, tlv(0x03, &bits)].concat()))
    }
}

fn attribute(a: &NameAttribute) -> Vec<u8> {
    tlv(
        0x30,
        &[
            tlv(0x06, &a.oid),
            tlv(a.string_type.tag(), &a.string_type.encode(&a.value)),
        ]
        .concat(),
    )
}

/// One DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn a_hand_built_request_parses_with_every_cn_in_order() -> Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let request = RawRequest::subject(vec![
            NameAttribute::common_name("system:node:a"),
            NameAttribute::organization("system:nodes"),
            NameAttribute::common_name("system:node:b").as_type(StringType::Bmp),
        ]);
        let der = request.der(&key)?;
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der)?;
        assert!(rest.is_empty());
        let cns: Vec<_> = csr
            .certification_request_info
            .subject
            .iter_common_name()
            .map(|c| c.attr_value().data.to_vec())
            .collect();
        assert_eq!(cns.len(), 2);
        assert_eq!(cns[0], b"system:node:a");
        assert_eq!(cns[1].len(), 2 * "system:node:b".len());
        Ok(())
    }
}
