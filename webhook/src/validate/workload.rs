//! Container images of Pods and of the pod templates of workload controllers
//! (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob,
//! ReplicationController, PodTemplate), checked against the ImagePolicies that
//! cover the namespace.
//!
//! Every container, init container and ephemeral container image must be
//! pinned by digest and allowed by each covering policy (digest allowlist, or
//! an allowed repository). A tag-only reference is refused with the digest to
//! pin when the policy's `tagDigests` knows it. `Warn` policies admit with an
//! AdmissionReview warning.
//!
//! Secure by default: where no ImagePolicy covers a namespace, nothing allows
//! any image, so every image is refused, with a message saying how to add an
//! ImagePolicy or use warn mode. Exempt are the namespaces the webhook is
//! configured with ([`DEFAULT_EXEMPT_NAMESPACES`]) and those an ImagePolicy
//! explicitly lists in `exemptNamespaces` while no policy covers them.
//!
//! On UPDATE a container is not checked again when the old object had the
//! same container (same list, same name) with the same image, so a later
//! policy change does not block metadata updates of running workloads. The
//! match is per container on purpose: an ephemeral container added through
//! `pods/ephemeralcontainers` (`kubectl debug`) is a new container and is
//! checked like one in a new Pod, even when another container of the Pod ran
//! the same tag-only image before.

use std::sync::Arc;

use confidential_api::{ImagePolicy, PolicyMode};
use serde::Deserialize;

use super::Decision;
use crate::image_ref::{ImageRef, RepositoryPattern};

/// One container's image.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
}

/// The containers of a pod spec.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecImages {
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Vec<Container>,
    #[serde(default)]
    pub ephemeral_containers: Vec<Container>,
}

impl PodSpecImages {
    /// `(container kind, container)` for every container.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, &Container)> {
        self.containers
            .iter()
            .map(|c| ("container", c))
            .chain(self.init_containers.iter().map(|c| ("init container", c)))
            .chain(
                self.ephemeral_containers
                    .iter()
                    .map(|c| ("ephemeral container", c)),
            )
    }
}

#[derive(Deserialize, Default)]
struct WithSpec<T> {
    #[serde(default)]
    spec: Option<T>,
}

#[derive(Deserialize, Default)]
struct WithTemplate {
    #[serde(default)]
    template: Option<WithSpec<PodSpecImages>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CronJobSpec {
    #[serde(default)]
    job_template: Option<WithSpec<WithTemplate>>,
}

/// Whether `(group, kind)` has a pod spec this module checks.
pub fn is_workload(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        ("", "Pod" | "ReplicationController" | "PodTemplate")
            | (
                "apps",
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
            )
            | ("batch", "Job" | "CronJob")
    )
}

/// Extracts the pod spec of an object of `kind` from its JSON. A missing
/// template yields an empty spec (nothing to check); a wrongly typed field is
/// an error.
pub fn pod_spec(kind: &str, json: &str) -> Result<PodSpecImages, serde_json::Error> {
    Ok(match kind {
        "Pod" => serde_json::from_str::<WithSpec<PodSpecImages>>(json)?
            .spec
            .unwrap_or_default(),
        "PodTemplate" => serde_json::from_str::<WithTemplate>(json)?
            .template
            .and_then(|t| t.spec)
            .unwrap_or_default(),
        "CronJob" => serde_json::from_str::<WithSpec<CronJobSpec>>(json)?
            .spec
            .and_then(|s| s.job_template)
            .and_then(|j| j.spec)
            .and_then(|s| s.template)
            .and_then(|t| t.spec)
            .unwrap_or_default(),
        _ => serde_json::from_str::<WithSpec<WithTemplate>>(json)?
            .spec
            .and_then(|s| s.template)
            .and_then(|t| t.spec)
            .unwrap_or_default(),
    })
}

/// Namespaces no image check applies to while no ImagePolicy covers them:
/// the control plane's own and the gate's (`--exempt-namespaces`).
pub const DEFAULT_EXEMPT_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-node-lease",
    "kube-public",
    "confidential-system",
];

