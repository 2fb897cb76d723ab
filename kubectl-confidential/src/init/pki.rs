//! The gate's serving certificate for admission requests: its own CA, made
//! here with rcgen, whose key is dropped right after it signed the one
//! serving certificate (nothing else can ever be issued under it). The CA
//! goes into every caBundle and, as `ca.crt`, into the TLS Secret, where
//! the next `init` finds it. A certificate is reused while it covers the
//! same names and has more than [`RENEW_BEFORE_DAYS`] left; rotation issues
//! a new CA and certificate.

use anyhow::{Context, Result};
use jiff::{Timestamp, ToSpan as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Validity of a serving certificate.
const VALID_DAYS: i64 = 365;
/// A certificate this close to its end is replaced by the next `init`.
pub const RENEW_BEFORE_DAYS: i64 = 30;

/// A serving certificate, its key and the CA that signed it (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    pub not_after: Timestamp,
}

/// A calendar date in UTC, as rcgen's `date_time_ymd` takes it.
struct Date {
    year: i32,
    month: u8,
    day: u8,
}

fn utc_date(at: Timestamp) -> Result<Date> {
    let date = at.to_zoned(jiff::tz::TimeZone::UTC).date();
    Ok(Date {
        year: i32::from(date.year()),
        month: u8::try_from(date.month()).context("month")?,
        day: u8::try_from(date.day()).context("day")?,
    })
}

fn san(name: &str) -> Result<SanType> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            name.try_into()
                .with_context(|| format!("{name:?} is not a DNS name"))?,
        ),
    })
}

/// Issues a new CA and a serving certificate for `names` (DNS names or IP
/// addresses), valid from a day before `now` for [`VALID_DAYS`].
pub fn issue(names: &[String], now: Timestamp) -> Result<ServingCert> {
    let not_before = utc_date(now - 24.hours())?;
    let not_after_at = now + (VALID_DAYS * 24).hours();
    let not_after = utc_date(not_after_at)?;
    let window = |params: &mut CertificateParams| {
        params.not_before = rcgen::date_time_ymd(not_before.year, not_before.month, not_before.day);
        params.not_after = rcgen::date_time_ymd(not_after.year, not_after.month, not_after.day);
    };

    let ca_key = KeyPair::generate().context("generating the gate CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kubectl-confidential gate CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    window(&mut ca);
    let ca_cert = ca
        .self_signed(&ca_key)
        .context("self-signing the gate CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().context("generating the gate's serving key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "confidential-webhook");
    params.distinguished_name = dn;
    params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    window(&mut params);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the gate's serving certificate")?;
    Ok(ServingCert {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        names: names.to_vec(),
        // The certificate ends at midnight of that day; record no later.
        not_after: not_after_at - 24.hours(),
    })
}

/// Whether `existing` can keep serving (pure): same names, far enough from
/// its end, and no rotation asked for.
pub fn reusable(existing: &ServingCert, names: &[String], now: Timestamp, rotate: bool) -> bool {
    !rotate
        && existing.names == names
        && existing.not_after > now + (RENEW_BEFORE_DAYS * 24).hours()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec![
            "confidential-webhook.confidential-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ]
    }

    #[test]
    fn issued_certificates_verify_under_their_ca_only() {
        let now = Timestamp::now();
        let first = issue(&names(), now).expect("issue");
        let second = issue(&names(), now).expect("issue");
        assert_ne!(first.ca_pem, second.ca_pem, "every rotation makes a new CA");
        let der = |pem: &str| {
            confidential_attestation::tpm::parse_certificates(pem)
                .expect("pem")
                .remove(0)
        };
        let (ca_der, leaf_der, other_der) = (
            der(&first.ca_pem),
            der(&first.cert_pem),
            der(&second.ca_pem),
        );
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("leaf");
        leaf.verify_signature(Some(ca.public_key()))
            .expect("signed by its CA");
        let (_, other) = x509_parser::parse_x509_certificate(&other_der).expect("ca");
        assert!(leaf.verify_signature(Some(other.public_key())).is_err());
        let sans = leaf
            .subject_alternative_name()
            .expect("ext")
            .expect("sans")
            .value
            .general_names
            .len();
        assert_eq!(sans, 2);
        assert!(leaf.validity().is_valid());
    }

    #[test]
    fn reuse_needs_same_names_time_left_and_no_rotation() {
        let now = Timestamp::now();
        let cert = issue(&names(), now).expect("issue");
        assert!(reusable(&cert, &names(), now, false));
        assert!(!reusable(&cert, &names(), now, true));
        assert!(!reusable(&cert, &names()[..1], now, false));
        let late = now + ((VALID_DAYS - RENEW_BEFORE_DAYS + 1) * 24).hours();
        assert!(!reusable(&cert, &names(), late, false));
    }
}
