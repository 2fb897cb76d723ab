//! Review-level tests of the handler: every input ends as a well-formed answer.
use super::*;
use crate::state::{Snapshot, Stores};
use crate::validate::fixtures;
use proptest::prelude::*;
use serde_json::{Value, json};

fn webhook() -> Webhook {
    let policy = (*fixtures::policy(vec![fixtures::signed_entry(
        fixtures::IMAGE,
        &fixtures::signing_key(1),
    )]))
    .clone();
    let mut image_policy = ImagePolicy::new("p", Default::default());
    image_policy.spec.exempt_namespaces = vec!["kube-system".into()];
    let (stores, _writers) = Stores::fixed(Snapshot {
        attestation_policies: vec![policy],
        image_policies: vec![image_policy],
        ..Default::default()
    });
    Webhook::new(stores, Metrics::new())
}

fn review(request: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": request,
    }))
    .unwrap()
}

fn answer(webhook: &Webhook, body: &[u8]) -> Value {
    match webhook.review(body) {
        Reply::Review(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Reply::BadRequest(m) => panic!("unexpected 400: {m}"),
    }
}

fn pod_request(image: &str, namespace: &str) -> Value {
    json!({
        "uid": "u1",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "p", "namespace": namespace, "operation": "CREATE",
        "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": image}]}},
    })
}

#[test]
fn pod_with_tag_is_denied_and_counted() {
    let w = webhook();
    let v = answer(&w, &review(pod_request("nginx:1.27", "default")));
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["response"]["uid"], "u1");
    assert_eq!(v["response"]["allowed"], false);
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not pinned by digest")
    );
    let v = answer(&w, &review(pod_request("nginx:1.27", "kube-system")));
    assert_eq!(v["response"]["allowed"], true);
    let metrics = w.metrics.render();
    assert!(
        metrics.contains(
            r#"admission_reviews_total{kind="Pod",verdict="denied",reason="unmeasured_image"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("admission_review_duration_seconds_bucket"));
}

#[test]
fn configured_exemptions_apply_where_no_image_policy_covers() {
    let (stores, _writers) = Stores::fixed(Snapshot::default());
    let allowed = |w: &Webhook, ns: &str| {
        answer(w, &review(pod_request("busybox", ns)))["response"]["allowed"]
            .as_bool()
            .unwrap()
    };
    let defaults = Webhook::new(stores.clone(), Metrics::new());
    assert!(!allowed(&defaults, "default"));
    assert!(allowed(&defaults, "kube-public"));
    assert!(allowed(&defaults, "confidential-system"));
    let configured =
        Webhook::new(stores, Metrics::new()).with_exempt_namespaces(vec!["sandbox".into()]);
    assert!(allowed(&configured, "sandbox"));
    assert!(!allowed(&configured, "kube-public"));
    let v = answer(&configured, &review(pod_request("busybox", "default")));
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("Add an ImagePolicy"),
        "{v}"
    );
}

#[test]
fn unready_caches_deny() {
    let (stores, _writers) = Stores::new();
    let w = Webhook::new(stores, Metrics::new());
    let v = answer(&w, &review(pod_request("nginx:1.27", "default")));
    assert_eq!(v["response"]["allowed"], false);
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not synced")
    );
}

#[test]
fn malformed_inputs_get_answers_or_400() {
    let w = webhook();
    assert!(matches!(w.review(b"{"), Reply::BadRequest(_)));
    assert!(matches!(w.review(b"[]"), Reply::BadRequest(_)));
    assert!(matches!(
        w.review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
        Reply::BadRequest(_)
    ));
    // Wrong type of object field: a denial naming the problem.
    let mut r = pod_request("x", "default");
    r["object"] = json!({"spec": {"containers": "nope"}});
    let v = answer(&w, &review(r));
    assert_eq!(v["response"]["allowed"], false);
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed Pod")
    );
    // Missing object.
    let mut r = pod_request("x", "default");
    r.as_object_mut().unwrap().remove("object");
    let v = answer(&w, &review(r));
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("without an object")
    );
    // Unexpected resource.
    let mut r = pod_request("x", "default");
    r["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    r["resource"] = json!({"group": "", "version": "v1", "resource": "configmaps"});
    let v = answer(&w, &review(r));
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("does not review ConfigMap")
    );
    // Wrong review version, uid still echoed.
    let mut body: Value = serde_json::from_slice(&review(pod_request("x", "default"))).unwrap();
    body["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let v = answer(&w, &serde_json::to_vec(&body).unwrap());
    assert_eq!(v["response"]["uid"], "u1");
    assert_eq!(v["response"]["allowed"], false);
}

#[test]
fn deletes_are_admitted() {
    let w = webhook();
    let mut r = pod_request("nginx", "default");
    r["operation"] = json!("DELETE");
    r["object"] = Value::Null;
    assert_eq!(answer(&w, &review(r))["response"]["allowed"], true);
}

#[test]
fn node_version_and_node_dispatch() {
    let w = webhook();
    let nv = json!({
        "uid": "u2",
        "kind": {"group": "confidential.dev", "version": "v1alpha1", "kind": "NodeVersion"},
        "resource": {"group": "confidential.dev", "version": "v1alpha1", "resource": "nodeversions"},
        "name": "w", "operation": "CREATE",
        "object": {"apiVersion": "confidential.dev/v1alpha1", "kind": "NodeVersion",
            "metadata": {"name": "w"},
            "spec": {"image": "ghcr.io/acme/unsigned:v1", "kubernetesVersion": "v1.35.0", "replicas": 1}},
    });
    let v = answer(&w, &review(nv.clone()));
    assert_eq!(v["response"]["allowed"], false);
    let mut signed = nv;
    signed["object"]["spec"]["image"] = json!(fixtures::IMAGE);
    assert_eq!(answer(&w, &review(signed))["response"]["allowed"], true);
    let node = json!({
        "uid": "u3",
        "kind": {"group": "", "version": "v1", "kind": "Node"},
        "resource": {"group": "", "version": "v1", "resource": "nodes"},
        "name": "n", "operation": "CREATE",
        "object": {"metadata": {"name": "n"}},
    });
    let v = answer(&w, &review(node));
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no NodeAttestation")
    );
}