/// Whether `policy` covers `namespace`.
pub fn covers(policy: &ImagePolicy, namespace: &str) -> bool {
    let spec = &policy.spec;
    !spec.exempt_namespaces.iter().any(|n| n == namespace)
        && (spec.namespaces.is_empty() || spec.namespaces.iter().any(|n| n == namespace))
}

/// The digest `policy.tagDigests` maps a tag-only `image` to, matching the
/// reference as written or normalised (`nginx` = `docker.io/library/nginx:latest`).
fn known_digest<'a>(policy: &'a ImagePolicy, image: &str, parsed: &ImageRef) -> Option<&'a String> {
    let spec = &policy.spec;
    spec.tag_digests
        .get(image)
        .or_else(|| spec.tag_digests.get(&parsed.name_with_tag()))
        .or_else(|| {
            spec.tag_digests.iter().find_map(|(k, v)| {
                ImageRef::parse(k)
                    .ok()
                    .filter(|r| r.digest.is_none() && r.name_with_tag() == parsed.name_with_tag())
                    .map(|_| v)
            })
        })
}

/// JSON pointer of the pod spec inside an object of `kind`.
pub fn pod_spec_pointer(kind: &str) -> &'static str {
    match kind {
        "Pod" => "/spec",
        "PodTemplate" => "/template/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => "/spec/template/spec",
    }
}

/// For the optional mutating endpoint: a JSON Patch that pins every tag-only
/// image to the digest a covering policy's `tagDigests` maps it to
/// (`nginx:1.27` -> `nginx:1.27@sha256:...`). The validating endpoint still
/// decides whether the pinned image is allowed.
pub fn pin_patch(
    kind: &str,
    namespace: &str,
    spec: &PodSpecImages,
    policies: &[Arc<ImagePolicy>],
) -> Vec<serde_json::Value> {
    let covering: Vec<&ImagePolicy> = policies
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| covers(p, namespace))
        .collect();
    let mut patch = Vec::new();
    let lists = [
        ("containers", &spec.containers),
        ("initContainers", &spec.init_containers),
        ("ephemeralContainers", &spec.ephemeral_containers),
    ];
    for (list, containers) in lists {
        for (index, container) in containers.iter().enumerate() {
            let Some(image) = container.image.as_deref() else {
                continue;
            };
            let Ok(parsed) = ImageRef::parse(image) else {
                continue;
            };
            if parsed.digest.is_some() {
                continue;
            }
            if let Some(digest) = covering
                .iter()
                .find_map(|p| known_digest(p, image, &parsed))
            {
                patch.push(serde_json::json!({
                    "op": "replace",
                    "path": format!("{}/{list}/{index}/image", pod_spec_pointer(kind)),
                    "value": format!("{image}@{digest}"),
                }));
            }
        }
    }
    patch
}

/// Why one image is not allowed by one policy, or `None` when it is.
pub fn check_image(policy: &ImagePolicy, image: &str) -> Option<String> {
    let parsed = match ImageRef::parse(image) {
        Ok(parsed) => parsed,
        Err(e) => return Some(format!("image {image:?} is not a valid reference: {e}")),
    };
    let spec = &policy.spec;
    let Some(digest) = parsed.digest.as_deref() else {
        let pin = known_digest(policy, image, &parsed);
        let base = image
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(image, |(name, _)| name);
        return Some(match pin {
            Some(digest) => {
                format!("image {image:?} is not pinned by digest; pin it as {base}@{digest}")
            }
            None => format!(
                "image {image:?} is not pinned by digest; use {base}@sha256:<digest> with a digest the ImagePolicy allows"
            ),
        });
    };
    if spec.allowed_digests.iter().any(|d| d == digest) {
        return None;
    }
    let name = parsed.name();
    if spec
        .allowed_repositories
        .iter()
        .any(|pattern| RepositoryPattern::parse(pattern).is_ok_and(|p| p.matches(&name)))
    {
        return None;
    }
    Some(format!(
        "image {image:?} is pinned, but neither its digest nor its repository {name} is allowed"
    ))
}

