//! Waiting, with progress on stderr, until what `init` installed works: the
//! CRDs are established, and the gate answers admission requests through
//! the registered webhook configuration. The gate is probed the way every
//! later request reaches it: a server-side dry-run NodeVersion that only the
//! gate refuses (its Kubernetes version does not parse). A refusal by the
//! gate proves the webhook is registered, the API server trusts the
//! caBundle and the gate serves; an acceptance means the API server does
//! not call the gate yet.

use std::time::Duration;

use anyhow::{Result, bail};
use confidential_api::{NodeVersion, NodeVersionSpec};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

/// Name of the dry-run probe object (never stored).
const PROBE: &str = "kubectl-confidential-init-probe";
/// A version the gate refuses, so only the gate can answer the probe with a refusal.
const PROBE_VERSION: &str = "not-a-version";
const POLL: Duration = Duration::from_millis(500);

/// What one probe of the gate showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateProbe {
    /// The gate refused the probe: it is registered and answers.
    Answers,
    /// The API server accepted the probe: the webhook is not in effect yet.
    NotCalled,
    /// The API server could not call the gate (the reason).
    Unreachable(String),
}

/// Classifies the outcome of the probe (pure).
pub fn classify_probe(result: &Result<NodeVersion, kube::Error>) -> GateProbe {
    match result {
        Ok(_) => GateProbe::NotCalled,
        Err(kube::Error::Api(status))
            if status.message.contains("denied the request")
                && status.message.contains(PROBE_VERSION) =>
        {
            GateProbe::Answers
        }
        Err(err) => GateProbe::Unreachable(err.to_string()),
    }
}

/// Prints a progress line to stderr when it differs from the last one.
struct Progress(String);

impl Progress {
    fn show(&mut self, line: String) {
        if line != self.0 {
            eprintln!("{line}");
            self.0 = line;
        }
    }
}

