//! Reading a kubelet client certificate request exactly as the components
//! after us will read it.
//!
//! Our approval is only worth something if the name we approve is the name
//! that ends up in the certificate. kube-controller-manager's signer copies
//! the request's subject as Go's `crypto/x509` parsed it, and the API server
//! later authenticates the certificate by Go's `Subject.CommonName`, which is
//! the LAST common name anywhere in the subject (any RDN, multi-valued RDNs
//! included, any string type Go accepts). So instead of picking "the" CN,
//! this module refuses every subject that is not unambiguous: exactly one CN,
//! exactly one O (`system:nodes`), no other attribute, no extensions (SANs),
//! a valid self-signature, exactly one PEM block, and the usages that
//! kube-controller-manager's `ValidateKubeletClientCSR` accepts for the
//! `kubernetes.io/kube-apiserver-client-kubelet` signer.

use confidential_api::keys::is_valid_node_name;
use thiserror::Error;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::oid_registry::{
    OID_PKCS9_EXTENSION_REQUEST, OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::AttributeTypeAndValue;

/// The only organization a kubelet client certificate carries.
pub const NODES_GROUP: &str = "system:nodes";
/// The common-name prefix of a node's user name.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// Why a request is not an acceptable kubelet client request. Each message
/// says what was found and what is allowed; it becomes the Denied
/// condition's message and the Event's note.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "spec.request is not exactly one PEM block of type CERTIFICATE REQUEST and nothing else: {0}"
    )]
    Pem(String),
    #[error("the certificate request cannot be parsed as PKCS#10 DER: {0}")]
    Der(String),
    #[error("the certificate request has version {0}; only v1 (0) is valid")]
    Version(u32),
    #[error("the certificate request's self-signature does not verify: {0}")]
    Signature(String),
    #[error(
        "the subject holds {0} common names; exactly one is allowed (the API server and the signer read the last one, which may not be the one a reviewer sees)"
    )]
    CommonNameCount(usize),
    #[error("the subject common name {0:?} is not system:node:<node name>")]
    NotANodeUser(String),
    #[error("the subject common name names {0:?}, which is not a valid node name")]
    InvalidNodeName(String),
    #[error("the subject organizations are {0:?}; exactly one, system:nodes, is allowed")]
    Organizations(Vec<String>),
    #[error(
        "the subject holds attribute {0} besides its common name and organization; nothing else is allowed"
    )]
    ExtraSubjectAttribute(String),
    #[error(
        "subject attribute {oid} is encoded as {encoding}; only UTF8String, PrintableString, T61String, IA5String, NumericString and BMPString holding valid text are read"
    )]
    UnreadableValue { oid: String, encoding: String },
    #[error(
        "the request asks for extensions ({0}); a kubelet client certificate carries no subject alternative names (DNS, IP, email, URI) or other extensions"
    )]
    Extensions(String),
    #[error("the request carries the attribute {0}; a kubelet client request carries none")]
    RequestAttribute(String),
    #[error(
        "spec.usages are {0:?}; the kubelet client signer takes exactly [client auth, digital signature], optionally with key encipherment"
    )]
    Usages(Vec<String>),
}

/// Checks a kubelet client request (`spec.request` and `spec.usages`) and
/// returns the one node name it asks a certificate for.
pub fn kubelet_client_node_name(request: &[u8], usages: &[String]) -> Result<String, Refusal> {
    check_usages(usages)?;
    let der = single_pem_block(request)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| Refusal::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Refusal::Der(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(Refusal::Version(info.version.0));
    }
    csr.verify_signature()
        .map_err(|e| Refusal::Signature(e.to_string()))?;
    for attribute in info.iter_attributes() {
        match attribute.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(request)
                if attribute.oid == OID_PKCS9_EXTENSION_REQUEST =>
            {
                if !request.extensions.is_empty() {
                    let names: Vec<String> = request
                        .extensions
                        .iter()
                        .map(|e| oid_name(&e.oid))
                        .collect();
                    return Err(Refusal::Extensions(names.join(", ")));
                }
            }
            _ => return Err(Refusal::RequestAttribute(oid_name(&attribute.oid))),
        }
    }
    let mut common_names = Vec::new();
    let mut organizations = Vec::new();
    for attribute in info.subject.iter().flat_map(|rdn| rdn.iter()) {
        let oid = attribute.attr_type();
        if *oid == OID_X509_COMMON_NAME {
            common_names.push(text_value(attribute)?);
        } else if *oid == OID_X509_ORGANIZATION_NAME {
            organizations.push(text_value(attribute)?);
        } else {
            return Err(Refusal::ExtraSubjectAttribute(oid_name(oid)));
        }
    }
    let [common_name] = common_names.as_slice() else {
        return Err(Refusal::CommonNameCount(common_names.len()));
    };
    if organizations != [NODES_GROUP] {
        return Err(Refusal::Organizations(organizations));
    }
    let Some(node) = common_name.strip_prefix(NODE_USER_PREFIX) else {
        return Err(Refusal::NotANodeUser(common_name.clone()));
    };
    if !is_valid_node_name(node) {
        return Err(Refusal::InvalidNodeName(node.to_owned()));
    }
    Ok(node.to_owned())
}

