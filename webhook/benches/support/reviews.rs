//! The AdmissionReviews the admission benchmarks send: the load mix (Node
//! status heartbeats with their old object, Pod CREATEs, Deployment CREATEs,
//! all admissible) and the decision mix (one review per case our ImagePolicy
//! distinguishes, admissible and not), plus the cluster objects that make
//! the load mix admissible to our gate.

use anyhow::Result;
use confidential_api::{AttestationPolicy, ImagePolicy, ImagePolicySpec, PolicyMode};
use confidential_testenv::fixtures::{self, Publisher};
use confidential_webhook::validate::node::image_label_value;
use serde_json::{Value, json};

pub const IMAGE: &str = "ghcr.io/acme/node-image:v1.2.0";
pub const PCR4: &str = "4444444444444444444444444444444444444444444444444444444444444444";
/// The one digest the image policies allow in any repository.
pub const DIGEST: &str = "sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31";
/// A digest no policy allows by itself.
pub const OTHER_DIGEST: &str =
    "sha256:9b2a3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
/// Repositories the image policies allow pinned images from.
pub const ALLOWED_REPOSITORY: &str = "ghcr.io/acme/*";
/// Attested nodes the Node reviews name.
pub const NODES: usize = 200;

/// The AttestationPolicy the Node reviews' image is signed into (publisher
/// `acme`, key seed 1, PCR 4 enforced).
pub fn attestation_policy() -> Result<AttestationPolicy> {
    let publisher = Publisher::seeded("acme", 1);
    let file = fixtures::measurement_file(IMAGE, &[(4, [0x44; 32], false)]);
    let mut spec = fixtures::policy_spec(None, &[&publisher], vec![publisher.entry(&file)]);
    spec.reattestation_interval = None;
    Ok(AttestationPolicy::new("default", spec))
}

/// Our ImagePolicy: digest-pinned images, allowed by digest or repository,
/// in every namespace but kube-system.
pub fn image_policy() -> ImagePolicy {
    ImagePolicy::new(
        "apps",
        ImagePolicySpec {
            mode: PolicyMode::Enforce,
            allowed_digests: vec![DIGEST.into()],
            allowed_repositories: vec![ALLOWED_REPOSITORY.into()],
            exempt_namespaces: vec!["kube-system".into()],
            ..Default::default()
        },
    )
}

pub fn node_json(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": "6f0c8a0e-2f9e-4d55-9a53-0d1e5e5f1a11", "resourceVersion": "123456",
            "labels": {
                "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "n2d-standard-4", "topology.kubernetes.io/zone": "europe-west3-a",
                "confidential.dev/node-image": image_label_value(IMAGE), "confidential.dev/node-pool": "workers"
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"}
        },
        "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"], "providerID": format!("gce://acme/europe-west3-a/{name}")},
        "status": {
            "capacity": {"cpu": "4", "ephemeral-storage": "101430960Ki", "memory": "16393232Ki", "pods": "110"},
            "allocatable": {"cpu": "3920m", "ephemeral-storage": "93478772582", "memory": "13640720Ki", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available"},
                {"type": "DiskPressure", "status": "False", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure"},
                {"type": "PIDPressure", "status": "False", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletHasSufficientPID", "message": "kubelet has sufficient PID available"},
                {"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-27T21:00:00Z", "lastTransitionTime": "2026-11-27T10:00:00Z", "reason": "KubeletReady", "message": "kubelet is posting ready status"}
            ],
            "addresses": [{"type": "InternalIP", "address": "10.156.0.7"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "3c6f", "systemUUID": "3c6f", "bootID": "b1", "kernelVersion": "6.12.0", "osImage": "Confidential Node Image v1.2.0", "containerRuntimeVersion": "containerd://2.1.0", "kubeletVersion": "v1.35.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "images": [
                {"names": [format!("registry.k8s.io/pause@{DIGEST}"), "registry.k8s.io/pause:3.10"], "sizeBytes": 320368},
                {"names": [format!("nginx@{DIGEST}")], "sizeBytes": 72000000}
            ]
        }
    })
}

pub fn pod_spec(image: &str) -> Value {
    json!({
        "containers": [{
            "name": "web", "image": image,
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
            "securityContext": {"runAsNonRoot": true, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false}
        }],
        "initContainers": [{"name": "migrate", "image": format!("ghcr.io/acme/migrate@{DIGEST}"), "args": ["--up"]}],
        "serviceAccountName": "web", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
    })
}