/// Waits until every CRD in `names` is Established.
pub async fn crds_established(client: &Client, names: &[String], timeout: Duration) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = Progress(String::new());
    loop {
        let mut waiting = Vec::new();
        for name in names {
            let established = api.get_opt(name).await?.is_some_and(|crd| {
                crd.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if !established {
                waiting.push(name.as_str());
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        progress.show(format!(
            "waiting for CRDs to be established: {}",
            waiting.join(", ")
        ));
        if tokio::time::Instant::now() > deadline {
            bail!(
                "CRDs not established within {timeout:?}: {}; see `kubectl get crd`",
                waiting.join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line on the gate's pods (pure): how many are ready, and why each
/// other one is not (its phase, a container's waiting reason, or the
/// scheduler's message).
pub fn pods_line(deployment: Option<&Deployment>, pods: &[Pod]) -> String {
    let (ready, desired) = deployment.map_or((0, 1), crate::version::replica_counts);
    let mut why: Vec<String> = Vec::new();
    // Pods the ReplicaSet could not even create (admission refused them).
    if let Some(failure) = deployment
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
    {
        why.push(format!(
            "no pod created: {}",
            failure.message.clone().unwrap_or_default()
        ));
    }
    for pod in pods {
        let status = pod.status.as_ref();
        let is_ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if is_ready {
            continue;
        }
        let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
        let waiting = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
        let unschedulable = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .and_then(|c| c.message.clone());
        let reason = waiting.or(unschedulable).unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        why.push(match reason.is_empty() {
            true => format!("{name} {phase}"),
            false => format!("{name} {phase} ({reason})"),
        });
    }
    match why.is_empty() {
        true => format!("the gate's pods: {ready}/{desired} ready"),
        false => format!(
            "the gate's pods: {ready}/{desired} ready; {}",
            why.join("; ")
        ),
    }
}

/// Waits until at least one of the gate's pods is ready, before the
/// webhook that calls it is registered: the webhooks fail closed, so a
/// configuration pointing at a gate that does not serve yet would stop
/// every node's heartbeat meanwhile (and, when the gate moves into the
/// cluster, the nodes it is to run on).
pub async fn gate_pods_ready(
    client: &Client,
    namespace: &str,
    deployment: &str,
    timeout: Duration,
) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = ListParams::default().labels(&format!("app.kubernetes.io/name={deployment}"));
    let started = tokio::time::Instant::now();
    let mut progress = Progress(String::new());
    loop {
        let current = deployments.get_opt(deployment).await?;
        let listed = pods.list(&selector).await?.items;
        let ready = current
            .as_ref()
            .map_or(0, |d| crate::version::replica_counts(d).0);
        let line = pods_line(current.as_ref(), &listed);
        if ready >= 1 {
            eprintln!("{line} after {}s", started.elapsed().as_secs());
            return Ok(());
        }
        progress.show(format!("waiting for {line}"));
        if started.elapsed() > timeout {
            bail!(
                "no pod of the gate became ready within {timeout:?} ({line}); nothing calls it yet. \
                 Check `kubectl -n {namespace} describe pods -l app.kubernetes.io/name={deployment}`"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the gate answers admission requests through its webhook.
pub async fn gate_answers(
    client: &Client,
    where_: &str,
    timeout: Duration,
    hint: &str,
) -> Result<()> {
    let api: Api<NodeVersion> = Api::all(client.clone());
    let probe = NodeVersion::new(
        PROBE,
        NodeVersionSpec {
            image: "kubectl-confidential.invalid/init-probe:never-stored".to_owned(),
            kubernetes_version: PROBE_VERSION.to_owned(),
            replicas: 0,
            control_plane: false,
            strategy: Default::default(),
        },
    );
    let params = PostParams {
        dry_run: true,
        field_manager: Some(super::apply::FIELD_MANAGER.to_owned()),
    };
    let started = tokio::time::Instant::now();
    let mut progress = Progress(String::new());
    loop {
        let outcome = classify_probe(&api.create(&params, &probe).await);
        let seconds = started.elapsed().as_secs();
        match outcome {
            GateProbe::Answers => {
                eprintln!("the gate answers admission requests ({where_}) after {seconds}s");
                return Ok(());
            }
            GateProbe::NotCalled => progress.show(format!(
                "waiting for the API server to call the gate ({where_}): webhook not in effect yet"
            )),
            GateProbe::Unreachable(reason) => {
                let short = reason
                    .split(": ")
                    .find(|p| p.contains("failed calling webhook"))
                    .map_or(reason.as_str(), |_| "the API server cannot call it yet");
                progress.show(format!(
                    "waiting for the gate ({where_}) to answer: {short}"
                ));
                if started.elapsed() > timeout {
                    bail!(
                        "the gate ({where_}) did not answer within {timeout:?}: {reason}. {hint}"
                    );
                }
            }
        }
        if started.elapsed() > timeout {
            bail!("the API server did not call the gate ({where_}) within {timeout:?}. {hint}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_line_says_why_a_pod_is_not_ready() {
        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "spec": { "replicas": 2, "selector": {}, "template": {} },
            "status": { "readyReplicas": 1 }
        }))
        .expect("deployment");
        let pod = |name: &str, status: serde_json::Value| -> Pod {
            serde_json::from_value(
                serde_json::json!({ "metadata": { "name": name }, "status": status }),
            )
            .expect("pod")
        };
        let pods = [
            pod(
                "gate-a",
                serde_json::json!({ "phase": "Running",
                "conditions": [{ "type": "Ready", "status": "True" }] }),
            ),
            pod(
                "gate-b",
                serde_json::json!({ "phase": "Pending",
                "conditions": [{ "type": "PodScheduled", "status": "False",
                    "message": "0/1 nodes are available: 1 node(s) didn't have free ports" }] }),
            ),
            pod(
                "gate-c",
                serde_json::json!({ "phase": "Pending",
                "containerStatuses": [{ "name": "webhook", "image": "x", "imageID": "", "ready": false,
                    "restartCount": 0, "state": { "waiting": { "reason": "ErrImagePull" } } }] }),
            ),
        ];
        assert_eq!(
            pods_line(Some(&deployment), &pods),
            "the gate's pods: 1/2 ready; gate-b Pending (0/1 nodes are available: 1 node(s) didn't have free ports); gate-c Pending (ErrImagePull)"
        );
        assert_eq!(pods_line(None, &[]), "the gate's pods: 0/1 ready");
        let refused: Deployment = serde_json::from_value(serde_json::json!({
            "spec": { "replicas": 2, "selector": {}, "template": {} },
            "status": { "conditions": [{ "type": "ReplicaFailure", "status": "True",
                "reason": "FailedCreate", "message": "pods \"gate-x\" is forbidden: violates PodSecurity" }] }
        }))
        .expect("deployment");
        assert_eq!(
            pods_line(Some(&refused), &[]),
            "the gate's pods: 0/2 ready; no pod created: pods \"gate-x\" is forbidden: violates PodSecurity"
        );
    }

    fn api_error(code: u16, message: &str) -> Result<NodeVersion, kube::Error> {
        Err(kube::Error::Api(
            kube::core::Status::failure(message, "x")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn only_the_gates_refusal_of_the_probe_counts_as_an_answer() {
        let denied = format!(
            r#"admission webhook "policies.confidential.dev" denied the request: NodeVersion {PROBE}: kubernetesVersion "{PROBE_VERSION}" is not a version like v1.35.0"#
        );
        assert_eq!(classify_probe(&api_error(400, &denied)), GateProbe::Answers);
        let failed = r#"Internal error occurred: failed calling webhook "policies.confidential.dev": Post "https://127.0.0.1:1/validate": dial tcp: connection refused"#;
        assert!(matches!(
            classify_probe(&api_error(500, failed)),
            GateProbe::Unreachable(_)
        ));
        // Another webhook's refusal is not our gate answering.
        assert!(matches!(
            classify_probe(&api_error(
                400,
                "admission webhook \"other\" denied the request: no"
            )),
            GateProbe::Unreachable(_)
        ));
        let accepted = NodeVersion::new(
            PROBE,
            NodeVersionSpec {
                image: String::new(),
                kubernetes_version: PROBE_VERSION.to_owned(),
                replicas: 0,
                control_plane: false,
                strategy: Default::default(),
            },
        );
        assert_eq!(classify_probe(&Ok(accepted)), GateProbe::NotCalled);
    }
}
