//! Policy objects: AttestationPolicy and ImagePolicy are checked before they
//! are stored, so a typo cannot lock the cluster out. Every problem found is
//! listed in one denial.
//!
//! AttestationPolicy: at least one evidence kind; publisher names unique and
//! keys parseable ECDSA P-256 PEM; image entries name a known publisher, use
//! PCR indices 0..=23 and 32-byte hex values, and SEV-SNP launch values with a
//! 48-byte hex measurement (an image for SNP without them, or with them but no
//! SNP trust roots, is admitted with a warning); trust-root certificates parse;
//! the re-attestation interval parses. An entry whose signature does not verify
//! is admitted with a warning (the NodeVersion check refuses to roll to it).
//! ImagePolicy: digests are `sha256:<64 hex>`, repository patterns and tag keys
//! parse, namespaces are DNS labels.

use std::collections::HashSet;

use confidential_api::{AttestationPolicySpec, EvidenceKind, ImagePolicySpec};
use confidential_attestation::measurements::parse_public_key;

use super::Decision;
use crate::image_ref::{ImageRef, RepositoryPattern, check_digest};
use crate::verify::{measurement_file, verify_entry};

fn check_certificates(what: &str, pem: &str, problems: &mut Vec<String>) {
    let mut found = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        match block {
            Ok(block) if block.label == "CERTIFICATE" => {
                if let Err(e) = block.parse_x509() {
                    problems.push(format!("{what}: certificate does not parse: {e}"));
                }
                found += 1;
            }
            Ok(block) => problems.push(format!(
                "{what}: unexpected PEM block {:?}, expected CERTIFICATE",
                block.label
            )),
            Err(e) => {
                problems.push(format!("{what}: invalid PEM: {e}"));
                return;
            }
        }
    }
    if found == 0 {
        problems.push(format!("{what}: no PEM certificate found"));
    }
}

