//! From review bytes to answer bytes: parses the AdmissionReview, dispatches on
//! the object's kind to the decision in [`crate::validate`], records metrics
//! and serialises the AdmissionReview response. Every input, however
//! malformed, ends as a well-formed review answer or a 400 reason; nothing
//! here panics on input (the fuzz target and a property test check that).

use std::sync::Arc;
use std::time::Instant;

use confidential_api::{AttestationPolicy, ImagePolicy, NodeVersion};
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;
use crate::review::{self, AdmissionRequest, AdmissionResponse, Operation, ReviewError, Status};
use crate::state::Stores;
use crate::validate::node::{Actor, Attestations, NodeMeta};
use crate::validate::{self, Decision, workload};
use crate::verify::TrustCache;

/// What to send back for a request body.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// HTTP 200 with this AdmissionReview JSON.
    Review(Vec<u8>),
    /// HTTP 400 with this message: there was no review to answer.
    BadRequest(String),
}

/// The admission handler and everything it reads.
#[derive(Clone)]
pub struct Webhook {
    pub stores: Stores,
    pub metrics: Metrics,
    trust: TrustCache,
    /// Namespaces without image checks while no ImagePolicy covers them.
    exempt_namespaces: Arc<[String]>,
}

fn parse<T: DeserializeOwned>(
    what: &str,
    raw: &serde_json::value::RawValue,
) -> Result<T, Decision> {
    serde_json::from_str(raw.get())
        .map_err(|e| Decision::deny("malformed", format!("malformed {what}: {e}")))
}

/// A bounded metrics label for a kind.
fn kind_label(group: &str, kind: &str) -> &'static str {
    match (group, kind) {
        ("", "Node") => "Node",
        ("coordination.k8s.io", "Lease") => "Lease",
        ("", "Pod") => "Pod",
        ("", "ReplicationController") => "ReplicationController",
        ("", "PodTemplate") => "PodTemplate",
        ("apps", "Deployment") => "Deployment",
        ("apps", "StatefulSet") => "StatefulSet",
        ("apps", "DaemonSet") => "DaemonSet",
        ("apps", "ReplicaSet") => "ReplicaSet",
        ("batch", "Job") => "Job",
        ("batch", "CronJob") => "CronJob",
        ("confidential.dev", "NodeVersion") => "NodeVersion",
        ("confidential.dev", "AttestationPolicy") => "AttestationPolicy",
        ("confidential.dev", "ImagePolicy") => "ImagePolicy",
        _ => "other",
    }
}

