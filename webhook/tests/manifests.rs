//! The committed manifests in `manifests/webhook/` parse as the Kubernetes
//! types they claim to be, the kustomization lists every file, the webhook
//! registration is fail-closed and keeps the control plane admissible, and the
//! Deployment's arguments are accepted by the real binary.

use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/webhook")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(dir().join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization: serde_json::Value =
        serde_saphyr::from_str(&read("kustomization.yaml")).expect("kustomization parses");
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    listed.sort();
    let mut files: Vec<String> = std::fs::read_dir(dir())
        .expect("manifests/webhook")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(listed, files);
}

#[test]
fn registration_is_fail_closed_and_spares_the_control_plane() {
    let config: ValidatingWebhookConfiguration =
        serde_saphyr::from_str(&read("validatingwebhookconfiguration.yaml")).expect("parses");
    let webhooks = config.webhooks.expect("webhooks");
    assert_eq!(webhooks.len(), 4);
    for w in &webhooks {
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"), "{}", w.name);
        assert_eq!(w.side_effects, "None", "{}", w.name);
        assert_eq!(w.admission_review_versions, vec!["v1".to_owned()]);
        assert!(w.timeout_seconds.is_some_and(|t| (1..=10).contains(&t)));
        let service = w.client_config.service.as_ref().expect("service");
        assert_eq!(service.path.as_deref(), Some("/validate"));
    }
    let workloads = webhooks
        .iter()
        .find(|w| w.name == "workloads.confidential.dev")
        .expect("workloads webhook");
    let selector = serde_json::to_string(&workloads.namespace_selector).expect("json");
    assert!(
        selector.contains("kube-system") && selector.contains("NotIn"),
        "{selector}"
    );
    let resources: Vec<String> = webhooks
        .iter()
        .flat_map(|w| w.rules.iter().flatten())
        .flat_map(|r| r.resources.iter().flatten().cloned())
        .collect();
    for needed in [
        "nodes",
        "nodes/status",
        "leases",
        "nodeversions",
        "attestationpolicies",
        "imagepolicies",
        "pods",
        "pods/ephemeralcontainers",
        "deployments",
        "statefulsets",
        "daemonsets",
        "replicasets",
        "jobs",
        "cronjobs",
    ] {
        assert!(
            resources.iter().any(|r| r == needed),
            "{needed} not registered"
        );
    }
}

#[test]
fn rbac_lets_the_webhook_watch_its_state() {
    let text = read("rbac.yaml");
    let role_doc = text.split("\n---\n").next().expect("first document");
    let role: ClusterRole = serde_saphyr::from_str(role_doc).expect("ClusterRole parses");
    let rule = &role.rules.expect("rules")[0];
    for resource in [
        "nodeattestations",
        "attestationpolicies",
        "nodeversions",
        "imagepolicies",
    ] {
        assert!(
            rule.resources.iter().flatten().any(|r| r == resource),
            "{resource}"
        );
    }
    for verb in ["list", "watch"] {
        assert!(rule.verbs.iter().any(|v| v == verb), "{verb}");
    }
}

#[test]
fn deployment_arguments_are_accepted_by_the_binary() {
    let deployment: Deployment = serde_saphyr::from_str(&read("deployment.yaml")).expect("parses");
    let spec = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let args = spec.containers[0].args.clone().expect("args");
    let dir = tempfile::tempdir().expect("tempdir");
    // Point the certificate at a missing file: the binary must get past flag
    // parsing (exit code 2 is a usage error) and fail on something real.
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            if a.starts_with("--tls-cert=") || a.starts_with("--tls-key=") {
                let (flag, _) = a.split_once('=').expect("flag=value");
                format!("{flag}={}", dir.path().join("missing.pem").display())
            } else {
                a
            }
        })
        .collect();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_confidential-webhook"))
        .args(&args)
        .arg(format!(
            "--kubeconfig={}",
            dir.path().join("missing-kubeconfig").display()
        ))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(2), "usage error: {stderr}");
    assert!(!output.status.success());
    assert!(stderr.contains("kubeconfig"), "{stderr}");
}
