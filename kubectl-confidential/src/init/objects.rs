//! The one source of truth for what `init` installs. The static objects are
//! the files under `manifests/`, embedded at build time, with the same
//! transformations kustomize applies to them (`images:` digests from
//! `manifests/kustomization.yaml`); a test compares this list with
//! `kubectl kustomize manifests/`. On top come the choices of this install
//! (join exposure, out-of-cluster gate, the API server nodes are sent to)
//! and the generated objects: the two Secrets, the caBundle, the
//! AttestationPolicy and the NodeVersion. Everything here is pure: data in,
//! objects out.
//!
//! Length: about 430 lines of code, every object `init` installs in one
//! list; the rest are its tests, kept beside it.

use anyhow::{Context, Result, bail};
use confidential_api::{AttestationPolicy, NodeVersion};
use serde_json::{Value, json};

use super::args::JoinExposure;
use super::pki::ServingCert;
use super::secret_objects::{b64, master_secret_object, tls_secret_object};
use super::secrets::MasterSecretFile;

/// The namespace of the gate and the operator.
pub const NAMESPACE: &str = confidential_api::keys::NAMESPACE;
/// The gate's validating webhook configuration.
pub const WEBHOOK_CONFIGURATION: &str = "confidential-gate";
/// The Service machines reach the join endpoint through.
pub const JOIN_SERVICE: &str = "confidential-gate-join";
/// The gate's Deployment and admission Service.
pub const GATE: &str = "confidential-webhook";
/// The operator's Deployment.
pub const OPERATOR: &str = "confidential-controllers";

/// `manifests/` files in the order they are applied (CRDs come from
/// `confidential_api::crds()`, which `manifests/crds/` is generated from).
const MANIFESTS: &[(&str, &str)] = &[
    (
        "base/namespace.yaml",
        include_str!("../../../manifests/base/namespace.yaml"),
    ),
    (
        "base/node-bootstrap.yaml",
        include_str!("../../../manifests/base/node-bootstrap.yaml"),
    ),
    (
        "base/controllers.yaml",
        include_str!("../../../manifests/base/controllers.yaml"),
    ),
    (
        "webhook/serviceaccount.yaml",
        include_str!("../../../manifests/webhook/serviceaccount.yaml"),
    ),
    (
        "webhook/rbac.yaml",
        include_str!("../../../manifests/webhook/rbac.yaml"),
    ),
    (
        "webhook/deployment.yaml",
        include_str!("../../../manifests/webhook/deployment.yaml"),
    ),
    (
        "webhook/service.yaml",
        include_str!("../../../manifests/webhook/service.yaml"),
    ),
    (
        "webhook/join-service.yaml",
        include_str!("../../../manifests/webhook/join-service.yaml"),
    ),
    (
        "webhook/poddisruptionbudget.yaml",
        include_str!("../../../manifests/webhook/poddisruptionbudget.yaml"),
    ),
    (
        "webhook/validatingwebhookconfiguration.yaml",
        include_str!("../../../manifests/webhook/validatingwebhookconfiguration.yaml"),
    ),
];
const KUSTOMIZATION: &str = include_str!("../../../manifests/kustomization.yaml");

/// One `images:` entry of the kustomization: the image name and its digest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct PinnedImage {
    pub name: String,
    pub digest: String,
}

impl PinnedImage {
    /// Whether the digest is one of the placeholders `manifests/` carries in
    /// a source tree (`sha256:` + 63 zeros + one digit): a release writes
    /// the digests of the images it built and pushed; from source,
    /// `cargo xtask images` writes them to `dist/images.json`.
    pub fn is_placeholder(&self) -> bool {
        self.digest
            .strip_prefix("sha256:")
            .is_some_and(|hex| hex.len() == 64 && hex[..63].bytes().all(|b| b == b'0'))
    }
}

/// The images `init` installs, by digest (from `manifests/kustomization.yaml`).
pub fn pinned_images() -> Result<Vec<PinnedImage>> {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        images: Vec<PinnedImage>,
    }
    let k: Kustomization =
        serde_saphyr::from_str(KUSTOMIZATION).context("parsing manifests/kustomization.yaml")?;
    Ok(k.images)
}

