//! Preflight checks: cluster settings that silently undo what the gate
//! enforces, reported as kubectl-style warnings.
//!
//! The one checked here is kube-controller-manager's CSR auto-approval.
//! Its csrapproving controller approves a kubelet client CSR when the
//! requester may `create` `certificatesigningrequests/nodeclient` (any node
//! name) or, for a node renewing its own certificate,
//! `certificatesigningrequests/selfnodeclient`. `kubeadm init` grants the
//! first to its bootstrap-token group (`kubeadm:node-autoapprove-bootstrap`)
//! and the second to `system:nodes`
//! (`kubeadm:node-autoapprove-certificate-rotation`). With such a binding a
//! token holder gets a certificate for any node name, or a revoked node
//! renews its own, before and regardless of our attestation-checking
//! approver. Bindings are matched by what their ClusterRole grants (RBAC's
//! own wildcard rules), not only by kubeadm's names.

use anyhow::{Context, Result};
use confidential_api::keys::{BOOTSTRAP_TOKEN_GROUP, KUBEADM_AUTOAPPROVE_GROUP};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Subject};
use kube::Client;
use kube::api::{Api, ListParams};

/// kube-controller-manager's permission for approving any node's client CSR.
const NODECLIENT: &str = "nodeclient";
/// ... and for approving a node's renewal of its own.
const SELFNODECLIENT: &str = "selfnodeclient";

/// Whether `rule` grants `create` on `certificatesigningrequests/<subresource>`
/// as RBAC evaluates kube-controller-manager's SubjectAccessReview (no
/// resource name, cluster scope).
fn grants_create(rule: &PolicyRule, subresource: &str) -> bool {
    let verb = rule.verbs.iter().any(|v| v == "create" || v == "*");
    let group = rule
        .api_groups
        .iter()
        .flatten()
        .any(|g| g == "certificates.k8s.io" || g == "*");
    let resource = rule.resources.iter().flatten().any(|r| {
        r == "*"
            || *r == format!("certificatesigningrequests/{subresource}")
            || *r == format!("*/{subresource}")
    });
    let any_name = rule.resource_names.as_ref().is_none_or(Vec::is_empty);
    verb && group && resource && any_name
}

/// Which auto-approval permissions a ClusterRole grants.
fn approval_grants<'a>(role: Option<&ClusterRole>, role_name: &str) -> Vec<&'a str> {
    // kubeadm's roles by name, also when the role object is not readable.
    let by_name = |sub: &str| {
        role_name == format!("system:certificates.k8s.io:certificatesigningrequests:{sub}")
    };
    [NODECLIENT, SELFNODECLIENT]
        .into_iter()
        .filter(|sub| {
            by_name(sub)
                || role
                    .and_then(|r| r.rules.as_ref())
                    .is_some_and(|rules| rules.iter().any(|rule| grants_create(rule, sub)))
        })
        .collect()
}

/// Whether a bootstrap token (ours, kubeadm's or any other) acts as `subject`.
fn is_bootstrap_subject(subject: &Subject) -> bool {
    match subject.kind.as_str() {
        "Group" => {
            subject.name == "system:bootstrappers"
                || subject.name.starts_with("system:bootstrappers:")
                || subject.name == "system:authenticated"
                || subject.name == "system:unauthenticated"
        }
        "User" => subject.name.starts_with("system:bootstrap:"),
        _ => false,
    }
}

/// Whether a node's own credentials act as `subject`.
fn is_node_subject(subject: &Subject) -> bool {
    match subject.kind.as_str() {
        "Group" => matches!(
            subject.name.as_str(),
            "system:nodes" | "system:authenticated"
        ),
        "User" => subject.name.starts_with("system:node:"),
        _ => false,
    }
}

fn describe(subject: &Subject) -> String {
    let name = &subject.name;
    let note = match name.as_str() {
        BOOTSTRAP_TOKEN_GROUP => " (the group of the gate's join tokens)",
        KUBEADM_AUTOAPPROVE_GROUP => " (kubeadm's join tokens)",
        "system:bootstrappers" => " (every bootstrap token)",
        _ => "",
    };
    format!("{} {name}{note}", subject.kind)
}

/// The warnings for `bindings`, given the cluster's `roles`: one per binding
/// that lets kube-controller-manager approve kubelet client certificates
/// without attestation. Each says the risk and the fix.
pub fn autoapprove_warnings(bindings: &[ClusterRoleBinding], roles: &[ClusterRole]) -> Vec<String> {
    let mut warnings = Vec::new();
    for binding in bindings {
        if binding.role_ref.kind != "ClusterRole" {
            continue;
        }
        let name = binding.metadata.name.as_deref().unwrap_or("<unnamed>");
        let role_name = &binding.role_ref.name;
        let role = roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(role_name.as_str()));
        let subjects = binding.subjects.as_deref().unwrap_or_default();
        let grants = approval_grants(role, role_name);
        let risky: Vec<String> = subjects
            .iter()
            .filter(|s| is_bootstrap_subject(s) || is_node_subject(s))
            .map(describe)
            .collect();
        if grants.is_empty() || risky.is_empty() {
            continue;
        }
        let risk = if grants.contains(&NODECLIENT) {
            "kube-controller-manager approves a kubelet client certificate for ANY node name these credentials request, before and regardless of remote attestation"
        } else {
            "kube-controller-manager renews a node's client certificate without checking its attestation, so a revoked or expired node keeps valid credentials"
        };
        warnings.push(format!(
            "ClusterRoleBinding {name} grants ClusterRole {role_name} ({} auto-approval) to {}: {risk}. \
             Delete it (`kubectl delete clusterrolebinding {name}`); the confidential operator approves kubelet certificates of attested nodes itself",
            grants.join(" and "),
            risky.join(", ")
        ));
    }
    warnings
}