/// Whether the old object had this very container (same list, same name)
/// running this image.
fn ran_before(old: Option<&PodSpecImages>, what: &str, container: &Container) -> bool {
    old.is_some_and(|o| {
        o.all().any(|(old_what, c)| {
            old_what == what && c.name == container.name && c.image == container.image
        })
    })
}

/// Why an image cannot run where no ImagePolicy covers the namespace.
fn unmeasured_without_policy(image: &str) -> String {
    match ImageRef::parse(image) {
        Err(e) => format!("image {image:?} is not a valid reference: {e}"),
        Ok(parsed) if parsed.digest.is_none() => format!("image {image:?} is not pinned by digest"),
        Ok(_) => format!("image {image:?} is pinned, but no ImagePolicy allows it"),
    }
}

/// Decides the images of a workload in `namespace`. `old` is the old object's
/// pod spec on UPDATE; `exempt_namespaces` are the webhook's configured
/// exemptions, which apply only where no ImagePolicy covers the namespace.
pub fn validate(
    kind: &str,
    name: &str,
    namespace: &str,
    new: &PodSpecImages,
    old: Option<&PodSpecImages>,
    policies: &[Arc<ImagePolicy>],
    exempt_namespaces: &[String],
) -> Decision {
    let covering: Vec<&ImagePolicy> = policies
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| covers(p, namespace))
        .collect();
    let to_check: Vec<(&str, &Container, &str)> = new
        .all()
        .filter(|(what, container)| !ran_before(old, what, container))
        .filter_map(|(what, container)| {
            container
                .image
                .as_deref()
                .map(|image| (what, container, image))
        })
        .collect();
    if covering.is_empty() {
        let exempt = exempt_namespaces.iter().any(|n| n == namespace)
            || policies
                .iter()
                .any(|p| p.spec.exempt_namespaces.iter().any(|n| n == namespace));
        if exempt {
            return Decision::allow("exempt_namespace");
        }
        if to_check.is_empty() {
            return Decision::allow("not_covered");
        }
        let problems: Vec<String> = to_check
            .iter()
            .map(|(what, container, image)| {
                format!(
                    "{what} {:?}: {}",
                    container.name,
                    unmeasured_without_policy(image)
                )
            })
            .collect();
        return Decision::deny(
            "no_image_policy",
            format!(
                "{kind} {namespace}/{name}: no ImagePolicy covers namespace {namespace:?}, and images must be measured (pinned by digest and allowed) where none does: {}. \
                 Add an ImagePolicy whose spec.namespaces includes {namespace:?} (or is empty) and that allows these images \
                 (spec.allowedDigests, spec.allowedRepositories, spec.tagDigests to learn the pins), \
                 or one with spec.mode: Warn to admit unmeasured images with a warning",
                problems.join("; ")
            ),
        );
    }
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    for (what, container, image) in to_check {
        for policy in &covering {
            if let Some(problem) = check_image(policy, image) {
                let policy_name = policy.metadata.name.as_deref().unwrap_or("<unnamed>");
                let line = format!(
                    "{what} {:?}: {problem} (ImagePolicy {policy_name})",
                    container.name
                );
                match policy.spec.mode {
                    PolicyMode::Enforce => refusals.push(line),
                    PolicyMode::Warn => warnings.push(line),
                }
            }
        }
    }
    if !refusals.is_empty() {
        return Decision::deny(
            "unmeasured_image",
            format!("{kind} {namespace}/{name}: {}", refusals.join("; ")),
        )
        .with_warnings(warnings);
    }
    if !warnings.is_empty() {
        return Decision::allow("warned").with_warnings(warnings);
    }
    Decision::allow("measured_images")
}

#[cfg(test)]
#[path = "workload_tests.rs"]
mod tests;
