//! The TCG EK credential profile checks an EK certificate must pass besides
//! its signature: it is valid now, it is not a CA, and its key usage is the
//! one of an endorsement key.
//!
//! Why: a trusted EK CA's signature alone does not make a certificate an EK
//! certificate. An expired certificate may belong to a TPM whose key was
//! retired (or leaked); a CA certificate or a signing-key certificate issued
//! by the same manufacturer CA names a key that is not a TPM's restricted
//! decryption key, and credential activation against it proves nothing about
//! an AK living next to it. The TCG EK Credential Profile (2.5, §3.2) fixes
//! the key usage: `keyEncipherment` for an RSA EK, `keyAgreement` for an ECC
//! EK; basicConstraints, when present, says `CA:FALSE`.
//!
//! The check is a pure function of the parsed certificate and the time, so
//! every refusal is unit-tested with generated certificates.

use thiserror::Error;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::time::ASN1Time;

/// Why an EK certificate does not fit the EK profile.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EkProfileError {
    #[error(
        "EK certificate is not valid yet (notBefore {not_before}); check the machine's clock or the TPM's certificate"
    )]
    NotYetValid { not_before: String },
    #[error(
        "EK certificate expired (notAfter {not_after}); the TPM's endorsement credential must be renewed by its manufacturer"
    )]
    Expired { not_after: String },
    #[error(
        "EK certificate is a CA certificate (basicConstraints CA:TRUE), not an endorsement key"
    )]
    IsCa,
    #[error("EK certificate has no key usage extension; the TCG EK profile requires one")]
    NoKeyUsage,
    #[error("EK certificate's key usage lacks {required} required for an {key} EK")]
    MissingKeyUsage {
        required: &'static str,
        key: &'static str,
    },
    #[error(
        "EK certificate's key usage allows signing certificates or CRLs (keyCertSign/cRLSign): not an endorsement key"
    )]
    CertificateSigning,
    #[error("EK certificate key is neither RSA nor ECC")]
    UnsupportedKey,
    #[error("EK certificate extensions do not parse: {0}")]
    Extensions(String),
}

