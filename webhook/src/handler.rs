//! From review bytes to answer bytes: parses the AdmissionReview, dispatches on
//! the object's kind to the decision in [`crate::validate`], records metrics
//! and serialises the AdmissionReview response. Every input, however
//! malformed, ends as a well-formed review answer or a 400 reason; nothing
//! here panics on input (the fuzz target and a property test check that).

use std::time::Instant;

use confidential_api::{AttestationPolicy, ImagePolicy, NodeVersion};
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;
use crate::review::{self, AdmissionRequest, AdmissionResponse, Operation, ReviewError, Status};
use crate::state::Stores;
use crate::validate::{self, Decision, node::NodeMeta, workload};
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
    pub fn new(stores: Stores, metrics: Metrics) -> Self {
        Self {
            stores,
            metrics,
            trust: TrustCache::default(),
        }
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
                Ok(validate::node::validate(
                    &new,
                    old.as_ref(),
                    &self.stores.attestations.state(),
                    &self.stores.attestation_policies.state(),
                    &self.trust,
                    jiff::Timestamp::now(),
                ))
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
