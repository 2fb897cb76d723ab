//! Test support: a real control plane with the CRDs, the webhook running
//! in-process over TLS with a serving certificate from a CA generated here,
//! and the committed ValidatingWebhookConfiguration registered with
//! `clientConfig.url` pointing at it. The certificate files are laid out like
//! a Kubernetes Secret volume (`..data` symlink swapped atomically) so
//! rotations exercise the same path as in a cluster.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::{AttestationPolicy, MeasuredImage};
use confidential_testenv::fixtures::{self, Publisher};
use confidential_testenv::pki::{CertificateAuthority, CertifiedKey};
use confidential_testenv::{TestCluster, eventually, install_crds, install_crypto_provider};
use confidential_webhook::handler::Webhook;
use confidential_webhook::server::{self, Running, WebhookArgs};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use p256::ecdsa::SigningKey;

/// The node image the test policy trusts.
pub const TRUSTED_IMAGE: &str = "ghcr.io/acme/node-image:v1.2.0";
pub const PCR4: &str = "4444444444444444444444444444444444444444444444444444444444444444";
/// The digest the image policies allow for nginx.
pub const NGINX_DIGEST: &str =
    "sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31";

/// The publisher of the test policy, `acme` (key seed 1).
pub fn publisher() -> Publisher {
    Publisher::seeded("acme", 1)
}

/// A measured-image entry of publisher `acme` for `image`, PCR 4 enforced,
/// signed by `key`.
pub fn signed_entry(image: &str, key: &SigningKey) -> Result<MeasuredImage> {
    let file = fixtures::measurement_file(image, &[(4, pcr4(), false)]);
    Ok(fixtures::entry(&file, "acme", &file.sign(key)))
}

/// [`PCR4`] as bytes.
pub fn pcr4() -> [u8; 32] {
    [0x44; 32]
}

/// The AttestationPolicy trusting [`TRUSTED_IMAGE`].
pub fn attestation_policy(name: &str) -> Result<AttestationPolicy> {
    let publisher = publisher();
    Ok(AttestationPolicy::new(
        name,
        fixtures::policy_spec(
            None,
            &[&publisher],
            vec![signed_entry(TRUSTED_IMAGE, publisher.signing_key())?],
        ),
    ))
}

/// Certificate files laid out like a Secret volume.
pub struct SecretVolume {
    pub dir: PathBuf,
    generation: AtomicU32,
}

impl SecretVolume {
    pub fn new(dir: &Path, pair: &CertifiedKey) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let volume = Self {
            dir: dir.to_owned(),
            generation: AtomicU32::new(0),
        };
        volume.write(pair)?;
        for file in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(file), dir.join(file))?;
        }
        Ok(volume)
    }

    /// Writes a new pair into a fresh directory and swaps `..data` to it
    /// atomically, as the kubelet's atomic writer does.
    pub fn write(&self, pair: &CertifiedKey) -> Result<()> {
        let n = self.generation.fetch_add(1, Ordering::SeqCst);
        let data = format!("..gen_{n}");
        let target = self.dir.join(&data);
        std::fs::create_dir_all(&target)?;
        std::fs::write(target.join("tls.crt"), &pair.cert_pem)?;
        std::fs::write(target.join("tls.key"), &pair.key_pem)?;
        let tmp = self.dir.join("..data_tmp");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        std::os::unix::fs::symlink(&data, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        Ok(())
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

/// A cluster with the webhook registered.
pub struct Env {
    // Dropped last: stops the control plane after the webhook.
    pub cluster: TestCluster,
    pub client: Client,
    pub webhook: Webhook,
    pub running: Running,
    pub ca: CertificateAuthority,
    pub volume: SecretVolume,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.running.handle.shutdown();
    }
}

/// Issues a serving certificate for 127.0.0.1 / localhost.
pub fn serving_pair(ca: &CertificateAuthority) -> Result<CertifiedKey> {
    ca.issue_server(
        "confidential-webhook",
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
}

/// The committed webhook configuration, with every clientConfig pointed at `url`.
pub fn webhook_configuration(url: &str, ca_pem: &str) -> Result<ValidatingWebhookConfiguration> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/webhook/validatingwebhookconfiguration.yaml");
    let yaml =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: ValidatingWebhookConfiguration =
        serde_saphyr::from_str(&yaml).with_context(|| format!("parsing {}", path.display()))?;
    for webhook in config.webhooks.iter_mut().flatten() {
        webhook.client_config.service = None;
        webhook.client_config.url = Some(url.to_owned());
        webhook.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec()));
    }
    Ok(config)
}

