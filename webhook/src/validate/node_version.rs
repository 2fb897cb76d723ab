//! NodeVersions: the desired node image and Kubernetes version of a pool.
//!
//! A new or changed image must have measurements signed by a trusted publisher
//! in an AttestationPolicy. While a rollout is in progress (the old object's
//! `RolloutProgressing` condition is `True`) image and version may not change
//! unless the `confidential.dev/force: "true"` annotation is set. The
//! Kubernetes version must parse and may not skip a minor version.

use std::sync::Arc;

use confidential_api::keys::ANNOTATION_FORCE;
use confidential_api::{AttestationPolicy, NodeVersion};

use super::Decision;
use crate::verify::{ImageTrust, TrustCache};

/// Condition type the node operator sets while it replaces nodes.
pub const CONDITION_ROLLOUT_PROGRESSING: &str = "RolloutProgressing";

/// `vMAJOR.MINOR.PATCH[-pre][+build]`, as kubeadm accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KubeVersion {
    /// Parses a Kubernetes version; the leading `v` is optional.
    pub fn parse(text: &str) -> Option<Self> {
        let core = text.strip_prefix('v').unwrap_or(text);
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
        let version = Self {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        parts.next().is_none().then_some(version)
    }
}

fn rollout_in_progress(nv: &NodeVersion) -> bool {
    nv.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_ROLLOUT_PROGRESSING && c.status == "True")
    })
}

fn forced(nv: &NodeVersion) -> bool {
    nv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_FORCE))
        .is_some_and(|v| v == "true")
}