/// Refuses to install images into the cluster by placeholder digests: the
/// Deployments would never start, and the gate would be missing while its
/// fail-closed webhooks are registered.
pub fn refuse_placeholders(images: &[PinnedImage]) -> Result<()> {
    let placeholders: Vec<&str> = images
        .iter()
        .filter(|i| i.is_placeholder())
        .map(|i| i.name.as_str())
        .collect();
    if placeholders.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "this kubectl-confidential was built from source and pins {} by placeholder digests \
         (manifests/kustomization.yaml); nothing was changed. Build the images with \
         `cargo xtask images`, push them, and pass `--images dist/images.json`; or run the gate \
         outside the cluster with `--gate-url`",
        placeholders.join(", ")
    )
}

/// The repository part of an image reference (without tag or digest).
fn repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => without_digest,
    }
}

/// kustomize's image transformer for digests: `name[:tag]` becomes `name@digest`.
fn pin_images(object: &mut Value, images: &[PinnedImage]) {
    let containers = object
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut);
    for container in containers.into_iter().flatten() {
        let Some(image) = container.get("image").and_then(Value::as_str) else {
            continue;
        };
        if let Some(pin) = images.iter().find(|p| p.name == repository(image)) {
            container["image"] = json!(format!("{}@{}", pin.name, pin.digest));
        }
    }
}