/// Checks `ek` against the TCG EK profile at `now`.
pub fn check_ek_profile(ek: &X509Certificate<'_>, now: ASN1Time) -> Result<(), EkProfileError> {
    let validity = ek.validity();
    if now < validity.not_before {
        return Err(EkProfileError::NotYetValid {
            not_before: validity.not_before.to_string(),
        });
    }
    if now > validity.not_after {
        return Err(EkProfileError::Expired {
            not_after: validity.not_after.to_string(),
        });
    }
    let constraints = ek
        .basic_constraints()
        .map_err(|e| EkProfileError::Extensions(e.to_string()))?;
    if constraints.is_some_and(|c| c.value.ca) {
        return Err(EkProfileError::IsCa);
    }
    let algorithm = &ek.public_key().algorithm.algorithm;
    let (required, key) = if *algorithm == OID_PKCS1_RSAENCRYPTION {
        ("keyEncipherment", "RSA")
    } else if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        ("keyAgreement", "ECC")
    } else {
        return Err(EkProfileError::UnsupportedKey);
    };
    let usage = ek
        .key_usage()
        .map_err(|e| EkProfileError::Extensions(e.to_string()))?
        .ok_or(EkProfileError::NoKeyUsage)?
        .value;
    if usage.key_cert_sign() || usage.crl_sign() {
        return Err(EkProfileError::CertificateSigning);
    }
    let has_required = match key {
        "RSA" => usage.key_encipherment(),
        _ => usage.key_agreement(),
    };
    if !has_required {
        return Err(EkProfileError::MissingKeyUsage { required, key });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        PublicKeyData, SignatureAlgorithm,
    };

    /// The RSA 2048 EK public key of the recorded swtpm (rcgen with ring
    /// cannot generate RSA keys; the certificate only needs the public part).
    struct RsaEk(Vec<u8>);

    impl PublicKeyData for RsaEk {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }
        fn algorithm(&self) -> &'static SignatureAlgorithm {
            &rcgen::PKCS_RSA_SHA256
        }
    }

    fn swtpm_ek() -> RsaEk {
        let ev: crate::evidence::TpmEvidence =
            serde_json::from_str(include_str!("../../testdata/tpm/quote.json")).expect("fixture");
        let (_, cert) =
            x509_parser::parse_x509_certificate(&ev.ek_certificate).expect("fixture EK parses");
        RsaEk(cert.public_key().subject_public_key.data.to_vec())
    }

    fn ca() -> (CertificateParams, KeyPair) {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test EK CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        (params, key)
    }

    /// A TCG-profile RSA EK certificate valid around 2026.
    fn ek_params() -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "ek");
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        params
    }

    fn ek_params_until(year: i32) -> CertificateParams {
        let mut params = ek_params();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        params
    }

    fn issue(params: &CertificateParams, subject: &impl PublicKeyData) -> Vec<u8> {
        issue_with_ca(params, subject).0
    }

    /// The certificate and its CA's, both DER.
    fn issue_with_ca(
        params: &CertificateParams,
        subject: &impl PublicKeyData,
    ) -> (Vec<u8>, Vec<u8>) {
        let (ca_params, ca_key) = ca();
        let ca_der = ca_params.self_signed(&ca_key).expect("CA").der().to_vec();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let der = params
            .signed_by(subject, &issuer)
            .expect("issue")
            .der()
            .to_vec();
        (der, ca_der)
    }

    fn check(der: &[u8], year: i32) -> Result<(), EkProfileError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parses");
        let at = rcgen::date_time_ymd(year, 6, 1).unix_timestamp();
        check_ek_profile(&cert, ASN1Time::from_timestamp(at).expect("time"))
    }

    #[test]
    fn profile_conforming_rsa_and_ecc_eks_pass() {
        assert_eq!(check(&issue(&ek_params(), &swtpm_ek()), 2026), Ok(()));
        let mut ecc = ek_params();
        ecc.key_usages = vec![KeyUsagePurpose::KeyAgreement];
        let key = KeyPair::generate().expect("key");
        assert_eq!(check(&issue(&ecc, &key), 2026), Ok(()));
    }

    #[test]
    fn the_recorded_swtpm_ek_fits_the_profile() {
        let ev: crate::evidence::TpmEvidence =
            serde_json::from_str(include_str!("../../testdata/tpm/quote.json")).expect("fixture");
        let (_, cert) = x509_parser::parse_x509_certificate(&ev.ek_certificate).expect("EK");
        assert_eq!(check_ek_profile(&cert, ASN1Time::now()), Ok(()));
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused() {
        let der = issue(&ek_params(), &swtpm_ek());
        assert!(matches!(
            check(&der, 2031),
            Err(EkProfileError::Expired { .. })
        ));
        assert!(matches!(
            check(&der, 2024),
            Err(EkProfileError::NotYetValid { .. })
        ));
    }

    /// The quote verifier applies the profile to trusted EK certificates.
    #[test]
    fn verify_ek_certificate_refuses_a_trusted_but_expired_ek() {
        let mut expired = ek_params();
        expired.not_before = rcgen::date_time_ymd(2015, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let (der, ca_der) = issue_with_ca(&expired, &swtpm_ek());
        let err = super::super::verify::verify_ek_certificate(&der, std::slice::from_ref(&ca_der))
            .expect_err("expired EK");
        assert_eq!(err.reason(), "ek-certificate");
        assert!(err.to_string().contains("expired"), "{err}");
        let (der, ca_der) = issue_with_ca(&ek_params_until(9999), &swtpm_ek());
        super::super::verify::verify_ek_certificate(&der, &[ca_der])
            .expect("a valid EK from the same kind of CA");
    }

    #[test]
    fn a_ca_certificate_is_not_an_ek() {
        let mut params = ek_params();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(
            check(&issue(&params, &swtpm_ek()), 2026),
            Err(EkProfileError::IsCa)
        );
        // CA:FALSE but allowed to sign certificates: still not an EK.
        let mut params = ek_params();
        params.key_usages = vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
        assert_eq!(
            check(&issue(&params, &swtpm_ek()), 2026),
            Err(EkProfileError::CertificateSigning)
        );
    }

    #[test]
    fn wrong_or_missing_key_usage_is_refused() {
        // An RSA signing key certified by the EK CA.
        let mut params = ek_params();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        assert_eq!(
            check(&issue(&params, &swtpm_ek()), 2026),
            Err(EkProfileError::MissingKeyUsage {
                required: "keyEncipherment",
                key: "RSA"
            })
        );
        // keyAgreement is the ECC usage, not the RSA one.
        params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
        assert!(matches!(
            check(&issue(&params, &swtpm_ek()), 2026),
            Err(EkProfileError::MissingKeyUsage { key: "RSA", .. })
        ));
        // An ECC key with the RSA usage.
        params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate().expect("key");
        assert_eq!(
            check(&issue(&params, &key), 2026),
            Err(EkProfileError::MissingKeyUsage {
                required: "keyAgreement",
                key: "ECC"
            })
        );
        params.key_usages = vec![];
        assert_eq!(
            check(&issue(&params, &swtpm_ek()), 2026),
            Err(EkProfileError::NoKeyUsage)
        );
    }
}