/// kube-controller-manager's `ValidateKubeletClientCSR`: the usages, as a
/// set, are {digital signature, client auth} or {digital signature, key
/// encipherment, client auth}. Duplicates are refused as well.
fn check_usages(usages: &[String]) -> Result<(), Refusal> {
    let mut sorted: Vec<&str> = usages.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let allowed: [&[&str]; 2] = [
        &["client auth", "digital signature"],
        &["client auth", "digital signature", "key encipherment"],
    ];
    if allowed.contains(&sorted.as_slice()) {
        Ok(())
    } else {
        Err(Refusal::Usages(usages.to_vec()))
    }
}

/// The DER inside exactly one `CERTIFICATE REQUEST` PEM block. Go's
/// `pem.Decode` skips leading text and reads only the first block; refusing
/// anything but one bare block leaves no room for two readers to differ.
fn single_pem_block(request: &[u8]) -> Result<Vec<u8>, Refusal> {
    use base64::Engine;
    const BEGIN: &str = "-----BEGIN CERTIFICATE REQUEST-----";
    const END: &str = "-----END CERTIFICATE REQUEST-----";
    let text = std::str::from_utf8(request).map_err(|_| Refusal::Pem("not text".into()))?;
    let mut lines = text.trim().lines().map(str::trim_end);
    if lines.next() != Some(BEGIN) {
        return Err(Refusal::Pem(format!("it does not start with {BEGIN}")));
    }
    let mut body = String::new();
    let mut ended = false;
    for line in lines {
        if ended {
            return Err(Refusal::Pem(format!("text follows {END}")));
        }
        if line == END {
            ended = true;
        } else if line
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        {
            body.push_str(line);
        } else {
            return Err(Refusal::Pem(
                "a line in the block is not base64 (PEM headers are not accepted)".into(),
            ));
        }
    }
    if !ended {
        return Err(Refusal::Pem(format!("it does not end with {END}")));
    }
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| Refusal::Pem(format!("invalid base64: {e}")))
}

/// The text of a subject attribute, decoded as Go's `crypto/x509` decodes it
/// when Go accepts it; anything else is refused (never guessed).
fn text_value(attribute: &AttributeTypeAndValue<'_>) -> Result<String, Refusal> {
    use x509_parser::der_parser::asn1_rs::Class;
    let value = attribute.attr_value();
    let header = &value.header;
    let data = value.data;
    let unreadable = |encoding: String| Refusal::UnreadableValue {
        oid: oid_name(attribute.attr_type()),
        encoding,
    };
    if header.class() != Class::Universal || header.is_constructed() {
        return Err(unreadable(format!(
            "a {:?} {} tag {}",
            header.class(),
            if header.is_constructed() {
                "constructed"
            } else {
                "primitive"
            },
            header.tag().0
        )));
    }
    let ascii = |what: &str| {
        data.is_ascii()
            .then(|| String::from_utf8_lossy(data).into_owned())
            .ok_or_else(|| unreadable(format!("{what} with non-ASCII bytes")))
    };
    match header.tag().0 {
        // UTF8String and T61String: Go takes the bytes as they are.
        12 => String::from_utf8(data.to_vec()).map_err(|_| unreadable("invalid UTF8String".into())),
        20 => String::from_utf8(data.to_vec())
            .map_err(|_| unreadable("T61String that is not UTF-8 text".into())),
        18 => ascii("NumericString"),
        19 => ascii("PrintableString"),
        22 => ascii("IA5String"),
        30 => {
            if data.len() % 2 != 0 {
                return Err(unreadable("BMPString of odd length".into()));
            }
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| unreadable("invalid BMPString".into()))
        }
        other => Err(unreadable(format!("universal tag {other}"))),
    }
}

fn oid_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map_or_else(|_| oid.to_id_string(), str::to_owned)
}

#[cfg(test)]
mod tests;