fn kind(object: &Value) -> &str {
    object.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn name(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The images to install: the kustomization's entries, each replaced by the
/// entry of the same name in `built` (what `cargo xtask images` wrote in
/// `dist/images.json`, passed with `--images`). A built image the manifests
/// do not use is an error: it would silently install nothing.
pub fn images_with(built: &[PinnedImage]) -> Result<Vec<PinnedImage>> {
    let mut images = pinned_images()?;
    for image in built {
        if !image.digest.starts_with("sha256:") || image.digest.len() != 71 {
            bail!(
                "image {}: digest {:?} is not sha256:<64 hex>",
                image.name,
                image.digest
            );
        }
        match images.iter_mut().find(|i| i.name == image.name) {
            Some(entry) => entry.digest = image.digest.clone(),
            None => bail!(
                "image {} is not used by manifests/ (it uses {})",
                image.name,
                images
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(images)
}

/// The objects of `manifests/` as `kubectl kustomize manifests/` renders
/// them: the CRDs, then every file's documents, images pinned by digest.
#[cfg(test)]
pub fn manifest_objects() -> Result<Vec<Value>> {
    manifest_objects_with(&pinned_images()?)
}

/// [`manifest_objects`] with `images` pinned instead of the kustomization's.
pub fn manifest_objects_with(images: &[PinnedImage]) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for crd in confidential_api::crds() {
        objects.push(serde_json::to_value(crd)?);
    }
    for (path, text) in MANIFESTS {
        let documents: Vec<Value> = serde_saphyr::from_multiple(text)
            .with_context(|| format!("parsing manifests/{path}"))?;
        for mut object in documents.into_iter().filter(|d| !d.is_null()) {
            pin_images(&mut object, images);
            objects.push(object);
        }
    }
    Ok(objects)
}

/// Where the gate runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatePlacement {
    /// In the cluster: Deployments, Services, the webhook called through its Service.
    InCluster,
    /// Outside: the API server calls this `https://HOST:PORT` URL.
    External(String),
}

/// The choices of this install that change the static objects.
#[derive(Debug, Clone)]
pub struct Layout {
    pub exposure: JoinExposure,
    pub placement: GatePlacement,
    /// The API server URL the gate hands to joining nodes.
    pub node_api_server: String,
    pub pod_network: PodNetwork,
}

/// Which network the gate's and the operator's pods run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// The pod network; they reach the API server through the `kubernetes`
    /// Service, as every pod does.
    Pods,
    /// The nodes' own network (`hostNetwork`), reaching the API server at
    /// this address directly (`KUBERNETES_SERVICE_HOST`/`_PORT` set in
    /// their environment), as a cluster's bootstrap components (kube-proxy,
    /// CNI agents) do: for nodes without a Service proxy or a pod network
    /// that reaches the control plane. The gate then listens on the nodes'
    /// addresses (admission 8443, join 9443), the operator on 8080.
    Host { api_host: String, api_port: u16 },
}

/// Puts a Deployment's pods into the nodes' network (pure).
fn into_host_network(deployment: &mut Value, api_host: &str, api_port: u16) {
    let spec = &mut deployment["spec"]["template"]["spec"];
    spec["hostNetwork"] = json!(true);
    spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    let containers = spec.get_mut("containers").and_then(Value::as_array_mut);
    for container in containers.into_iter().flatten() {
        let env = [
            json!({ "name": "KUBERNETES_SERVICE_HOST", "value": api_host }),
            json!({ "name": "KUBERNETES_SERVICE_PORT", "value": api_port.to_string() }),
        ];
        match container.get_mut("env").and_then(Value::as_array_mut) {
            Some(existing) => existing.extend(env),
            None => container["env"] = json!(env),
        }
    }
}

fn set_join_api_server(deployment: &mut Value, url: &str) {
    let args = deployment
        .pointer_mut("/spec/template/spec/containers/0/args")
        .and_then(Value::as_array_mut);
    for arg in args.into_iter().flatten() {
        if arg
            .as_str()
            .is_some_and(|a| a.starts_with("--join-api-server="))
        {
            *arg = json!(format!("--join-api-server={url}"));
        }
    }
}

/// Applies the layout to the manifest objects (pure).
pub fn lay_out(objects: Vec<Value>, layout: &Layout) -> Vec<Value> {
    let mut out = Vec::new();
    for mut object in objects {
        let (k, n) = (kind(&object).to_owned(), name(&object).to_owned());
        if let GatePlacement::External(url) = &layout.placement {
            // No kubelet runs our pods: the components run as processes.
            if matches!(k.as_str(), "Deployment" | "Service" | "PodDisruptionBudget") {
                continue;
            }
            if k == "ValidatingWebhookConfiguration" {
                for webhook in object
                    .get_mut("webhooks")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let path = webhook
                        .pointer("/clientConfig/service/path")
                        .and_then(Value::as_str)
                        .unwrap_or("/validate")
                        .to_owned();
                    webhook["clientConfig"] =
                        json!({ "url": format!("{}{path}", url.trim_end_matches('/')) });
                }
            }
        }
        if let PodNetwork::Host { api_host, api_port } = &layout.pod_network
            && k == "Deployment"
            && (n == GATE || n == OPERATOR)
        {
            into_host_network(&mut object, api_host, *api_port);
        }
        if k == "Deployment" && n == GATE {
            set_join_api_server(&mut object, &layout.node_api_server);
            if layout.exposure == JoinExposure::HostNetwork {
                let spec = &mut object["spec"]["template"]["spec"];
                spec["hostNetwork"] = json!(true);
                spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
                spec["nodeSelector"] = json!({ "node-role.kubernetes.io/control-plane": "" });
            }
        }
        if k == "Service" && n == JOIN_SERVICE {
            match &layout.exposure {
                JoinExposure::NodePort => {}
                JoinExposure::LoadBalancer => object["spec"]["type"] = json!("LoadBalancer"),
                JoinExposure::HostNetwork => continue,
                JoinExposure::External(_) => {
                    object["spec"]["type"] = json!("ClusterIP");
                    if let Some(ports) = object["spec"]["ports"].as_array_mut() {
                        for port in ports {
                            if let Some(port) = port.as_object_mut() {
                                port.remove("nodePort");
                            }
                        }
                    }
                }
            }
        }
        out.push(object);
    }
    allow_host_network(&mut out);
    out
}

/// The namespace's Pod Security level when a component runs in the nodes'
/// network: `restricted` (and `baseline`) forbid host namespaces and host
/// ports, so the ReplicaSets could create no pod. Only the gate and the
/// operator live in that namespace.
fn allow_host_network(objects: &mut [Value]) {
    let on_host = objects.iter().any(|o| {
        kind(o) == "Deployment"
            && o.pointer("/spec/template/spec/hostNetwork") == Some(&json!(true))
    });
    if !on_host {
        return;
    }
    for namespace in objects.iter_mut().filter(|o| kind(o) == "Namespace") {
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = json!("privileged");
    }
}

/// Moves everything of the gate's namespace to `namespace` (pure), as
/// kustomize's namespace transformer would, but only what lives in the
/// gate's namespace (the bootstrap-token Roles stay in kube-system): the
/// Namespace itself, namespaced objects, RBAC subjects, the webhooks'
/// Service and namespace selectors, the gate's exempt namespaces and the
/// operator's leader Lease.
pub fn in_namespace(objects: Vec<Value>, namespace: &str) -> Vec<Value> {
    if namespace == NAMESPACE {
        return objects;
    }
    let moved = |value: &mut Value| {
        if value.as_str() == Some(NAMESPACE) {
            *value = json!(namespace);
        }
    };
    objects
        .into_iter()
        .map(|mut object| {
            if kind(&object) == "Namespace"
                && let Some(name) = object.pointer_mut("/metadata/name")
            {
                moved(name);
            }
            if let Some(ns) = object.pointer_mut("/metadata/namespace") {
                moved(ns);
            }
            for subject in object
                .get_mut("subjects")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(ns) = subject.get_mut("namespace") {
                    moved(ns);
                }
            }
            for webhook in object
                .get_mut("webhooks")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(ns) = webhook.pointer_mut("/clientConfig/service/namespace") {
                    moved(ns);
                }
                for expression in webhook
                    .pointer_mut("/namespaceSelector/matchExpressions")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    for value in expression
                        .get_mut("values")
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        moved(value);
                    }
                }
            }
            if kind(&object) == "Deployment" {
                let extra = match name(&object) {
                    GATE => Some(format!(
                        "--exempt-namespaces=kube-system,kube-node-lease,kube-public,{namespace}"
                    )),
                    OPERATOR => Some(format!("--leader-namespace={namespace}")),
                    _ => None,
                };
                if let (Some(extra), Some(container)) = (
                    extra,
                    object.pointer_mut("/spec/template/spec/containers/0"),
                ) {
                    match container.get_mut("args").and_then(Value::as_array_mut) {
                        Some(args) => args.push(json!(extra)),
                        None => container["args"] = json!([extra]),
                    }
                }
            }
            object
        })
        .collect()
}

