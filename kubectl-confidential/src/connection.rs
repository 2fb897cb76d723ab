//! kubectl's connection flags and how the plugin reaches the API server.
//!
//! `kubectl confidential` must connect exactly where `kubectl` would with the
//! same flags: `--kubeconfig` (else the `KUBECONFIG` list, merged by kubectl's
//! rules, else `~/.kube/config`), `--context`/`--cluster`/`--user` choosing
//! within it, and `--server`, `--token`, `--as`, `--certificate-authority`,
//! `--insecure-skip-tls-verify`, `--request-timeout` overriding it. kube's
//! config loader does the kubeconfig work (exec credential plugins,
//! `proxy-url`), so plugins that work with kubectl work here.
//!
//! Errors are classified once here so every subcommand says what happened and
//! what to do: an API server that cannot be reached is reported as
//! unreachable with its URL, and our missing CRDs as "run
//! `kubectl confidential init`".

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// kubectl's global connection flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectionArgs {
    /// Path to the kubeconfig file (default: the `KUBECONFIG` list, merged as
    /// kubectl merges it, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig cluster to use.
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// The kubeconfig user to use.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// The address and port of the Kubernetes API server.
    #[arg(short = 's', long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token for authentication to the API server.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Username to impersonate for the operation.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub impersonate: Option<String>,
    /// Path to a cert file for the certificate authority.
    #[arg(long, global = true, value_name = "FILE")]
    pub certificate_authority: Option<PathBuf>,
    /// Do not check the API server's certificate (insecure).
    #[arg(long, global = true)]
    pub insecure_skip_tls_verify: bool,
    /// How long to wait for one API request (`30s`, `1m`; `0`: no limit).
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_request_timeout)]
    pub request_timeout: Option<Duration>,
}

/// `0` means no limit, as in kubectl; otherwise a Go-style duration, or a
/// plain number of seconds.
fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    confidential_api::duration::parse_flag(text)
}

impl ConnectionArgs {
    /// The kube client configuration these flags select.
    pub async fn config(&self) -> Result<Config> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            cluster: self.cluster.clone(),
            user: self.user.clone(),
        };
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Some(Kubeconfig::read_from(path).with_context(|| {
                format!("reading kubeconfig {}; check --kubeconfig", path.display())
            })?),
            None => match Kubeconfig::from_env() {
                Ok(Some(merged)) => Some(merged),
                Ok(None) => Kubeconfig::read().ok(),
                Err(e) => {
                    return Err(e).context(
                        "reading the files listed in KUBECONFIG; fix the list or pass --kubeconfig",
                    );
                }
            },
        };
        let mut config = match (kubeconfig, &self.server) {
            (Some(kubeconfig), _) => Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .context(
                    "loading the kubeconfig; pass --kubeconfig, --context, --cluster or --user, or set KUBECONFIG",
                )?,
            (None, Some(server)) => Config::new(parse_server(server)?),
            (None, None) => bail!(
                "no kubeconfig found (KUBECONFIG is unset and ~/.kube/config does not exist); \
                 pass --kubeconfig or --server"
            ),
        };
        if let Some(server) = &self.server {
            config.cluster_url = parse_server(server)?;
        }
        if let Some(token) = &self.token {
            config.auth_info.token = Some(token.clone().into());
            config.auth_info.token_file = None;
            config.auth_info.exec = None;
        }
        if let Some(user) = &self.impersonate {
            config.auth_info.impersonate = Some(user.clone());
        }
        if let Some(path) = &self.certificate_authority {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --certificate-authority {}", path.display()))?;
            let certs = pem_certificates(&pem).with_context(|| {
                format!(
                    "--certificate-authority {}: no PEM certificate in it",
                    path.display()
                )
            })?;
            config.root_cert = Some(certs);
            config.root_cert_file = None;
        }
        if self.insecure_skip_tls_verify {
            config.accept_invalid_certs = true;
        }
        if let Some(timeout) = self.request_timeout.filter(|t| !t.is_zero()) {
            config.connect_timeout = Some(timeout);
            config.read_timeout = Some(timeout);
            config.write_timeout = Some(timeout);
            config.reset_reader_on_write = true;
        }
        Ok(config)
    }

    /// A client for these flags, and the API server URL for error messages.
    pub async fn client(&self) -> Result<Cluster> {
        let config = self.config().await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).with_context(|| {
            format!(
                "building the Kubernetes client for {server}; check the kubeconfig's credentials"
            )
        })?;
        Ok(Cluster { client, server })
    }
}

fn parse_server(server: &str) -> Result<http::Uri> {
    server
        .parse()
        .with_context(|| format!("--server {server:?} is not a URL (https://host:port)"))
}

/// DER certificates of every `CERTIFICATE` block in `pem`.
fn pem_certificates(pem: &[u8]) -> Option<Vec<Vec<u8>>> {
    let text = std::str::from_utf8(pem).ok()?;
    let certs: Vec<Vec<u8>> = confidential_attestation::tpm::parse_certificates(text).ok()?;
    (!certs.is_empty()).then_some(certs)
}

/// A connected client and the URL it talks to.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub server: String,
}

/// What a failed API request means for the user.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// No HTTP answer at all: connection refused, DNS, TLS, timeout.
    Unreachable,
    /// The API server does not serve the resource: our CRDs are missing.
    NotInstalled,
    /// 401: the credentials were refused.
    Unauthorized,
    /// 403: the user may not do this.
    Forbidden,
    /// Anything else the API server answered.
    Other,
}

/// Classifies a kube error (pure: the decision what to tell the user).
pub fn classify(error: &kube::Error) -> Failure {
    match error {
        kube::Error::Api(status) => match status.code {
            404 => Failure::NotInstalled,
            401 => Failure::Unauthorized,
            403 => Failure::Forbidden,
            _ => Failure::Other,
        },
        kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::HttpError(_)
        | kube::Error::RustlsTls(_) => Failure::Unreachable,
        _ => Failure::Other,
    }
}

impl Cluster {
    /// Turns a failed request into an error that says what to do next.
    /// `what` names the request ("listing NodeVersions").
    pub fn explain(&self, what: &str, error: kube::Error) -> anyhow::Error {
        let advice = match classify(&error) {
            Failure::Unreachable => format!(
                "the API server at {} is unreachable; check that the cluster is running and that \
                 --kubeconfig/--context/--server point at it",
                self.server
            ),
            Failure::NotInstalled => format!(
                "kubectl-confidential is not installed in the cluster at {} (its CRDs are missing); \
                 run `kubectl confidential init`",
                self.server
            ),
            Failure::Unauthorized => format!(
                "the API server at {} refused the credentials; check --user/--token or log in again",
                self.server
            ),
            Failure::Forbidden => {
                "the API server forbids this for your user; ask for RBAC access or use --as"
                    .to_owned()
            }
            Failure::Other => format!("the request to the API server at {} failed", self.server),
        };
        anyhow::Error::new(error).context(format!("{what}: {advice}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeout_takes_kubectl_forms() {
        assert_eq!(parse_request_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(parse_request_timeout("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_request_timeout("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_request_timeout("soon").is_err());
    }

    #[test]
    fn api_answers_are_classified() {
        let status = |code| {
            kube::Error::Api(
                kube::core::Status::failure("x", "NotFound")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert_eq!(classify(&status(404)), Failure::NotInstalled);
        assert_eq!(classify(&status(401)), Failure::Unauthorized);
        assert_eq!(classify(&status(403)), Failure::Forbidden);
        assert_eq!(classify(&status(500)), Failure::Other);
    }
}