pub fn review(uid: usize, kind: &str) -> Vec<u8> {
    let request = match kind {
        "Node" => {
            let name = format!("node-{}", uid % NODES);
            json!({
                "uid": format!("00000000-0000-0000-0000-{uid:012}"),
                "kind": {"group": "", "version": "v1", "kind": "Node"},
                "resource": {"group": "", "version": "v1", "resource": "nodes"},
                "subResource": "status", "requestKind": {"group": "", "version": "v1", "kind": "Node"},
                "name": name, "operation": "UPDATE",
                "userInfo": {"username": format!("system:node:{name}"), "groups": ["system:nodes", "system:authenticated"]},
                "object": node_json(&name), "oldObject": node_json(&name), "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}
            })
        }
        "Pod" => json!({
            "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": format!("web-7d4b9c-{uid}"), "namespace": "apps", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("web-7d4b9c-{uid}"), "namespace": "apps", "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c", "uid": "a1", "controller": true}]},
                "spec": pod_spec(&format!("nginx@{DIGEST}"))},
            "oldObject": null, "dryRun": false
        }),
        _ => json!({
            "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "web", "namespace": "apps", "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "apps", "labels": {"app": "web"}},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                    "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec(&format!("nginx@{DIGEST}"))}}},
            "oldObject": null, "dryRun": false
        }),
    };
    serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}))
        .unwrap_or_default()
}

/// One review of the decision mix and what the ImagePolicy's documented
/// semantics decide for it (so a disagreement can be attributed).
pub struct DecisionCase {
    pub name: &'static str,
    pub expected_allowed: bool,
    pub body: Vec<u8>,
}

fn envelope(request: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}))
        .unwrap_or_default()
}

/// A pod spec with the given container, init container and ephemeral
/// container images (`None` leaves the list out).
fn spec_with(container: &str, init: Option<&str>, ephemeral: Option<&str>) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": container}]});
    if let Some(image) = init {
        spec["initContainers"] = json!([{"name": "init", "image": image}]);
    }
    if let Some(image) = ephemeral {
        spec["ephemeralContainers"] = json!([{"name": "debugger", "image": image}]);
    }
    spec
}

struct Target {
    group: &'static str,
    kind: &'static str,
    resource: &'static str,
}

const POD: Target = Target {
    group: "",
    kind: "Pod",
    resource: "pods",
};
const DEPLOYMENT: Target = Target {
    group: "apps",
    kind: "Deployment",
    resource: "deployments",
};
const CRONJOB: Target = Target {
    group: "batch",
    kind: "CronJob",
    resource: "cronjobs",
};