/// Finds the ClusterRoleBindings through which kube-controller-manager
/// would approve kubelet client CSRs without attestation (kubeadm's
/// auto-approval and anything equivalent); returns one warning per binding.
pub async fn kubeadm_autoapprove_bindings(client: &Client) -> Result<Vec<String>> {
    let lp = ListParams::default();
    let bindings = Api::<ClusterRoleBinding>::all(client.clone())
        .list(&lp)
        .await
        .context("listing ClusterRoleBindings to check CSR auto-approval")?
        .items;
    let roles = Api::<ClusterRole>::all(client.clone())
        .list(&lp)
        .await
        .context("listing ClusterRoles to check CSR auto-approval")?
        .items;
    Ok(autoapprove_warnings(&bindings, &roles))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn binding(name: &str, role: &str, subjects: serde_json::Value) -> ClusterRoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subjects,
        }))
        .expect("binding")
    }

    fn group(name: &str) -> serde_json::Value {
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": name})
    }

    fn role(name: &str, rules: serde_json::Value) -> ClusterRole {
        serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules})).expect("role")
    }

    const NODECLIENT_ROLE: &str =
        "system:certificates.k8s.io:certificatesigningrequests:nodeclient";
    const SELFNODECLIENT_ROLE: &str =
        "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient";

    #[test]
    fn kubeadm_bindings_are_reported_with_the_fix() {
        let bindings = [
            binding(
                "kubeadm:node-autoapprove-bootstrap",
                NODECLIENT_ROLE,
                json!([group(KUBEADM_AUTOAPPROVE_GROUP)]),
            ),
            binding(
                "kubeadm:node-autoapprove-certificate-rotation",
                SELFNODECLIENT_ROLE,
                json!([group("system:nodes")]),
            ),
        ];
        let warnings = autoapprove_warnings(&bindings, &[]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("ANY node name"), "{}", warnings[0]);
        assert!(warnings[0].contains(KUBEADM_AUTOAPPROVE_GROUP));
        assert!(
            warnings[0]
                .contains("kubectl delete clusterrolebinding kubeadm:node-autoapprove-bootstrap")
        );
        assert!(warnings[1].contains("revoked"), "{}", warnings[1]);
    }

    #[test]
    fn every_bootstrap_subject_is_reported() {
        for subject in [
            group(BOOTSTRAP_TOKEN_GROUP),
            group("system:bootstrappers"),
            group("system:authenticated"),
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:bootstrap:abcdef"}),
        ] {
            let warnings = autoapprove_warnings(
                &[binding("b", NODECLIENT_ROLE, json!([subject.clone()]))],
                &[],
            );
            assert_eq!(warnings.len(), 1, "{subject}");
        }
    }

    #[test]
    fn equivalent_roles_are_found_by_their_rules() {
        let granting = [
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/nodeclient"], "verbs": ["create"]}]),
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]),
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["*/nodeclient"], "verbs": ["create"]}]),
        ];
        for rules in granting {
            let roles = [role("custom", rules.clone())];
            let bindings = [binding(
                "b",
                "custom",
                json!([group("system:bootstrappers")]),
            )];
            assert_eq!(autoapprove_warnings(&bindings, &roles).len(), 1, "{rules}");
        }
        let harmless = [
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create"]}]),
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/nodeclient"], "verbs": ["get"]}]),
            json!([{"apiGroups": [""], "resources": ["*"], "verbs": ["*"]}]),
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/nodeclient"], "verbs": ["create"], "resourceNames": ["x"]}]),
        ];
        for rules in harmless {
            let roles = [role("custom", rules.clone())];
            let bindings = [binding(
                "b",
                "custom",
                json!([group("system:bootstrappers")]),
            )];
            assert!(
                autoapprove_warnings(&bindings, &roles).is_empty(),
                "{rules}"
            );
        }
    }

    #[test]
    fn bindings_to_other_subjects_are_not_reported() {
        let bindings = [
            // Our own bootstrap binding: only CSR creation.
            binding(
                "confidential:kubelet-bootstrap",
                "system:node-bootstrapper",
                json!([group(BOOTSTRAP_TOKEN_GROUP)]),
            ),
            // An admin group with node-client approval: admins may approve
            // by hand anyway.
            binding("ops", NODECLIENT_ROLE, json!([group("ops")])),
        ];
        let warnings = autoapprove_warnings(&bindings, &[]);
        assert!(warnings.is_empty(), "{warnings:?}");
        // Nodes with node-client approval: any node gets any node's name.
        let warnings = autoapprove_warnings(
            &[binding(
                "nodes",
                NODECLIENT_ROLE,
                json!([group("system:nodes")]),
            )],
            &[],
        );
        assert!(warnings[0].contains("ANY node name"), "{warnings:?}");
    }
}
