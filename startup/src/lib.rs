//! Process start-up shared by the project's binaries (the gate, the operator,
//! the bootstrapper, the playground and the kubectl plugin).
//!
//! Every binary needs the same three things before it does any work, and each
//! used to do them its own way:
//!
//! - **one rustls crypto provider** (`ring`), chosen before any TLS
//!   configuration is built: rustls refuses to guess when two are compiled in;
//! - **logging** to stderr with a `RUST_LOG` override, as text or one JSON
//!   object per line, and terminal colours *only when stderr is a terminal*
//!   (log files and `kubectl logs` must not carry escape sequences);
//! - **a Kubernetes client** from an explicit kubeconfig or the environment
//!   (in-cluster service account, `KUBECONFIG`, `~/.kube/config`), with kube's
//!   silent retry of 429 responses turned off: an eviction refused by a
//!   PodDisruptionBudget and a priority-and-fairness rejection are answers the
//!   caller must see, not something to retry behind its back.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs the process-wide rustls crypto provider and the log subscriber.
///
/// `default_filter` applies when `RUST_LOG` is unset or invalid (e.g. `info`,
/// or `warn,confidential_playground=info`). Call once, first thing in `main`.
pub fn init(default_filter: &str, format: LogFormat) {
    let provider_was_set = install_crypto_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already set (a test harness
    // that calls `init` twice); the first one keeps working.
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed");
    }
    if provider_was_set {
        tracing::debug!("a rustls crypto provider was already installed");
    }
}

/// Installs `ring` as rustls' process-wide provider; returns whether one was
/// already installed (then that one stays, which is what a second call wants).
pub fn install_crypto_provider() -> bool {
    rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
}

/// Why no Kubernetes client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {}: {source}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("loading kubeconfig {}: {source}", path.display())]
    LoadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found (not in a pod, no KUBECONFIG, no ~/.kube/config; pass --kubeconfig): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// A Kubernetes client from `kubeconfig` when given, else from the
/// environment, with kube's retry of 429 responses turned off (see the
/// module documentation).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClientError::ReadKubeconfig {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|source| ClientError::LoadKubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_print_back() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>(), Ok(format));
        }
        let refused = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(refused.contains("use text or json"), "{refused}");
    }

    #[test]
    fn a_second_provider_installation_keeps_the_first() {
        install_crypto_provider();
        assert!(
            install_crypto_provider(),
            "the second call must report the existing provider"
        );
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.kubeconfig");
        let Err(error) = kube_client(Some(&path)).await else {
            panic!("a client from a kubeconfig that does not exist");
        };
        assert!(
            matches!(error, ClientError::ReadKubeconfig { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("absent.kubeconfig"), "{error}");
    }

    #[tokio::test]
    async fn an_explicit_kubeconfig_builds_a_client_without_contacting_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\nusers:\n- name: u\n  user:\n    token: t\n",
        )
        .unwrap();
        install_crypto_provider();
        kube_client(Some(&path))
            .await
            .expect("a client from a valid kubeconfig");
    }
}