fn object(target: &Target, name: &str, namespace: &str, spec: Value) -> Value {
    let template = json!({"metadata": {"labels": {"app": name}}, "spec": spec});
    let (api_version, body) = match target.kind {
        "Pod" => ("v1", spec),
        "CronJob" => (
            "batch/v1",
            json!({"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}),
        ),
        _ => (
            "apps/v1",
            json!({"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}),
        ),
    };
    json!({"apiVersion": api_version, "kind": target.kind,
        "metadata": {"name": name, "namespace": namespace}, "spec": body})
}

fn create(uid: usize, target: &Target, namespace: &str, spec: Value) -> Vec<u8> {
    let name = format!("case-{uid}");
    let version = "v1";
    envelope(json!({
        "uid": format!("10000000-0000-0000-0000-{uid:012}"),
        "kind": {"group": target.group, "version": version, "kind": target.kind},
        "resource": {"group": target.group, "version": version, "resource": target.resource},
        "requestKind": {"group": target.group, "version": version, "kind": target.kind},
        "requestResource": {"group": target.group, "version": version, "resource": target.resource},
        "name": name, "namespace": namespace, "operation": "CREATE",
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": object(target, &name, namespace, spec),
        "oldObject": null, "dryRun": false,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
    }))
}

/// `kubectl debug`: an UPDATE of `pods/ephemeralcontainers` adding a
/// debugger to a running, admissible Pod.
fn add_ephemeral(uid: usize, image: &str) -> Vec<u8> {
    let name = format!("case-{uid}");
    let running = format!("nginx@{DIGEST}");
    let old = object(&POD, &name, "apps", spec_with(&running, None, None));
    let new = object(&POD, &name, "apps", spec_with(&running, None, Some(image)));
    envelope(json!({
        "uid": format!("10000000-0000-0000-0000-{uid:012}"),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "subResource": "ephemeralcontainers",
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "requestSubResource": "ephemeralcontainers",
        "name": name, "namespace": "apps", "operation": "UPDATE",
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": new, "oldObject": old, "dryRun": false,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}
    }))
}

/// Every case our ImagePolicy distinguishes, for the Pod itself and for
/// workload templates, with the decision its documentation promises.
pub fn decision_cases() -> Vec<DecisionCase> {
    let pinned = format!("nginx@{DIGEST}");
    let other_in_repo = format!("ghcr.io/acme/web@{OTHER_DIGEST}");
    let other_outside = format!("docker.io/library/nginx@{OTHER_DIGEST}");
    let look_alike = format!("ghcr.io/acme2/web@{OTHER_DIGEST}");
    let implied_hub = format!("acme/web@{OTHER_DIGEST}");
    let tag_and_digest = format!("nginx:1.27@{DIGEST}");
    let short_digest = "nginx@sha256:0d17b565";
    let mut uid = 0;
    let mut next = || {
        uid += 1;
        uid
    };
    let mut cases = vec![
        (
            "pod, digest allowed in any repository",
            true,
            create(next(), &POD, "apps", spec_with(&pinned, None, None)),
        ),
        (
            "pod, tag and allowed digest",
            true,
            create(next(), &POD, "apps", spec_with(&tag_and_digest, None, None)),
        ),
        (
            "pod, other digest from an allowed repository",
            true,
            create(next(), &POD, "apps", spec_with(&other_in_repo, None, None)),
        ),
        (
            "pod, tag only",
            false,
            create(next(), &POD, "apps", spec_with("nginx:1.27", None, None)),
        ),
        (
            "pod, no tag no digest",
            false,
            create(next(), &POD, "apps", spec_with("nginx", None, None)),
        ),
        (
            "pod, tag only in an allowed repository",
            false,
            create(
                next(),
                &POD,
                "apps",
                spec_with("ghcr.io/acme/web:v1", None, None),
            ),
        ),
        (
            "pod, truncated digest",
            false,
            create(next(), &POD, "apps", spec_with(short_digest, None, None)),
        ),
        (
            "pod, pinned outside the allowed repositories",
            false,
            create(next(), &POD, "apps", spec_with(&other_outside, None, None)),
        ),
        (
            "pod, look-alike repository ghcr.io/acme2",
            false,
            create(next(), &POD, "apps", spec_with(&look_alike, None, None)),
        ),
        (
            "pod, Docker Hub implied (acme/web)",
            false,
            create(next(), &POD, "apps", spec_with(&implied_hub, None, None)),
        ),
        (
            "pod, init container tag only",
            false,
            create(
                next(),
                &POD,
                "apps",
                spec_with(&pinned, Some("busybox:1.36"), None),
            ),
        ),
        (
            "pod, init container pinned and allowed",
            true,
            create(
                next(),
                &POD,
                "apps",
                spec_with(&pinned, Some(other_in_repo.as_str()), None),
            ),
        ),
        (
            "pod, ephemeral container in the spec, tag only",
            false,
            create(
                next(),
                &POD,
                "apps",
                spec_with(&pinned, None, Some("busybox:1.36")),
            ),
        ),
        (
            "pod in kube-system, tag only (exempt)",
            true,
            create(
                next(),
                &POD,
                "kube-system",
                spec_with("nginx:1.27", None, None),
            ),
        ),
        (
            "deployment, template allowed",
            true,
            create(next(), &DEPLOYMENT, "apps", spec_with(&pinned, None, None)),
        ),
        (
            "deployment, template tag only",
            false,
            create(
                next(),
                &DEPLOYMENT,
                "apps",
                spec_with("nginx:1.27", None, None),
            ),
        ),
        (
            "deployment, template init container outside",
            false,
            create(
                next(),
                &DEPLOYMENT,
                "apps",
                spec_with(&pinned, Some(other_outside.as_str()), None),
            ),
        ),
        (
            "cronjob, job template allowed",
            true,
            create(
                next(),
                &CRONJOB,
                "apps",
                spec_with(&other_in_repo, None, None),
            ),
        ),
        (
            "cronjob, job template tag only",
            false,
            create(
                next(),
                &CRONJOB,
                "apps",
                spec_with("nginx:1.27", None, None),
            ),
        ),
        (
            "kubectl debug, ephemeral container pinned and allowed",
            true,
            add_ephemeral(next(), &other_in_repo),
        ),
        (
            "kubectl debug, ephemeral container tag only",
            false,
            add_ephemeral(next(), "busybox:1.36"),
        ),
    ];
    cases.push((
        "node status heartbeat of an attested node (no image rule)",
        true,
        review(next(), "Node"),
    ));
    cases
        .into_iter()
        .map(|(name, expected_allowed, body)| DecisionCase {
            name,
            expected_allowed,
            body,
        })
        .collect()
}
