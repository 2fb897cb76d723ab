//! Generated PKI for a test control plane: one cluster CA (which also signs
//! approved CSRs, as kubeadm does), the API server's serving certificate,
//! client certificates for the admin and the control-plane components, and the
//! service-account signing key.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A PEM certificate and its PEM private key.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA; can issue further certificates.
pub struct CertificateAuthority {
    pub cert: CertifiedKey,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Creates a self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing CA")?;
        let cert = CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a TLS serving certificate for the given DNS names and IPs.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertifiedKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, None);
        for name in dns {
            params.subject_alt_names.push(SanType::DnsName(
                (*name).try_into().context("invalid DNS name")?,
            ));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Issues a certificate for a server that is also a TLS client of its
    /// peers with the same certificate (etcd peer and client URLs).
    pub fn issue_peer(&self, common_name: &str, ips: &[IpAddr]) -> Result<CertifiedKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, None);
        params.subject_alt_names.push(SanType::DnsName(
            "localhost".try_into().context("invalid DNS name")?,
        ));
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params)
    }

    /// Issues a client certificate: Kubernetes reads the user from the common
    /// name and the groups from the organisations.
    pub fn issue_client(&self, user: &str, group: Option<&str>) -> Result<CertifiedKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(user, group);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<CertifiedKey> {
        let key = KeyPair::generate().context("generating key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing certificate")?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// All key material a test control plane needs.
pub struct ControlPlanePki {
    pub ca: CertificateAuthority,
    pub apiserver: CertifiedKey,
    pub admin: CertifiedKey,
    pub controller_manager: CertifiedKey,
    pub scheduler: CertifiedKey,
    /// The API server's client certificate towards kubelets (logs, exec).
    pub kubelet_client: CertifiedKey,
    /// Service-account token signing key (PEM private key, PEM public key).
    pub service_account_key: String,
    pub service_account_pub: String,
}

impl ControlPlanePki {
    /// Generates fresh PKI for an API server reachable at 127.0.0.1.
    pub fn generate() -> Result<Self> {
        Self::generate_with(&[])
    }

    /// [`Self::generate`], the serving certificate also naming `extra_ips`.
    pub fn generate_with(extra_ips: &[IpAddr]) -> Result<Self> {
        let ca = CertificateAuthority::new("kubectl-confidential-testenv-ca")?;
        let apiserver = ca.issue_server(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                // What VM nodes dial (QEMU user networking's forward to
                // this loopback API server, `crate::vm::GUEST_HOST_IP`):
                // every client in the VM (the kubelet's bootstrap and its
                // kubeconfig after TLS bootstrap) verifies the name it
                // dials, with no per-client TLS server name override.
                IpAddr::V4(Ipv4Addr::new(10, 0, 2, 100)),
            ]
            .into_iter()
            .chain(extra_ips.iter().copied())
            .collect::<Vec<_>>(),
        )?;
        let admin = ca.issue_client("kubernetes-admin", Some("system:masters"))?;
        let controller_manager = ca.issue_client("system:kube-controller-manager", None)?;
        let scheduler = ca.issue_client("system:kube-scheduler", None)?;
        let kubelet_client =
            ca.issue_client("kube-apiserver-kubelet-client", Some("system:masters"))?;
        let sa = KeyPair::generate().context("generating service-account key")?;
        Ok(Self {
            ca,
            apiserver,
            admin,
            controller_manager,
            scheduler,
            kubelet_client,
            service_account_key: sa.serialize_pem(),
            service_account_pub: sa.public_key_pem(),
        })
    }
}