/// Decides a CREATE (`old` is `None`) or UPDATE of a NodeVersion. `current`
/// is the watched copy of the object, used when the old object of the review
/// carries no status.
pub fn validate(
    new: &NodeVersion,
    old: Option<&NodeVersion>,
    current: Option<&NodeVersion>,
    policies: &[Arc<AttestationPolicy>],
    trust: &TrustCache,
) -> Decision {
    let name = new.metadata.name.as_deref().unwrap_or("<unnamed>");
    let spec = &new.spec;
    let Some(version) = KubeVersion::parse(&spec.kubernetes_version) else {
        return Decision::deny(
            "invalid",
            format!(
                "NodeVersion {name}: kubernetesVersion {:?} is not a version like v1.35.0",
                spec.kubernetes_version
            ),
        );
    };
    if spec.replicas < 0 {
        return Decision::deny(
            "invalid",
            format!("NodeVersion {name}: replicas may not be negative"),
        );
    }
    let mut warnings = Vec::new();
    let image_changed = old.is_none_or(|o| o.spec.image != spec.image);
    let version_changed = old.is_none_or(|o| o.spec.kubernetes_version != spec.kubernetes_version);
    if let Some(old) = old
        && (image_changed || version_changed)
    {
        let progressing = rollout_in_progress(old)
            || (old.status.is_none() && current.is_some_and(rollout_in_progress));
        if progressing {
            if forced(new) {
                warnings.push(format!(
                    "NodeVersion {name}: changing the target while a rollout is in progress ({ANNOTATION_FORCE})"
                ));
            } else {
                return Decision::deny(
                    "rollout_in_progress",
                    format!(
                        "NodeVersion {name}: a rollout to {} is in progress; wait for it to finish or set the annotation {ANNOTATION_FORCE}: \"true\"",
                        old.spec.image
                    ),
                );
            }
        }
        if version_changed && let Some(previous) = KubeVersion::parse(&old.spec.kubernetes_version)
        {
            if version.major != previous.major || version.minor > previous.minor + 1 {
                return Decision::deny(
                    "version_skip",
                    format!(
                        "NodeVersion {name}: Kubernetes {} -> {} skips a minor version; upgrade one minor version at a time",
                        old.spec.kubernetes_version, spec.kubernetes_version
                    ),
                );
            }
            if version < previous {
                warnings.push(format!(
                    "NodeVersion {name}: Kubernetes {} -> {} is a downgrade",
                    old.spec.kubernetes_version, spec.kubernetes_version
                ));
            }
        }
    }
    if image_changed {
        match trust.image_trust(&spec.image, policies) {
            ImageTrust::Trusted { .. } => {}
            ImageTrust::NotListed => {
                return Decision::deny(
                    "image_not_trusted",
                    format!(
                        "NodeVersion {name}: node image {} has no measurements in any AttestationPolicy; add its signed measurements first",
                        spec.image
                    ),
                );
            }
            ImageTrust::Untrusted(reasons) => {
                return Decision::deny(
                    "image_not_trusted",
                    format!(
                        "NodeVersion {name}: the measurements of node image {} are not signed by a trusted publisher: {}",
                        spec.image,
                        reasons.join("; ")
                    ),
                );
            }
        }
    }
    Decision::allow("trusted_image").with_warnings(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::fixtures::*;
    use confidential_api::{NodeVersionSpec, NodeVersionStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    const V2: &str = "ghcr.io/acme/node-image:v1.3.0";

    fn nv(image: &str, version: &str) -> NodeVersion {
        NodeVersion::new(
            "workers",
            NodeVersionSpec {
                image: image.to_owned(),
                kubernetes_version: version.to_owned(),
                replicas: 3,
                control_plane: false,
                strategy: Default::default(),
            },
        )
    }

    fn progressing(mut nv: NodeVersion) -> NodeVersion {
        nv.status = Some(NodeVersionStatus {
            conditions: vec![Condition {
                type_: CONDITION_ROLLOUT_PROGRESSING.to_owned(),
                status: "True".to_owned(),
                reason: "Replacing".to_owned(),
                message: String::new(),
                last_transition_time: Time(now()),
                observed_generation: None,
            }],
            ..Default::default()
        });
        nv
    }

    fn policies() -> Vec<Arc<AttestationPolicy>> {
        let key = signing_key(1);
        vec![policy(vec![
            signed_entry(IMAGE, &key),
            signed_entry(V2, &key),
        ])]
    }

    fn decide(new: &NodeVersion, old: Option<&NodeVersion>) -> Decision {
        validate(new, old, None, &policies(), &TrustCache::default())
    }

    #[test]
    fn signed_image_is_admitted() {
        let d = decide(&nv(IMAGE, "v1.35.0"), None);
        assert!(d.allowed, "{}", d.message);
        let d = decide(&nv(V2, "v1.35.0"), Some(&nv(IMAGE, "v1.35.0")));
        assert!(d.allowed, "{}", d.message);
    }

    #[test]
    fn unlisted_image_is_refused() {
        let d = decide(&nv("ghcr.io/acme/node-image:unsigned", "v1.35.0"), None);
        assert!(!d.allowed);
        assert_eq!(d.reason, "image_not_trusted");
        assert!(d.message.contains("unsigned"), "{}", d.message);
    }

    #[test]
    fn badly_signed_image_is_refused() {
        let mut entry = signed_entry(V2, &signing_key(1));
        entry.measurements.get_mut("4").unwrap().expected = "00".repeat(32);
        let policies = vec![policy(vec![entry])];
        let d = validate(
            &nv(V2, "v1.35.0"),
            None,
            None,
            &policies,
            &TrustCache::default(),
        );
        assert_eq!(d.reason, "image_not_trusted");
        assert!(d.message.contains("signature"), "{}", d.message);
        let mut entry = signed_entry(V2, &signing_key(1));
        entry.publisher = "nobody".into();
        let policies = vec![policy(vec![entry])];
        let d = validate(
            &nv(V2, "v1.35.0"),
            None,
            None,
            &policies,
            &TrustCache::default(),
        );
        assert!(d.message.contains("nobody"), "{}", d.message);
    }

    #[test]
    fn rollout_in_progress_refuses_unless_forced() {
        let old = progressing(nv(IMAGE, "v1.35.0"));
        let d = decide(&nv(V2, "v1.35.0"), Some(&old));
        assert_eq!(d.reason, "rollout_in_progress");
        assert!(d.message.contains(ANNOTATION_FORCE));
        let mut forced = nv(V2, "v1.35.0");
        forced
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(ANNOTATION_FORCE.into(), "true".into());
        let d = decide(&forced, Some(&old));
        assert!(d.allowed, "{}", d.message);
        assert_eq!(d.warnings.len(), 1);
        // Changing only replicas during a rollout is fine.
        let mut scaled = nv(IMAGE, "v1.35.0");
        scaled.spec.replicas = 5;
        assert!(decide(&scaled, Some(&old)).allowed);
        // The watched copy is used when the old object has no status.
        let d = validate(
            &nv(V2, "v1.35.0"),
            Some(&nv(IMAGE, "v1.35.0")),
            Some(&old),
            &policies(),
            &TrustCache::default(),
        );
        assert_eq!(d.reason, "rollout_in_progress");
    }

    #[test]
    fn minor_version_skips_are_refused() {
        let old = nv(IMAGE, "v1.34.2");
        assert!(decide(&nv(IMAGE, "v1.35.0"), Some(&old)).allowed);
        assert!(decide(&nv(IMAGE, "v1.34.9"), Some(&old)).allowed);
        let d = decide(&nv(IMAGE, "v1.36.0"), Some(&old));
        assert_eq!(d.reason, "version_skip");
        assert!(d.message.contains("v1.34.2 -> v1.36.0"));
        assert_eq!(
            decide(&nv(IMAGE, "v2.0.0"), Some(&old)).reason,
            "version_skip"
        );
        let d = decide(&nv(IMAGE, "v1.33.0"), Some(&old));
        assert!(d.allowed && !d.warnings.is_empty());
    }

    #[test]
    fn invalid_versions_are_refused() {
        for bad in ["1.35", "latest", "v1.35.x", "v1.35.0.1", ""] {
            assert_eq!(decide(&nv(IMAGE, bad), None).reason, "invalid", "{bad}");
        }
        assert_eq!(
            KubeVersion::parse("v1.35.0-rc.1+abc"),
            Some(KubeVersion {
                major: 1,
                minor: 35,
                patch: 0
            })
        );
    }
}
