//! The admission controllers a user would pick instead of our gate, built and
//! run next to it for the side-by-side benchmarks (`webhook/benches/peers.rs`).
//!
//! A comparison is only fair on the same machine, against the same API
//! server, with the same load generator, so the peer is built here from its
//! Go module with the machine's Go toolchain and run as a process, like the
//! control plane ([`crate::binaries`]). Kyverno's `go.mod` carries a
//! `replace` line (its fork of `k8s.io/pod-security-admission`), which makes
//! `go install module@version` refuse it; a generated consumer module
//! requires Kyverno at [`KYVERNO_VERSION`] and copies Kyverno's own
//! `replace` lines. The binary is cached by version next to the control plane.
//!
//! Kyverno expects to run in a cluster (its namespace, a Service, a
//! Deployment, leader election). Out of a cluster it needs, and
//! [`Kyverno::start`] provides:
//! - its CRDs (`config/crds/` of the same module) installed in the API server
//!   (the startup sanity check refuses to run without `clusterpolicies` and
//!   `policies`, and its informers need the others);
//! - its namespace and its ConfigMap (`webhooks.namespaceSelector` lets a
//!   benchmark choose which namespaces the API server sends to Kyverno);
//! - `--serverIP=127.0.0.1:<port>`: the webhook configurations it registers
//!   then name `https://127.0.0.1:<port>/...` instead of its Service, its
//!   self-signed serving certificate gets that IP, and the runtime skips its
//!   checks of its own Deployment;
//! - `--caSecretName`/`--tlsSecretName` (required flags; Kyverno creates both
//!   Secrets itself as leader) and free loopback ports for the webhook and
//!   metrics servers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::binaries::{cache_dir, nice_go, run};
use crate::controlplane::free_port;
use crate::install_crds;
use crate::process::ManagedProcess;

/// Kyverno release built for the side-by-side benchmarks.
pub const KYVERNO_VERSION: &str = "1.19.1";
const KYVERNO_MODULE: &str = "github.com/kyverno/kyverno";
/// Namespace Kyverno runs "in" (its Secrets, ConfigMap and Lease live there).
pub const KYVERNO_NAMESPACE: &str = "kyverno";
const CA_SECRET: &str = "kyverno-svc.kyverno.svc.kyverno-tls-ca";
const TLS_SECRET: &str = "kyverno-svc.kyverno.svc.kyverno-tls-pair";
/// The webhook configuration Kyverno registers for the resources its
/// policies match.
pub const KYVERNO_RESOURCE_WEBHOOK: &str = "kyverno-resource-validating-webhook-cfg";

/// Where Kyverno is built and cached.
fn kyverno_cache() -> PathBuf {
    cache_dir().join(format!("kyverno-v{KYVERNO_VERSION}"))
}

/// The `replace` lines of a `go.mod` (single-line form and inside blocks),
/// each rendered as a single-line `replace` directive.
pub fn replace_lines(go_mod: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in go_mod.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        if in_block {
            if line == ")" {
                in_block = false;
            } else if line.contains("=>") {
                out.push(format!("replace {line}"));
            }
        } else if line == "replace (" {
            in_block = true;
        } else if line.starts_with("replace ") && line.contains("=>") {
            out.push(line.to_owned());
        }
    }
    out
}

/// The extracted module source of Kyverno (for its CRDs), downloading it once.
pub fn kyverno_source() -> Result<PathBuf> {
    let dir = kyverno_cache();
    std::fs::create_dir_all(&dir)?;
    let mut download = nice_go(&dir);
    download.args([
        "mod",
        "download",
        "-json",
        &format!("{KYVERNO_MODULE}@v{KYVERNO_VERSION}"),
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&run(download, "go mod download of Kyverno")?)
            .context("parsing `go mod download -json` output")?;
    info["Dir"]
        .as_str()
        .map(PathBuf::from)
        .context("`go mod download` did not report Kyverno's source directory")
}

/// Returns the Kyverno admission controller binary, building it once
/// (`KYVERNO` names an existing binary instead). About 15 minutes on two
/// busy cores the first time.
pub fn ensure_kyverno() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KYVERNO").map(PathBuf::from) {
        return Ok(path);
    }
    let dir = kyverno_cache();
    let binary = dir.join("out/kyverno");
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::File::create(dir.join(".lock")).context("creating Kyverno build lock")?;
    lock.lock().context("locking the Kyverno build")?;
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "testenv: building Kyverno v{KYVERNO_VERSION} from {KYVERNO_MODULE} into {} (first run only)",
        dir.display()
    );
    let source = kyverno_source()?;
    let go_mod_path = source.join("go.mod");
    let go_mod = std::fs::read_to_string(&go_mod_path)
        .with_context(|| format!("reading {}", go_mod_path.display()))?;
    let go_line = go_mod
        .lines()
        .find(|l| l.starts_with("go "))
        .unwrap_or("go 1.25");
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("go.mod"),
        format!(
            "module confidential.dev/testenv/kyverno\n\n{go_line}\n\nrequire {KYVERNO_MODULE} v{KYVERNO_VERSION}\n\n{}\n",
            replace_lines(&go_mod).join("\n")
        ),
    )?;
    std::fs::write(
        src.join("tools.go"),
        format!("//go:build tools\n\npackage tools\n\nimport _ \"{KYVERNO_MODULE}/cmd/kyverno\"\n"),
    )?;
    let mut tidy = nice_go(&src);
    tidy.args(["mod", "tidy"]);
    run(tidy, "go mod tidy for Kyverno")?;
    let mut build = nice_go(&src);
    build
        .args(["build", "-ldflags", "-s -w", "-o"])
        .arg(&binary)
        .arg(format!("{KYVERNO_MODULE}/cmd/kyverno"));
    run(build, "go build of Kyverno")?;
    Ok(binary)
}