impl Env {
    /// Starts a control plane, installs the CRDs and the trusted policy, runs
    /// the webhook and registers it; returns once the API server calls it.
    pub async fn start() -> Result<Self> {
        install_crypto_provider();
        let cluster = TestCluster::start().await?;
        let client = cluster.client.clone();
        install_crds(&client, &confidential_testenv::crds_dir()).await?;
        let dir = tempfile::tempdir()?;
        let ca = CertificateAuthority::new("confidential-webhook-test-ca")?;
        let volume = SecretVolume::new(&dir.path().join("tls"), &serving_pair(&ca)?)?;
        let args = WebhookArgs {
            listen: "127.0.0.1:0".parse()?,
            tls_cert: volume.cert(),
            tls_key: volume.key(),
            tls_reload_interval: Duration::from_millis(100),
            max_body_bytes: 3 * 1024 * 1024,
            kubeconfig: None,
            exempt_namespaces: confidential_webhook::validate::workload::DEFAULT_EXEMPT_NAMESPACES
                .map(str::to_owned)
                .to_vec(),
        };
        let (webhook, running) = server::start(client.clone(), &args).await?;
        let url = format!("https://127.0.0.1:{}/validate", running.addr.port());
        eventually("webhook caches synced", Duration::from_secs(30), || {
            let ready = webhook.stores.is_ready();
            async move { Ok(ready.then_some(())) }
        })
        .await?;
        // The trusted policy is created before registration (no webhook yet to
        // validate it) and must reach the cache before any test uses it.
        let policies: Api<AttestationPolicy> = Api::all(client.clone());
        policies
            .create(&PostParams::default(), &attestation_policy("trusted")?)
            .await?;
        let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        configs
            .create(
                &PostParams::default(),
                &webhook_configuration(&url, &ca.cert.cert_pem)?,
            )
            .await?;
        let env = Self {
            cluster,
            client,
            webhook,
            running,
            ca,
            volume,
            url,
            _dir: dir,
        };
        env.wait_cached("AttestationPolicy trusted", |w| {
            w.stores
                .attestation_policies
                .state()
                .iter()
                .any(|p| p.meta().name.as_deref() == Some("trusted"))
        })
        .await?;
        // The API server picks up a new webhook configuration asynchronously;
        // wait until it calls us (a policy with bad hex is then refused).
        let probe = env.client.clone();
        eventually(
            "API server calls the webhook",
            Duration::from_secs(30),
            || {
                let api: Api<AttestationPolicy> = Api::all(probe.clone());
                async move {
                    let mut bad = attestation_policy("probe")?;
                    bad.spec.images[0]
                        .measurements
                        .get_mut("4")
                        .context("pcr 4")?
                        .expected = "zz".into();
                    match api
                        .create(
                            &PostParams {
                                dry_run: true,
                                ..Default::default()
                            },
                            &bad,
                        )
                        .await
                    {
                        Err(kube::Error::Api(s)) if s.message.contains("denied the request") => {
                            Ok(Some(()))
                        }
                        _ => Ok(None),
                    }
                }
            },
        )
        .await?;
        Ok(env)
    }

    /// Waits until the webhook's caches satisfy `check`.
    pub async fn wait_cached(&self, what: &str, check: impl Fn(&Webhook) -> bool) -> Result<()> {
        eventually(what, Duration::from_secs(20), || {
            let done = check(&self.webhook);
            async move { Ok(done.then_some(())) }
        })
        .await
    }
}

/// The message of an API error, or a description of an unexpected result.
pub fn denial<T: std::fmt::Debug>(result: kube::Result<T>) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}