/// Sets every webhook's caBundle of the gate's webhook configuration.
pub fn set_ca_bundle(objects: &mut [Value], ca_bundle_pem: &str) {
    for object in objects
        .iter_mut()
        .filter(|o| kind(o) == "ValidatingWebhookConfiguration" && name(o) == WEBHOOK_CONFIGURATION)
    {
        for webhook in object
            .get_mut("webhooks")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            webhook["clientConfig"]["caBundle"] = json!(b64(ca_bundle_pem.as_bytes()));
        }
    }
}

/// Everything `init` applies, in order.
pub struct Install {
    /// The namespace of the gate and the operator (`-n`).
    pub namespace: String,
    pub layout: Layout,
    /// The gate's and the operator's images, by digest.
    pub images: Vec<PinnedImage>,
    pub master: MasterSecretFile,
    pub serving: ServingCert,
    /// PEM CAs the API server trusts for the gate (the serving CA, and while
    /// rotating, the previous one too).
    pub ca_bundle: String,
    pub policy: AttestationPolicy,
    pub pool: NodeVersion,
}

/// The full, ordered list of objects of `install`.
pub fn objects(install: &Install) -> Result<Vec<Value>> {
    let mut objects = lay_out(manifest_objects_with(&install.images)?, &install.layout);
    set_ca_bundle(&mut objects, &install.ca_bundle);
    // Secrets before the gate's Deployment that mounts them, right after
    // the namespace.
    let at = objects
        .iter()
        .position(|o| kind(o) == "Namespace")
        .map_or(0, |i| i + 1);
    objects.insert(at, tls_secret_object(&install.serving));
    objects.insert(at, master_secret_object(&install.master));
    let mut objects = in_namespace(objects, &install.namespace);
    objects.push(serde_json::to_value(&install.policy)?);
    objects.push(serde_json::to_value(&install.pool)?);
    if !objects
        .iter()
        .any(|o| kind(o) == "ValidatingWebhookConfiguration")
    {
        bail!("manifests/ holds no ValidatingWebhookConfiguration");
    }
    Ok(objects)
}

