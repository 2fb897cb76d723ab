//! Container images of Pods and of the pod templates of workload controllers
//! (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob,
//! ReplicationController, PodTemplate), checked against the ImagePolicies that
//! cover the namespace.
//!
//! Every container, init container and ephemeral container image must be
//! pinned by digest and allowed by each covering policy (digest allowlist, or
//! an allowed repository). A tag-only reference is refused with the digest to
//! pin when the policy's `tagDigests` knows it. `Warn` policies admit with an
//! AdmissionReview warning. On UPDATE only images that the old object did not
//! already run are checked, so a later policy change does not block metadata
//! updates of running workloads. Namespaces in a policy's `exemptNamespaces`
//! (kube-system by default) are not covered by it.

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

/// Decides the images of a workload in `namespace`. `old` is the old object's
/// pod spec on UPDATE.
pub fn validate(
    kind: &str,
    name: &str,
    namespace: &str,
    new: &PodSpecImages,
    old: Option<&PodSpecImages>,
    policies: &[Arc<ImagePolicy>],
) -> Decision {
    let covering: Vec<&ImagePolicy> = policies
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| covers(p, namespace))
        .collect();
    if covering.is_empty() {
        return Decision::allow("not_covered");
    }
    let already_running =
        |image: &str| old.is_some_and(|o| o.all().any(|(_, c)| c.image.as_deref() == Some(image)));
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    for (what, container) in new.all() {
        let Some(image) = container.image.as_deref() else {
            continue;
        };
        if already_running(image) {
            continue;
        }
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
mod tests {
    use super::*;
    use confidential_api::ImagePolicySpec;

    const DIGEST: &str = "sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31";
    const OTHER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn image_policy(mode: PolicyMode) -> Arc<ImagePolicy> {
        let mut spec = ImagePolicySpec {
            mode,
            allowed_digests: vec![DIGEST.to_owned()],
            allowed_repositories: vec!["ghcr.io/acme/*".to_owned()],
            exempt_namespaces: vec!["kube-system".to_owned()],
            ..Default::default()
        };
        spec.tag_digests
            .insert("nginx:latest".to_owned(), DIGEST.to_owned());
        Arc::new(ImagePolicy::new("measured", spec))
    }

    fn spec_of(images: &[&str]) -> PodSpecImages {
        PodSpecImages {
            containers: images
                .iter()
                .enumerate()
                .map(|(i, image)| Container {
                    name: format!("c{i}"),
                    image: Some((*image).to_owned()),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn decide(images: &[&str], mode: PolicyMode) -> Decision {
        validate(
            "Deployment",
            "web",
            "apps",
            &spec_of(images),
            None,
            &[image_policy(mode)],
        )
    }

    #[test]
    fn tag_only_is_refused_with_the_pin() {
        let d = decide(&["nginx:latest"], PolicyMode::Enforce);
        assert!(!d.allowed);
        assert_eq!(d.reason, "unmeasured_image");
        assert!(
            d.message.contains(&format!("nginx@{DIGEST}")),
            "{}",
            d.message
        );
        assert!(d.message.contains("Deployment apps/web"), "{}", d.message);
        // Same pin for the normalised spelling.
        let d = decide(&["docker.io/library/nginx:latest"], PolicyMode::Enforce);
        assert!(
            d.message
                .contains(&format!("docker.io/library/nginx@{DIGEST}")),
            "{}",
            d.message
        );
        // No suggestion when the tag is unknown.
        let d = decide(&["redis:7"], PolicyMode::Enforce);
        assert!(d.message.contains("sha256:<digest>"), "{}", d.message);
    }

    #[test]
    fn allowed_digest_or_repository_is_admitted() {
        assert!(decide(&[&format!("nginx@{DIGEST}")], PolicyMode::Enforce).allowed);
        assert!(decide(&[&format!("nginx:latest@{DIGEST}")], PolicyMode::Enforce).allowed);
        assert!(decide(&[&format!("ghcr.io/acme/app@{OTHER}")], PolicyMode::Enforce).allowed);
        let d = decide(&[&format!("nginx@{OTHER}")], PolicyMode::Enforce);
        assert!(!d.allowed);
        assert!(d.message.contains("neither its digest"), "{}", d.message);
    }

    #[test]
    fn every_container_kind_is_checked() {
        let mut spec = spec_of(&[&format!("nginx@{DIGEST}")]);
        spec.init_containers.push(Container {
            name: "init".into(),
            image: Some("busybox".into()),
        });
        let d = validate(
            "Pod",
            "p",
            "apps",
            &spec,
            None,
            &[image_policy(PolicyMode::Enforce)],
        );
        assert!(
            d.message.contains("init container \"init\""),
            "{}",
            d.message
        );
        let mut spec = spec_of(&[]);
        spec.ephemeral_containers.push(Container {
            name: "debug".into(),
            image: Some("busybox".into()),
        });
        let d = validate(
            "Pod",
            "p",
            "apps",
            &spec,
            None,
            &[image_policy(PolicyMode::Enforce)],
        );
        assert!(
            d.message.contains("ephemeral container \"debug\""),
            "{}",
            d.message
        );
    }

    #[test]
    fn warn_mode_admits_with_warnings() {
        let d = decide(&["nginx:latest"], PolicyMode::Warn);
        assert!(d.allowed);
        assert_eq!(d.reason, "warned");
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].contains(&format!("nginx@{DIGEST}")));
    }

    #[test]
    fn exempt_and_uncovered_namespaces_are_admitted() {
        let p = image_policy(PolicyMode::Enforce);
        let d = validate(
            "Pod",
            "p",
            "kube-system",
            &spec_of(&["nginx"]),
            None,
            std::slice::from_ref(&p),
        );
        assert_eq!(d.reason, "not_covered");
        let mut only = (*p).clone();
        only.spec.namespaces = vec!["prod".into()];
        let only = Arc::new(only);
        assert!(
            validate(
                "Pod",
                "p",
                "dev",
                &spec_of(&["nginx"]),
                None,
                std::slice::from_ref(&only)
            )
            .allowed
        );
        assert!(!validate("Pod", "p", "prod", &spec_of(&["nginx"]), None, &[only]).allowed);
        assert_eq!(
            validate("Pod", "p", "prod", &spec_of(&["nginx"]), None, &[]).reason,
            "not_covered"
        );
    }

    #[test]
    fn updates_only_check_new_images() {
        let old = spec_of(&["nginx:latest"]);
        let same = spec_of(&["nginx:latest"]);
        let policies = [image_policy(PolicyMode::Enforce)];
        assert!(validate("Deployment", "w", "apps", &same, Some(&old), &policies).allowed);
        let changed = spec_of(&["nginx:1.27"]);
        assert!(!validate("Deployment", "w", "apps", &changed, Some(&old), &policies).allowed);
    }

    #[test]
    fn pin_patch_pins_known_tags_only() {
        let mut spec = spec_of(&["nginx:latest", "redis:7", &format!("nginx@{DIGEST}")]);
        spec.init_containers.push(Container {
            name: "init".into(),
            image: Some("docker.io/library/nginx".into()),
        });
        let patch = pin_patch(
            "Deployment",
            "apps",
            &spec,
            &[image_policy(PolicyMode::Enforce)],
        );
        assert_eq!(
            patch,
            vec![
                serde_json::json!({"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": format!("nginx:latest@{DIGEST}")}),
                serde_json::json!({"op": "replace", "path": "/spec/template/spec/initContainers/0/image", "value": format!("docker.io/library/nginx@{DIGEST}")}),
            ]
        );
        // The pinned reference is what the validating rule admits.
        let pinned = format!("nginx:latest@{DIGEST}");
        assert!(decide(&[&pinned], PolicyMode::Enforce).allowed);
        // Not in covered namespaces.
        assert!(
            pin_patch(
                "Pod",
                "kube-system",
                &spec,
                &[image_policy(PolicyMode::Enforce)]
            )
            .is_empty()
        );
        assert_eq!(
            pod_spec_pointer("CronJob"),
            "/spec/jobTemplate/spec/template/spec"
        );
    }

    #[test]
    fn pod_specs_are_found_in_every_workload_kind() {
        let template = r#"{"spec":{"containers":[{"name":"a","image":"x"}]}}"#;
        let cases = [
            (
                "Pod",
                r#"{"spec":{"containers":[{"name":"a","image":"x"}]}}"#.to_owned(),
            ),
            (
                "Deployment",
                format!(r#"{{"spec":{{"template":{template}}}}}"#),
            ),
            ("PodTemplate", format!(r#"{{"template":{template}}}"#)),
            (
                "CronJob",
                format!(r#"{{"spec":{{"jobTemplate":{{"spec":{{"template":{template}}}}}}}}}"#),
            ),
        ];
        for (kind, json) in cases {
            let spec = pod_spec(kind, &json).unwrap();
            assert_eq!(spec.containers.len(), 1, "{kind}");
            assert_eq!(spec.containers[0].image.as_deref(), Some("x"));
        }
        assert!(pod_spec("Deployment", "{}").unwrap().containers.is_empty());
        assert!(pod_spec("Pod", r#"{"spec":{"containers":"no"}}"#).is_err());
        assert!(is_workload("apps", "Deployment"));
        assert!(is_workload("batch", "CronJob"));
        assert!(!is_workload("apps", "Pod"));
    }
}