impl Webhook {
    /// Runs `rule` on the attestations and policies as the watch caches
    /// hold them now (the Node and Lease rules read the same view).
    fn with_attestations<R>(&self, rule: impl FnOnce(&Attestations<'_>) -> R) -> R {
        let attestations = self.stores.attestations.state();
        let policies = self.stores.attestation_policies.state();
        rule(&Attestations {
            attestations: &attestations,
            policies: &policies,
            trust: &self.trust,
            now: jiff::Timestamp::now(),
        })
    }

    /// A handler with the default exempt namespaces
    /// ([`workload::DEFAULT_EXEMPT_NAMESPACES`]).
    pub fn new(stores: Stores, metrics: Metrics) -> Self {
        Self {
            stores,
            metrics,
            trust: TrustCache::default(),
            exempt_namespaces: workload::DEFAULT_EXEMPT_NAMESPACES
                .map(str::to_owned)
                .into(),
        }
    }

    /// Replaces the namespaces where no image check applies while no
    /// ImagePolicy covers them.
    pub fn with_exempt_namespaces(mut self, namespaces: Vec<String>) -> Self {
        self.exempt_namespaces = namespaces.into();
        self
    }

    /// Answers one request body.
    pub fn review(&self, body: &[u8]) -> Reply {
        let started = Instant::now();
        let (uid, kind, decision) = match review::parse(body) {
            Ok(request) => {
                let kind = kind_label(&request.kind.group, &request.kind.kind);
                let decision = self.decide(&request);
                (request.uid, kind, decision)
            }
            Err(ReviewError::Malformed { uid, message }) => {
                (uid, "other", Decision::deny("malformed", message))
            }
            Err(e @ (ReviewError::NotAReview(_) | ReviewError::NoUid)) => {
                self.metrics
                    .record("none", false, "bad_request", started.elapsed());
                return Reply::BadRequest(e.to_string());
            }
        };
        let response = AdmissionResponse {
            uid,
            allowed: decision.allowed,
            status: (!decision.allowed).then(|| Status {
                code: 403,
                message: decision.message.clone(),
                reason: "Forbidden",
            }),
            warnings: decision.warnings,
            patch_type: None,
            patch: None,
        };
        let bytes = response.to_review_json();
        self.metrics
            .record(kind, decision.allowed, decision.reason, started.elapsed());
        if !decision.allowed {
            tracing::info!(kind, reason = decision.reason, message = %decision.message, "denied");
        } else {
            tracing::debug!(kind, reason = decision.reason, "allowed");
        }
        Reply::Review(bytes)
    }

    /// Answers one request body of the optional mutating endpoint: pins
    /// tag-only images of Pods and pod templates to the digests the covering
    /// ImagePolicies map them to. It never refuses (the validating endpoint
    /// decides); anything it cannot read is admitted unchanged.
    pub fn mutate(&self, body: &[u8]) -> Reply {
        let request = match review::parse(body) {
            Ok(request) => request,
            Err(ReviewError::Malformed { uid, .. }) => {
                return Reply::Review(Self::unchanged(uid).to_review_json());
            }
            Err(e) => return Reply::BadRequest(e.to_string()),
        };
        let (group, kind) = (request.kind.group.as_str(), request.kind.kind.as_str());
        let sub = request.sub_resource.as_deref().unwrap_or("");
        let mut response = Self::unchanged(request.uid.clone());
        if self.stores.is_ready()
            && matches!(request.operation, Operation::Create | Operation::Update)
            && sub.is_empty()
            && workload::is_workload(group, kind)
            && let Ok(object) = request.object()
            && let Ok(spec) = workload::pod_spec(kind, object.get())
        {
            let patch = workload::pin_patch(
                kind,
                request.namespace.as_deref().unwrap_or(""),
                &spec,
                &self.stores.image_policies.state(),
            );
            if !patch.is_empty() {
                use base64::Engine;
                let json = serde_json::Value::Array(patch).to_string();
                response.warnings.push(format!(
                    "confidential webhook pinned tag-only images to the digests the ImagePolicy maps: {json}"
                ));
                response.patch_type = Some("JSONPatch");
                response.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
            }
        }
        Reply::Review(response.to_review_json())
    }

    fn unchanged(uid: String) -> AdmissionResponse {
        AdmissionResponse {
            uid,
            allowed: true,
            status: None,
            warnings: Vec::new(),
            patch_type: None,
            patch: None,
        }
    }

    /// Decides one parsed request.
    pub fn decide(&self, request: &AdmissionRequest<'_>) -> Decision {
        if !self.stores.is_ready() {
            return Decision::deny(
                "not_ready",
                "the confidential webhook has not synced its caches yet; retry shortly",
            );
        }
        if matches!(request.operation, Operation::Delete | Operation::Connect) {
            return Decision::allow("not_applicable");
        }
        match self.decide_kind(request) {
            Ok(decision) | Err(decision) => decision,
        }
    }

    /// Who sent the request, as the node rules distinguish users.
    fn actor(request: &AdmissionRequest<'_>) -> Actor {
        Actor::of(&request.user_info.username, &request.user_info.groups)
    }

    fn decide_kind(&self, request: &AdmissionRequest<'_>) -> Result<Decision, Decision> {
        let (group, kind) = (request.kind.group.as_str(), request.kind.kind.as_str());
        let sub = request.sub_resource.as_deref().unwrap_or("");
        let object = request
            .object()
            .map_err(|m| Decision::deny("malformed", m))?;
        match (group, kind) {
            ("", "Node") => {
                if !matches!(sub, "" | "status") {
                    return Ok(Decision::allow("not_applicable"));
                }
                let new: NodeMeta = parse("Node", object)?;
                let old: Option<NodeMeta> = request
                    .old_object()
                    .map(|raw| parse("old Node", raw))
                    .transpose()?;
                Ok(self.with_attestations(|state| {
                    validate::node::validate(&new, old.as_ref(), &Self::actor(request), state)
                }))
            }
            ("coordination.k8s.io", "Lease") => {
                if !sub.is_empty() {
                    return Ok(Decision::allow("not_applicable"));
                }
                let lease: NodeMeta = parse("Lease", object)?;
                Ok(self.with_attestations(|state| {
                    validate::lease::validate(
                        request.namespace.as_deref().unwrap_or_default(),
                        lease.metadata.name.as_deref(),
                        &Self::actor(request),
                        state,
                    )
                }))
            }
            ("confidential.dev", "NodeVersion") => {
                if !sub.is_empty() {
                    return Ok(Decision::allow("not_applicable"));
                }
                let new: NodeVersion = parse("NodeVersion", object)?;
                let old: Option<NodeVersion> = request
                    .old_object()
                    .map(|raw| parse("old NodeVersion", raw))
                    .transpose()?;
                let current = new.metadata.name.as_deref().and_then(|name| {
                    self.stores
                        .node_versions
                        .get(&kube::runtime::reflector::ObjectRef::new(name))
                });
                Ok(validate::node_version::validate(
                    &new,
                    old.as_ref(),
                    current.as_deref(),
                    &self.stores.attestation_policies.state(),
                    &self.trust,
                ))
            }
            ("confidential.dev", "AttestationPolicy") => {
                if !sub.is_empty() {
                    return Ok(Decision::allow("not_applicable"));
                }
                let policy: AttestationPolicy = parse("AttestationPolicy", object)?;
                Ok(validate::policy::validate_attestation_policy(
                    policy.metadata.name.as_deref().unwrap_or("<unnamed>"),
                    &policy.spec,
                ))
            }
            ("confidential.dev", "ImagePolicy") => {
                if !sub.is_empty() {
                    return Ok(Decision::allow("not_applicable"));
                }
                let policy: ImagePolicy = parse("ImagePolicy", object)?;
                Ok(validate::policy::validate_image_policy(
                    policy.metadata.name.as_deref().unwrap_or("<unnamed>"),
                    &policy.spec,
                ))
            }
            _ if workload::is_workload(group, kind) => {
                if !matches!(sub, "" | "ephemeralcontainers") {
                    return Ok(Decision::allow("not_applicable"));
                }
                let new = workload::pod_spec(kind, object.get())
                    .map_err(|e| Decision::deny("malformed", format!("malformed {kind}: {e}")))?;
                let old = request
                    .old_object()
                    .map(|raw| workload::pod_spec(kind, raw.get()))
                    .transpose()
                    .map_err(|e| {
                        Decision::deny("malformed", format!("malformed old {kind}: {e}"))
                    })?;
                let name = request
                    .name
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("<generated>");
                Ok(workload::validate(
                    kind,
                    name,
                    request.namespace.as_deref().unwrap_or(""),
                    &new,
                    old.as_ref(),
                    &self.stores.image_policies.state(),
                    &self.exempt_namespaces,
                ))
            }
            _ => Ok(Decision::deny(
                "unexpected_resource",
                format!(
                    "the confidential webhook does not review {kind}.{group} ({}); check the webhook configuration's rules",
                    request.resource.resource
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests;