/// The objects as `--dry-run` prints them: Secrets without their data.
pub fn redacted(objects: &[Value]) -> Vec<Value> {
    objects
        .iter()
        .map(|o| {
            let mut o = o.clone();
            if kind(&o) == "Secret"
                && let Some(data) = o.get_mut("data").and_then(Value::as_object_mut)
            {
                for value in data.values_mut() {
                    *value = json!("<generated; not shown>");
                }
            }
            o
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholder_digests_are_recognised_and_refused_real_ones_pass() {
        let image = |digest: &str| PinnedImage {
            name: "ghcr.io/kubectl-confidential/confidential-webhook".into(),
            digest: digest.into(),
        };
        let shipped = pinned_images().expect("kustomization");
        assert!(
            shipped.iter().all(PinnedImage::is_placeholder),
            "{shipped:?}"
        );
        let err = refuse_placeholders(&shipped).expect_err("placeholders refused");
        assert!(
            err.to_string().contains("--images dist/images.json"),
            "{err}"
        );
        let real = format!("sha256:{}", "ab".repeat(32));
        assert!(!image(&real).is_placeholder());
        assert!(!image(&format!("sha256:{}1", "0".repeat(62))).is_placeholder());
        assert!(!image("sha256:01").is_placeholder());
        refuse_placeholders(&[image(&real)]).expect("real digests pass");
    }

    use super::*;
    use base64::Engine as _;

    /// The caBundle currently registered (PEM), if any.
    fn ca_bundle_of(configuration: &Value) -> Option<String> {
        let text = configuration
            .pointer("/webhooks/0/clientConfig/caBundle")
            .and_then(Value::as_str)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        String::from_utf8(bytes).ok()
    }

    fn layout(exposure: JoinExposure, placement: GatePlacement) -> Layout {
        Layout {
            exposure,
            placement,
            node_api_server: "https://203.0.113.1:6443".to_owned(),
            pod_network: PodNetwork::Pods,
        }
    }

    #[test]
    fn host_network_puts_both_components_on_the_nodes_network_with_the_api_server_address() {
        let mut on_host = layout(
            JoinExposure::External("203.0.113.7:9443".into()),
            GatePlacement::InCluster,
        );
        on_host.pod_network = PodNetwork::Host {
            api_host: "203.0.113.1".into(),
            api_port: 6443,
        };
        let objects = lay_out(manifest_objects().expect("objects"), &on_host);
        for name in [GATE, OPERATOR] {
            let deployment = find(&objects, "Deployment", name).expect(name);
            let spec = &deployment["spec"]["template"]["spec"];
            assert_eq!(spec["hostNetwork"], true, "{name}");
            assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet", "{name}");
            let env = spec["containers"][0]["env"].as_array().expect("env");
            let value = |key: &str| {
                env.iter()
                    .find(|e| e["name"] == key)
                    .map(|e| e["value"].clone())
            };
            assert_eq!(value("KUBERNETES_SERVICE_HOST"), Some(json!("203.0.113.1")));
            assert_eq!(value("KUBERNETES_SERVICE_PORT"), Some(json!("6443")));
            assert!(
                spec.get("nodeSelector").is_none(),
                "{name}: any node, not only control-plane ones"
            );
        }
        let operator = find(&objects, "Deployment", OPERATOR).expect("operator");
        let env = operator["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env");
        assert!(
            env.iter().any(|e| e["name"] == "POD_NAME"),
            "the manifest's own variables stay"
        );
        let namespace = find(&objects, "Namespace", NAMESPACE).expect("namespace");
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "restricted would refuse every host-network pod"
        );
        // The default stays on the pod network, under `restricted`.
        let objects = lay_out(
            manifest_objects().expect("objects"),
            &layout(JoinExposure::NodePort, GatePlacement::InCluster),
        );
        for name in [GATE, OPERATOR] {
            let deployment = find(&objects, "Deployment", name).expect(name);
            assert!(
                deployment["spec"]["template"]["spec"]
                    .get("hostNetwork")
                    .is_none()
            );
        }
        let namespace = find(&objects, "Namespace", NAMESPACE).expect("namespace");
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "restricted"
        );
        // The hostnetwork join exposure puts the gate on the nodes' network too.
        let objects = lay_out(
            manifest_objects().expect("objects"),
            &layout(JoinExposure::HostNetwork, GatePlacement::InCluster),
        );
        let namespace = find(&objects, "Namespace", NAMESPACE).expect("namespace");
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "privileged"
        );
    }

    fn find<'a>(objects: &'a [Value], k: &str, n: &str) -> Option<&'a Value> {
        objects.iter().find(|o| kind(o) == k && name(o) == n)
    }

    #[test]
    fn manifests_parse_and_images_are_pinned_by_digest() {
        let objects = manifest_objects().expect("manifests");
        let deployments: Vec<&Value> = objects.iter().filter(|o| kind(o) == "Deployment").collect();
        assert_eq!(deployments.len(), 2);
        for d in deployments {
            let image = d
                .pointer("/spec/template/spec/containers/0/image")
                .and_then(Value::as_str)
                .expect("image");
            assert!(image.contains("@sha256:"), "{image}");
            assert!(!image.contains(":v0"), "tag dropped: {image}");
        }
        assert_eq!(repository("r.example:5000/a/b:v1"), "r.example:5000/a/b");
        assert_eq!(repository("r.example:5000/a/b"), "r.example:5000/a/b");
        assert_eq!(repository("a/b@sha256:00"), "a/b");
    }

    #[test]
    fn built_images_replace_the_kustomization_digests_by_name() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let built = [PinnedImage {
            name: "ghcr.io/kubectl-confidential/confidential-webhook".to_owned(),
            digest: digest.clone(),
        }];
        let images = images_with(&built).expect("images");
        let objects = manifest_objects_with(&images).expect("objects");
        let gate = find(&objects, "Deployment", GATE).expect("gate");
        assert_eq!(
            gate["spec"]["template"]["spec"]["containers"][0]["image"],
            json!(format!(
                "ghcr.io/kubectl-confidential/confidential-webhook@{digest}"
            ))
        );
        let operator = find(&objects, "Deployment", "confidential-controllers").expect("operator");
        assert!(
            operator
                .to_string()
                .contains(&pinned_images().expect("pins")[1].digest),
            "the other image keeps the kustomization's digest"
        );
        for bad in [
            PinnedImage {
                name: "ghcr.io/other/image".to_owned(),
                digest: digest.clone(),
            },
            PinnedImage {
                name: built[0].name.clone(),
                digest: "sha256:00".to_owned(),
            },
        ] {
            assert!(images_with(&[bad]).is_err());
        }
    }

    #[test]
    fn another_namespace_moves_only_what_lives_in_the_gates() {
        let objects = in_namespace(manifest_objects().expect("manifests"), "conf");
        assert!(find(&objects, "Namespace", "conf").is_some());
        let text = serde_json::to_string(&objects).expect("json");
        // Only the default of a flag and the CRDs' descriptions may still
        // name the default namespace.
        for object in &objects {
            if kind(object) == "CustomResourceDefinition" {
                continue;
            }
            let s = object.to_string();
            assert!(!s.contains("\"confidential-system\""), "{s}");
        }
        assert!(text.contains("kube-system"), "kube-system objects stay");
        let role = objects
            .iter()
            .find(|o| name(o) == "confidential-webhook-bootstrap-tokens" && kind(o) == "Role")
            .expect("role");
        assert_eq!(role["metadata"]["namespace"], "kube-system");
        let gate = find(&objects, "Deployment", GATE).expect("gate");
        assert!(
            gate.to_string()
                .contains("--exempt-namespaces=kube-system,kube-node-lease,kube-public,conf")
        );
        let operator = find(&objects, "Deployment", "confidential-controllers").expect("op");
        assert!(operator.to_string().contains("--leader-namespace=conf"));
        let config = find(
            &objects,
            "ValidatingWebhookConfiguration",
            WEBHOOK_CONFIGURATION,
        )
        .expect("webhooks");
        assert_eq!(
            config["webhooks"][0]["clientConfig"]["service"]["namespace"],
            "conf"
        );
        assert_eq!(
            in_namespace(manifest_objects().expect("m"), NAMESPACE),
            manifest_objects().expect("m")
        );
    }

    #[test]
    fn join_exposures_shape_the_join_service_and_the_gate() {
        let base = manifest_objects().expect("manifests");
        let nodeport = lay_out(
            base.clone(),
            &layout(JoinExposure::NodePort, GatePlacement::InCluster),
        );
        let service = find(&nodeport, "Service", JOIN_SERVICE).expect("join service");
        assert_eq!(service["spec"]["type"], "NodePort");
        let gate = find(&nodeport, "Deployment", GATE).expect("gate");
        assert!(
            gate.to_string()
                .contains("--join-api-server=https://203.0.113.1:6443")
        );

        let lb = lay_out(
            base.clone(),
            &layout(JoinExposure::LoadBalancer, GatePlacement::InCluster),
        );
        assert_eq!(
            find(&lb, "Service", JOIN_SERVICE).expect("svc")["spec"]["type"],
            "LoadBalancer"
        );

        let host = lay_out(
            base.clone(),
            &layout(JoinExposure::HostNetwork, GatePlacement::InCluster),
        );
        assert!(find(&host, "Service", JOIN_SERVICE).is_none());
        let gate = find(&host, "Deployment", GATE).expect("gate");
        assert_eq!(gate["spec"]["template"]["spec"]["hostNetwork"], true);

        let external = lay_out(
            base,
            &layout(
                JoinExposure::External("gate.example:443".into()),
                GatePlacement::InCluster,
            ),
        );
        let svc = find(&external, "Service", JOIN_SERVICE).expect("svc");
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert!(svc.to_string().find("nodePort").is_none());
    }

    #[test]
    fn an_external_gate_installs_no_workloads_and_is_called_by_url() {
        let objects = lay_out(
            manifest_objects().expect("manifests"),
            &layout(
                JoinExposure::External("127.0.0.1:9443".into()),
                GatePlacement::External("https://127.0.0.1:8443/".into()),
            ),
        );
        assert!(
            objects
                .iter()
                .all(|o| !matches!(kind(o), "Deployment" | "Service" | "PodDisruptionBudget"))
        );
        let config = find(
            &objects,
            "ValidatingWebhookConfiguration",
            WEBHOOK_CONFIGURATION,
        )
        .expect("webhooks");
        for webhook in config["webhooks"].as_array().expect("list") {
            assert_eq!(
                webhook["clientConfig"],
                json!({ "url": "https://127.0.0.1:8443/validate" })
            );
        }
        // RBAC stays least-privilege and is installed either way.
        assert!(find(&objects, "ClusterRole", "confidential-webhook-join").is_some());
    }

    #[test]
    fn the_ca_bundle_is_set_on_every_webhook_and_dry_runs_hide_secrets() {
        let cert = super::super::pki::issue(&["a.example".to_owned()], jiff::Timestamp::now())
            .expect("issue");
        let shown = redacted(&[tls_secret_object(&cert)]);
        assert!(!shown[0].to_string().contains(&b64(cert.key_pem.as_bytes())));
        let mut objects = manifest_objects().expect("manifests");
        set_ca_bundle(&mut objects, &cert.ca_pem);
        let config = find(
            &objects,
            "ValidatingWebhookConfiguration",
            WEBHOOK_CONFIGURATION,
        )
        .expect("webhooks");
        assert_eq!(ca_bundle_of(config).as_deref(), Some(cert.ca_pem.as_str()));
    }
}
