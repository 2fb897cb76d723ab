//! Unit tests of the workload image rules (kept apart: the rules file stays short).

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

fn exempt() -> Vec<String> {
    DEFAULT_EXEMPT_NAMESPACES.map(str::to_owned).to_vec()
}

/// `validate` with the default exemptions.
fn check(
    kind: &str,
    namespace: &str,
    new: &PodSpecImages,
    old: Option<&PodSpecImages>,
    policies: &[Arc<ImagePolicy>],
) -> Decision {
    validate(kind, "w", namespace, new, old, policies, &exempt())
}

fn decide(images: &[&str], mode: PolicyMode) -> Decision {
    validate(
        "Deployment",
        "web",
        "apps",
        &spec_of(images),
        None,
        &[image_policy(mode)],
        &exempt(),
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
    let d = check(
        "Pod",
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
    let d = check(
        "Pod",
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
fn exempt_namespaces_are_admitted_only_while_no_policy_covers_them() {
    let p = image_policy(PolicyMode::Enforce);
    // The policy exempts kube-system itself.
    let d = check(
        "Pod",
        "kube-system",
        &spec_of(&["nginx"]),
        None,
        std::slice::from_ref(&p),
    );
    assert_eq!(d.reason, "exempt_namespace");
    // Configured exemptions, with no policy at all.
    for ns in DEFAULT_EXEMPT_NAMESPACES {
        let d = check("Pod", ns, &spec_of(&["busybox"]), None, &[]);
        assert_eq!((d.allowed, d.reason), (true, "exempt_namespace"), "{ns}");
    }
    // An explicit exemption in a policy counts while no other policy covers it.
    let mut exempting = (*p).clone();
    exempting.spec.namespaces = vec!["prod".into()];
    exempting.spec.exempt_namespaces = vec!["monitoring".into()];
    let exempting = Arc::new(exempting);
    let d = check(
        "Pod",
        "monitoring",
        &spec_of(&["busybox"]),
        None,
        std::slice::from_ref(&exempting),
    );
    assert_eq!(d.reason, "exempt_namespace");
    // A configured exemption does not override a policy that covers it.
    let mut everywhere = (*p).clone();
    everywhere.spec.exempt_namespaces = vec![];
    let d = check(
        "Pod",
        "kube-public",
        &spec_of(&["busybox"]),
        None,
        &[Arc::new(everywhere)],
    );
    assert_eq!((d.allowed, d.reason), (false, "unmeasured_image"));
}

#[test]
fn uncovered_namespaces_refuse_every_unmeasured_image() {
    let p = image_policy(PolicyMode::Enforce);
    let mut only = (*p).clone();
    only.spec.namespaces = vec!["prod".into()];
    let only = Arc::new(only);
    for policies in [vec![], vec![only.clone()]] {
        // `kubectl run x --image=busybox`
        let d = check("Pod", "dev", &spec_of(&["busybox"]), None, &policies);
        assert!(!d.allowed);
        assert_eq!(d.reason, "no_image_policy");
        for needle in [
            "no ImagePolicy covers namespace \"dev\"",
            "container \"c0\": image \"busybox\" is not pinned by digest",
            "Add an ImagePolicy",
            "spec.mode: Warn",
        ] {
            assert!(d.message.contains(needle), "{needle}: {}", d.message);
        }
        // `kubectl create deployment web --image=nginx:1.27`
        let d = check(
            "Deployment",
            "dev",
            &spec_of(&["nginx:1.27"]),
            None,
            &policies,
        );
        assert_eq!((d.allowed, d.reason), (false, "no_image_policy"));
        // A digest alone is not a measurement: nothing allows it.
        let d = check(
            "Pod",
            "dev",
            &spec_of(&[&format!("nginx@{DIGEST}")]),
            None,
            &policies,
        );
        assert_eq!((d.allowed, d.reason), (false, "no_image_policy"));
        assert!(
            d.message.contains("no ImagePolicy allows it"),
            "{}",
            d.message
        );
        let d = check("Pod", "dev", &spec_of(&["Not An Image"]), None, &policies);
        assert!(d.message.contains("not a valid reference"), "{}", d.message);
        // Nothing to run, nothing to refuse.
        let d = check("Pod", "dev", &spec_of(&[]), None, &policies);
        assert_eq!((d.allowed, d.reason), (true, "not_covered"));
    }
    assert!(!check("Pod", "prod", &spec_of(&["nginx"]), None, &[only]).allowed);
}

#[test]
fn updates_only_check_new_containers() {
    let old = spec_of(&["nginx:latest"]);
    let same = spec_of(&["nginx:latest"]);
    let policies = [image_policy(PolicyMode::Enforce)];
    assert!(check("Deployment", "apps", &same, Some(&old), &policies).allowed);
    let changed = spec_of(&["nginx:1.27"]);
    assert!(!check("Deployment", "apps", &changed, Some(&old), &policies).allowed);
    // Running workloads stay updatable where no policy covers them.
    assert!(check("Deployment", "dev", &same, Some(&old), &[]).allowed);
    assert!(!check("Deployment", "dev", &changed, Some(&old), &[]).allowed);
    // The same image under another container name is a new container.
    let mut renamed = spec_of(&["nginx:latest"]);
    renamed.containers[0].name = "other".into();
    assert!(!check("Deployment", "apps", &renamed, Some(&old), &policies).allowed);
    // Moving an image into another list is a new container too.
    let mut moved = spec_of(&[]);
    moved.init_containers.push(Container {
        name: "c0".into(),
        image: Some("nginx:latest".into()),
    });
    assert!(!check("Deployment", "apps", &moved, Some(&old), &policies).allowed);
}

/// `kubectl debug`: an UPDATE of `pods/ephemeralcontainers` adding a
/// container whose tag-only image the Pod already runs.
#[test]
fn an_ephemeral_container_cannot_reuse_a_tag_only_image_the_pod_ran() {
    let policies = [image_policy(PolicyMode::Enforce)];
    let old = spec_of(&["busybox:1.36"]);
    let mut debug = old.clone();
    debug.ephemeral_containers.push(Container {
        name: "debugger".into(),
        image: Some("busybox:1.36".into()),
    });
    let d = check("Pod", "apps", &debug, Some(&old), &policies);
    assert_eq!((d.allowed, d.reason), (false, "unmeasured_image"));
    assert!(
        d.message.contains("ephemeral container \"debugger\""),
        "{}",
        d.message
    );
    // Where no policy covers the namespace, the same holds.
    let d = check("Pod", "dev", &debug, Some(&old), &[]);
    assert_eq!((d.allowed, d.reason), (false, "no_image_policy"));
    // A measured debug image is admitted; the Pod's own container is not
    // checked again.
    let mut measured = old.clone();
    measured.ephemeral_containers.push(Container {
        name: "debugger".into(),
        image: Some(format!("nginx@{DIGEST}")),
    });
    assert!(check("Pod", "apps", &measured, Some(&old), &policies).allowed);
    // A later update of that Pod does not re-check the ephemeral container.
    assert!(check("Pod", "apps", &measured, Some(&measured), &policies).allowed);
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