/// Validates an AttestationPolicy spec.
pub fn validate_attestation_policy(name: &str, spec: &AttestationPolicySpec) -> Decision {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if spec.evidence_kinds.is_empty() {
        problems.push("evidenceKinds is empty: no node could ever attest".to_owned());
    }
    let mut publishers = HashSet::new();
    for p in &spec.publishers {
        if !publishers.insert(p.name.as_str()) {
            problems.push(format!("publisher {:?} is listed twice", p.name));
        }
        if let Err(e) = parse_public_key(&p.public_key) {
            problems.push(format!("publisher {:?}: {e}", p.name));
        }
    }
    if let Some(tpm) = &spec.tpm {
        for (i, pem) in tpm.ek_ca_certificates.iter().enumerate() {
            check_certificates(&format!("tpm.ekCaCertificates[{i}]"), pem, &mut problems);
        }
    }
    if let Some(snp) = &spec.snp {
        check_certificates("snp.arkCertificate", &snp.ark_certificate, &mut problems);
        check_certificates("snp.askCertificate", &snp.ask_certificate, &mut problems);
    }
    let mut images = HashSet::new();
    for entry in &spec.images {
        let what = format!("image {:?}", entry.image);
        if entry.image.trim().is_empty() {
            problems.push("an image entry has an empty image".to_owned());
        }
        if !images.insert((entry.image.as_str(), entry.publisher.as_str())) {
            problems.push(format!(
                "{what} is listed twice for publisher {:?}",
                entry.publisher
            ));
        }
        if entry.measurements.is_empty() && entry.snp.is_none() {
            problems.push(format!(
                "{what}: no measurements (PCRs or SEV-SNP launch values)"
            ));
        }
        if let Some(snp) = &entry.snp {
            if snp.measurement.chars().any(|c| c.is_ascii_uppercase()) {
                problems.push(format!("{what}: snp.measurement must be lower-case hex"));
            }
            if spec.snp.is_none() {
                warnings.push(format!(
                    "{what} has SEV-SNP launch values, but the policy has no snp trust roots (ARK/ASK): no SNP node can attest"
                ));
            }
        } else if spec.evidence_kinds.contains(&EvidenceKind::SevSnp) {
            warnings.push(format!(
                "{what} has no snp launch values: SEV-SNP nodes cannot join with it"
            ));
        }
        if !publishers.contains(entry.publisher.as_str()) {
            problems.push(format!(
                "{what}: publisher {:?} is not in publishers",
                entry.publisher
            ));
        }
        match measurement_file(entry) {
            Err(e) => problems.push(format!("{what}: {e}")),
            Ok(_) => {
                if publishers.contains(entry.publisher.as_str())
                    && let Err(e) = verify_entry(&spec.publishers, entry)
                {
                    warnings.push(format!(
                        "{what}: {e}; NodeVersions cannot use this image until it is signed"
                    ));
                }
            }
        }
        for (pcr, m) in &entry.measurements {
            if m.expected.chars().any(|c| c.is_ascii_uppercase()) {
                problems.push(format!(
                    "{what}: PCR {pcr}: expected value must be lower-case hex"
                ));
            }
        }
    }
    if let Some(interval) = &spec.reattestation_interval
        && confidential_api::duration::parse_duration(interval).is_none_or(|d| d.is_zero())
    {
        problems.push(format!(
            "reattestationInterval {interval:?} is not a positive duration like 24h"
        ));
    }
    decide(&format!("AttestationPolicy {name}"), problems, warnings)
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Validates an ImagePolicy spec.
pub fn validate_image_policy(name: &str, spec: &ImagePolicySpec) -> Decision {
    let mut problems = Vec::new();
    for digest in &spec.allowed_digests {
        if let Err(e) = check_digest(digest) {
            problems.push(format!("allowedDigests: {e}"));
        }
    }
    for pattern in &spec.allowed_repositories {
        if let Err(e) = RepositoryPattern::parse(pattern) {
            problems.push(format!("allowedRepositories {pattern:?}: {e}"));
        }
    }
    for (reference, digest) in &spec.tag_digests {
        match ImageRef::parse(reference) {
            Ok(r) if r.digest.is_some() => problems.push(format!(
                "tagDigests key {reference:?} must be a tagged reference without a digest"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("tagDigests key {reference:?}: {e}")),
        }
        if let Err(e) = check_digest(digest) {
            problems.push(format!("tagDigests[{reference:?}]: {e}"));
        }
    }
    for ns in spec.namespaces.iter().chain(&spec.exempt_namespaces) {
        if !is_dns_label(ns) {
            problems.push(format!("namespace {ns:?} is not a valid namespace name"));
        }
    }
    decide(&format!("ImagePolicy {name}"), problems, Vec::new())
}

fn decide(what: &str, problems: Vec<String>, warnings: Vec<String>) -> Decision {
    if problems.is_empty() {
        Decision::allow("valid_policy").with_warnings(warnings)
    } else {
        Decision::deny(
            "invalid_policy",
            format!("{what} is invalid: {}", problems.join("; ")),
        )
        .with_warnings(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::fixtures::*;
    use confidential_api::{PolicyMode, SnpLaunch, SnpTrust, TpmTrust};

    fn spec() -> AttestationPolicySpec {
        policy(vec![signed_entry(IMAGE, &signing_key(1))])
            .spec
            .clone()
    }

    #[test]
    fn well_formed_attestation_policy_is_admitted() {
        let d = validate_attestation_policy("p", &spec());
        assert!(d.allowed, "{}", d.message);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn bad_hex_and_pcr_indices_are_refused() {
        let mut s = spec();
        s.images[0].measurements.get_mut("4").unwrap().expected = "zz".repeat(32);
        let d = validate_attestation_policy("p", &s);
        assert!(!d.allowed);
        assert!(d.message.contains("PCR 4"), "{}", d.message);
        let mut s = spec();
        let m = s.images[0].measurements.remove("4").unwrap();
        s.images[0].measurements.insert("24".into(), m);
        let d = validate_attestation_policy("p", &s);
        assert!(!d.allowed);
        assert!(d.message.contains("24"), "{}", d.message);
        let mut s = spec();
        s.images[0].measurements.get_mut("4").unwrap().expected = "ab".repeat(20);
        assert!(!validate_attestation_policy("p", &s).allowed);
    }

    #[test]
    fn unparseable_keys_and_certificates_are_refused() {
        let mut s = spec();
        s.publishers[0].public_key =
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into();
        let d = validate_attestation_policy("p", &s);
        assert!(!d.allowed);
        assert!(d.message.contains("publisher \"acme\""), "{}", d.message);
        let mut s = spec();
        s.tpm = Some(TpmTrust {
            ek_ca_certificates: vec!["not a pem".into()],
        });
        s.snp = Some(SnpTrust {
            ark_certificate: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                .into(),
            ask_certificate: String::new(),
            minimum_tcb: Default::default(),
        });
        let d = validate_attestation_policy("p", &s);
        assert!(
            d.message.contains("tpm.ekCaCertificates[0]"),
            "{}",
            d.message
        );
        assert!(d.message.contains("snp.arkCertificate"), "{}", d.message);
        assert!(d.message.contains("snp.askCertificate"), "{}", d.message);
    }

    #[test]
    fn other_mistakes_are_refused() {
        let mut s = spec();
        s.evidence_kinds.clear();
        s.images[0].publisher = "ghost".into();
        s.reattestation_interval = Some("1 day".into());
        let d = validate_attestation_policy("p", &s);
        assert!(d.message.contains("evidenceKinds"), "{}", d.message);
        assert!(d.message.contains("ghost"), "{}", d.message);
        assert!(d.message.contains("reattestationInterval"), "{}", d.message);
    }

    #[test]
    fn bad_signature_is_only_a_warning() {
        let mut s = spec();
        s.images[0].signature = signed_entry(IMAGE, &signing_key(3)).signature;
        let d = validate_attestation_policy("p", &s);
        assert!(d.allowed, "{}", d.message);
        assert_eq!(d.warnings.len(), 1);
    }

    /// An SNP-only image entry, signed.
    fn snp_spec(measurement: &str) -> AttestationPolicySpec {
        let mut s = spec();
        s.evidence_kinds = vec![EvidenceKind::SevSnp];
        s.snp = Some(SnpTrust {
            ark_certificate: include_str!("../../../attestation/testdata/snp/ark_milan.pem").into(),
            ask_certificate: include_str!("../../../attestation/testdata/snp/ask_milan.pem").into(),
            minimum_tcb: Default::default(),
        });
        let entry = &mut s.images[0];
        entry.measurements.clear();
        entry.snp = Some(SnpLaunch {
            measurement: measurement.into(),
            vmpl: 0,
            allow_smt: false,
            allow_migration_agent: false,
        });
        if let Ok(file) = measurement_file(entry) {
            entry.signature = file.sign(&signing_key(1));
        }
        s
    }

    #[test]
    fn snp_launch_values_are_validated() {
        let d = validate_attestation_policy("p", &snp_spec(&"ab".repeat(48)));
        assert!(d.allowed, "{}", d.message);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        for bad in ["ab".repeat(32), "zz".repeat(48)] {
            let d = validate_attestation_policy("p", &snp_spec(&bad));
            assert!(!d.allowed);
            assert!(
                d.message.contains("SEV-SNP launch measurement"),
                "{}",
                d.message
            );
        }
        let d = validate_attestation_policy("p", &snp_spec(&"AB".repeat(48)));
        assert!(d.message.contains("lower-case"), "{}", d.message);
        // Launch values without SNP trust roots, or SNP nodes without launch
        // values: admitted, with a warning saying what will not work.
        let mut s = snp_spec(&"ab".repeat(48));
        s.snp = None;
        let d = validate_attestation_policy("p", &s);
        assert!(
            d.allowed && d.warnings[0].contains("no snp trust roots"),
            "{d:?}"
        );
        let mut s = spec();
        s.evidence_kinds.push(EvidenceKind::SevSnp);
        let d = validate_attestation_policy("p", &s);
        assert!(
            d.allowed && d.warnings[0].contains("SEV-SNP nodes cannot join"),
            "{d:?}"
        );
        // Nothing at all to compare is refused.
        let mut s = snp_spec(&"ab".repeat(48));
        s.images[0].snp = None;
        let d = validate_attestation_policy("p", &s);
        assert!(d.message.contains("no measurements"), "{}", d.message);
    }

    #[test]
    fn image_policy_validation() {
        let mut spec = ImagePolicySpec {
            mode: PolicyMode::Enforce,
            allowed_digests: vec!["sha256:abc".into()],
            allowed_repositories: vec!["ghcr.io/acme/*".into(), "Bad Repo".into()],
            namespaces: vec!["Prod".into()],
            ..Default::default()
        };
        spec.tag_digests
            .insert("nginx:latest".into(), "md5:x".into());
        let d = validate_image_policy("i", &spec);
        assert!(!d.allowed);
        for needle in ["sha256:abc", "Bad Repo", "Prod", "md5:x"] {
            assert!(d.message.contains(needle), "{needle}: {}", d.message);
        }
        let ok = ImagePolicySpec {
            allowed_digests: vec![format!("sha256:{}", "a".repeat(64))],
            allowed_repositories: vec!["nginx".into(), "*".into()],
            exempt_namespaces: vec!["kube-system".into()],
            ..Default::default()
        };
        assert!(validate_image_policy("i", &ok).allowed);
    }
}
