//! Starting the kubelet after a first join: `kubeadm join` with the single-use
//! bootstrap token and the cluster CA pin the gate answered with, or (for a
//! kubelet someone else starts, such as the test environment's stand-in) a
//! bootstrap kubeconfig written with mode 0600.
//!
//! The argv and the kubeconfig are pure functions of the validated join
//! answer; tests check the argv against a recorded `kubeadm` stand-in.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::join::KubeletBootstrap;
use crate::secret_files::write_secret;

/// `kubeadm join` arguments (after the program name).
pub fn kubeadm_join_args(bootstrap: &KubeletBootstrap, node_name: &str) -> Vec<String> {
    vec![
        "join".to_owned(),
        bootstrap.api_endpoint.clone(),
        "--token".to_owned(),
        bootstrap.token.clone(),
        "--discovery-token-ca-cert-hash".to_owned(),
        bootstrap.ca_pin.clone(),
        "--node-name".to_owned(),
        node_name.to_owned(),
    ]
}

/// The kubelet's bootstrap kubeconfig: the API server, the cluster CA and
/// the token.
pub fn bootstrap_kubeconfig(bootstrap: &KubeletBootstrap) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: kubelet-bootstrap\n  user:\n    token: {}\n\
         contexts:\n- name: bootstrap\n  context:\n    cluster: cluster\n    user: kubelet-bootstrap\ncurrent-context: bootstrap\n",
        bootstrap.api_server,
        B64.encode(&bootstrap.ca_pem),
        bootstrap.token
    )
}

/// `kubeadm`, found on `PATH` unless a program path is given.
#[derive(Debug, Clone)]
pub struct Kubeadm {
    program: OsString,
}

impl Default for Kubeadm {
    fn default() -> Self {
        Self {
            program: "kubeadm".into(),
        }
    }
}

impl Kubeadm {
    #[cfg(test)]
    pub fn at(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// Runs `kubeadm join`; its output goes to ours.
    pub fn join(&self, bootstrap: &KubeletBootstrap, node_name: &str) -> Result<()> {
        let status = Command::new(&self.program)
            .args(kubeadm_join_args(bootstrap, node_name))
            .stdin(Stdio::null())
            .status()
            .with_context(|| {
                format!(
                    "running {:?}: install kubeadm on the node image, or pass --kubelet-bootstrap-kubeconfig",
                    self.program
                )
            })?;
        if !status.success() {
            bail!("kubeadm join failed ({status}); its output above says why");
        }
        tracing::info!(node = node_name, "kubeadm join done");
        Ok(())
    }
}

/// Writes the bootstrap kubeconfig (mode 0600).
pub fn write_bootstrap_kubeconfig(path: &Path, bootstrap: &KubeletBootstrap) -> Result<()> {
    write_secret(path, bootstrap_kubeconfig(bootstrap).as_bytes())?;
    tracing::info!(path = %path.display(), "wrote kubelet bootstrap kubeconfig");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_testenv::standin::Standin;

    fn bootstrap() -> KubeletBootstrap {
        KubeletBootstrap {
            api_server: "https://10.0.0.1:6443".into(),
            api_endpoint: "10.0.0.1:6443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            token: "abcdef.0123456789abcdef".into(),
        }
    }

    #[test]
    fn kubeadm_join_gets_endpoint_token_ca_pin_and_node_name() {
        let standin = Standin::new("kubeadm", &[]).expect("stand-in");
        Kubeadm::at(standin.program())
            .join(&bootstrap(), "node-a")
            .expect("joined");
        let calls = standin.calls().expect("recorded calls");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].argv,
            [
                "join",
                "10.0.0.1:6443",
                "--token",
                "abcdef.0123456789abcdef",
                "--discovery-token-ca-cert-hash",
                &format!("sha256:{}", "ab".repeat(32)),
                "--node-name",
                "node-a",
            ]
        );
        assert_eq!(calls[0].stdin, b"", "kubeadm gets no stdin");
    }

    #[test]
    fn failing_kubeadm_is_an_error() {
        let standin = Standin::new("kubeadm", &[("join", 1)]).expect("stand-in");
        let err = Kubeadm::at(standin.program())
            .join(&bootstrap(), "node-a")
            .expect_err("failed");
        assert!(err.to_string().contains("kubeadm join failed"), "{err}");
        let err = Kubeadm::at(standin.dir().join("missing"))
            .join(&bootstrap(), "node-a")
            .expect_err("missing");
        assert!(format!("{err:#}").contains("install kubeadm"), "{err:#}");
    }

    #[test]
    fn bootstrap_kubeconfig_carries_server_ca_and_token() {
        let text = bootstrap_kubeconfig(&bootstrap());
        assert!(text.contains("server: https://10.0.0.1:6443"));
        assert!(text.contains("token: abcdef.0123456789abcdef"));
        assert!(text.contains(&B64.encode("-----BEGIN CERTIFICATE-----\n")));
    }
}