#[test]
fn node_and_lease_writes_are_decided_by_who_sends_them() {
    let w = webhook();
    let lease = |user: &str, groups: Value| {
        json!({
            "uid": "u4",
            "kind": {"group": "coordination.k8s.io", "version": "v1", "kind": "Lease"},
            "resource": {"group": "coordination.k8s.io", "version": "v1", "resource": "leases"},
            "name": "n", "namespace": "kube-node-lease", "operation": "UPDATE",
            "userInfo": {"username": user, "groups": groups},
            "object": {"metadata": {"name": "n", "namespace": "kube-node-lease"}},
            "oldObject": {"metadata": {"name": "n", "namespace": "kube-node-lease"}},
        })
    };
    // The unattested node's kubelet may not renew its Lease.
    let v = answer(&w, &review(lease("system:node:n", json!(["system:nodes"]))));
    assert_eq!(v["response"]["allowed"], false);
    let message = v["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("node n has no NodeAttestation"),
        "{message}"
    );
    let v = answer(&w, &review(lease("system:node:m", json!(["system:nodes"]))));
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("node m may not change the Lease of node n")
    );
    // Nobody else is held to it.
    let v = answer(&w, &review(lease("admin", json!(["system:masters"]))));
    assert_eq!(v["response"]["allowed"], true);
    // A cordon of the same unattested node by the node-lifecycle
    // controller passes; the kubelet's status update does not.
    let node_update = |user: &str, sub: Option<&str>| {
        json!({
            "uid": "u5",
            "kind": {"group": "", "version": "v1", "kind": "Node"},
            "resource": {"group": "", "version": "v1", "resource": "nodes"},
            "subResource": sub,
            "name": "n", "operation": "UPDATE",
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": {"metadata": {"name": "n"}, "spec": {"unschedulable": true}},
            "oldObject": {"metadata": {"name": "n"}},
        })
    };
    let v = answer(
        &w,
        &review(node_update(
            "system:serviceaccount:kube-system:node-controller",
            None,
        )),
    );
    assert_eq!(v["response"]["allowed"], true);
    let v = answer(&w, &review(node_update("system:node:n", Some("status"))));
    assert_eq!(v["response"]["allowed"], false);
    let metrics = w.metrics.render();
    assert!(
        metrics.contains(r#"kind="Lease",verdict="denied",reason="unattested""#),
        "{metrics}"
    );
}

#[test]
fn mutate_returns_a_json_patch_for_known_tags() {
    let mut policy = ImagePolicy::new("p", Default::default());
    policy
        .spec
        .tag_digests
        .insert("nginx:latest".into(), format!("sha256:{}", "a".repeat(64)));
    let (stores, _writers) = Stores::fixed(Snapshot {
        image_policies: vec![policy],
        ..Default::default()
    });
    let w = Webhook::new(stores, Metrics::new());
    let Reply::Review(bytes) = w.mutate(&review(pod_request("nginx:latest", "default"))) else {
        panic!("400");
    };
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");
    use base64::Engine;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(v["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    assert_eq!(patch[0]["path"], "/spec/containers/0/image");
    assert_eq!(
        patch[0]["value"],
        format!("nginx:latest@sha256:{}", "a".repeat(64))
    );
    // Unknown tags and malformed objects pass unchanged.
    let Reply::Review(bytes) = w.mutate(&review(pod_request("redis:7", "default"))) else {
        panic!("400");
    };
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(v["response"].get("patch").is_none());
    assert!(matches!(w.mutate(b"x"), Reply::BadRequest(_)));
}

proptest! {
    #![proptest_config(crate::property_seed::config("admission handler", 2000))]

    /// Arbitrary bytes never panic and always get a reply.
    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let w = webhook();
        for reply in [w.review(&body), w.mutate(&body)] {
            match reply {
                // A 200 answer is a parseable review.
                Reply::Review(json) => {
                    prop_assert!(serde_json::from_slice::<Value>(&json).is_ok());
                }
                Reply::BadRequest(message) => prop_assert!(!message.is_empty()),
            }
        }
    }

    /// Well-formed envelopes with arbitrary kinds and objects always get
    /// a well-formed review answer echoing the uid.
    #[test]
    fn arbitrary_requests_are_answered(
        kind in "(Pod|Node|Deployment|CronJob|NodeVersion|AttestationPolicy|ImagePolicy|[A-Za-z]{0,8})",
        group in "(|apps|batch|confidential\\.dev)",
        op in "(CREATE|UPDATE|DELETE|PATCH)",
        object in "[{}\\[\\]\":,a-z0-9 ]{0,64}",
    ) {
        let w = webhook();
        let body = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"x","kind":{{"group":"{group}","version":"v1","kind":"{kind}"}},"operation":"{op}","namespace":"ns","object":{object}}}}}"#
        );
        match w.review(body.as_bytes()) {
            Reply::Review(bytes) => {
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                prop_assert_eq!(&v["response"]["uid"], "x");
                prop_assert!(v["response"]["allowed"].is_boolean());
            }
            Reply::BadRequest(_) => {}
        }
    }
}