/// A running Kyverno admission controller, stopped when dropped.
pub struct Kyverno {
    process: ManagedProcess,
    _dir: tempfile::TempDir,
    /// Where its webhook server listens (TLS).
    pub addr: SocketAddr,
    /// The CA Kyverno generated for its serving certificate.
    pub ca_pem: String,
}

impl Kyverno {
    /// Installs Kyverno's CRDs, namespace and ConfigMap in the cluster of
    /// `kubeconfig`, starts Kyverno against it and waits until it serves its
    /// webhook with its own certificate. `namespace_selector` (a
    /// LabelSelector) restricts which namespaces the API server sends to it.
    pub async fn start(
        client: &Client,
        kubeconfig: &Path,
        namespace_selector: serde_json::Value,
    ) -> Result<Self> {
        let binary = tokio::task::spawn_blocking(ensure_kyverno).await??;
        let source = tokio::task::spawn_blocking(kyverno_source).await??;
        for group in ["kyverno", "policies.kyverno.io", "policyreport", "reports"] {
            install_crds(client, &source.join("config/crds").join(group))
                .await
                .with_context(|| format!("installing Kyverno's {group} CRDs"))?;
        }
        let apply = PatchParams::apply("confidential-testenv").force();
        Api::<Namespace>::all(client.clone())
            .patch(
                KYVERNO_NAMESPACE,
                &apply,
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": KYVERNO_NAMESPACE}
                })),
            )
            .await
            .context("creating Kyverno's namespace")?;
        // The chart's default resource filters for the namespaces it leaves
        // alone, and the benchmark's namespace selector.
        Api::<ConfigMap>::namespaced(client.clone(), KYVERNO_NAMESPACE)
            .patch(
                "kyverno",
                &apply,
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "kyverno", "namespace": KYVERNO_NAMESPACE},
                    "data": {
                        "resourceFilters": "[Event,*,*][*/*,kube-system,*][*/*,kube-public,*][*/*,kube-node-lease,*][*/*,kyverno,*]",
                        "webhooks": serde_json::to_string(&json!({"namespaceSelector": namespace_selector}))?,
                    }
                })),
            )
            .await
            .context("creating Kyverno's ConfigMap")?;

        let dir = tempfile::Builder::new().prefix("kyverno-").tempdir()?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut command = Command::new(&binary);
        command
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--serverIP={addr}"))
            .arg("--webhookServerHost=127.0.0.1")
            .arg(format!("--webhookServerPort={port}"))
            .arg(format!("--caSecretName={CA_SECRET}"))
            .arg(format!("--tlsSecretName={TLS_SECRET}"))
            .arg("--metricsHost=127.0.0.1")
            .arg(format!("--metricsPort={}", free_port()?))
            .arg("--controllerRuntimeMetricsAddress=0")
            .arg("--loggingFormat=text")
            .env("KYVERNO_NAMESPACE", KYVERNO_NAMESPACE)
            .env("KYVERNO_POD_NAME", "kyverno-bench")
            .env(
                "KYVERNO_SERVICEACCOUNT_NAME",
                "kyverno-admission-controller",
            )
            .env("KYVERNO_DEPLOYMENT", "kyverno-admission-controller")
            .env("KYVERNO_SVC", "kyverno-svc")
            // Required at startup (names of its ConfigMaps), even though
            // Kyverno has defaults for both.
            .env("INIT_CONFIG", "kyverno")
            .env("METRICS_CONFIG", "kyverno-metrics");
        let mut process =
            ManagedProcess::spawn("kyverno", command, &dir.path().join("kyverno.log"))?;

        // Kyverno creates its CA as leader; fail as soon as it exits.
        let secrets: Api<Secret> = Api::namespaced(client.clone(), KYVERNO_NAMESPACE);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        let ca_pem = loop {
            process.check_running()?;
            let ca = secrets
                .get_opt(CA_SECRET)
                .await?
                .and_then(|s| s.data)
                .and_then(|d| d.get("tls.crt").cloned())
                .and_then(|b| String::from_utf8(b.0).ok());
            if let Some(pem) = ca {
                break pem;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "Kyverno created no CA Secret {CA_SECRET} within 180 s; log tail:\n{}",
                    process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        process.check_running()?;
        Ok(Self {
            process,
            _dir: dir,
            addr,
            ca_pem,
        })
    }

    /// The process id (for RSS and CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The last lines of Kyverno's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Fails when Kyverno has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.process.check_running()
    }
}

/// The `https://…` URL of the webhook in Kyverno's resource webhook
/// configuration that receives `resource` (e.g. `pods`) with failure policy
/// Fail, once Kyverno has registered it for the policies in force.
pub async fn kyverno_validate_url(client: &Client, resource: &str) -> Result<Option<String>> {
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let Some(config) = configs.get_opt(KYVERNO_RESOURCE_WEBHOOK).await? else {
        return Ok(None);
    };
    Ok(config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .find_map(|w| {
            let covers = w.rules.iter().flatten().any(|r| {
                r.resources
                    .iter()
                    .flatten()
                    .any(|r| r == resource || r == "*")
            });
            (covers && w.failure_policy.as_deref() == Some("Fail"))
                .then_some(w.client_config.url)
                .flatten()
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_replace_lines_in_both_forms() {
        let go_mod = "module x\n\nreplace a/b => c/d v1.0.0\n\nreplace (\n\te/f => g/h v0.1.0 // fork\n\t// comment\n)\nrequire z v1\n";
        assert_eq!(
            replace_lines(go_mod),
            ["replace a/b => c/d v1.0.0", "replace e/f => g/h v0.1.0"]
        );
    }
}
