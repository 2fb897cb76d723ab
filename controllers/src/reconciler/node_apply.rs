//! Node changes by server-side apply with our field manager
//! ([`FIELD_MANAGER`]). An apply states *every* field the manager owns on
//! the object: a field it owned and leaves out is removed. So each change
//! starts from the operator's current applied configuration of that Node
//! (the fields `managedFields` records for our manager, with their current
//! values), adds the change, and applies the whole: pairing a donor keeps
//! its cordon and drain start, copying a label keeps the labels copied
//! before.
//!
//! Taints are not applied this way: `spec.taints` is an atomic list, so an
//! apply would take the whole list (the node lifecycle controller's taints
//! included). Revocation updates the list it read, guarded by the Node's
//! resourceVersion (see `execute::revoke`).

use std::collections::BTreeMap;

use confidential_api::keys::FIELD_MANAGER;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde_json::{Value, json};

/// What the operator sets on a Node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIntent {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `spec.unschedulable` (only `Some(true)` is ever applied).
    pub unschedulable: Option<bool>,
}

/// One change to a Node's applied configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeChange {
    Annotate {
        key: String,
        value: String,
    },
    Label(BTreeMap<String, String>),
    /// Cordon; with a drain start, also record it under `annotation`.
    Cordon {
        drain_started: Option<(String, String)>,
    },
}

/// Keys under `f:<section>` of our manager's Apply entries.
fn owned_keys(node: &Node, path: &[&str]) -> Vec<String> {
    let mut keys = Vec::new();
    for entry in node.managed_fields() {
        if entry.manager.as_deref() != Some(FIELD_MANAGER)
            || entry.operation.as_deref() != Some("Apply")
        {
            continue;
        }
        let Some(fields) = entry.fields_v1.as_ref().map(|f| &f.0) else {
            continue;
        };
        let mut at = Some(fields);
        for step in path {
            at = at.and_then(|v| v.get(*step));
        }
        if let Some(Value::Object(map)) = at {
            keys.extend(
                map.keys()
                    .filter_map(|k| k.strip_prefix("f:"))
                    .map(str::to_owned),
            );
        }
    }
    keys
}

/// The operator's current applied configuration of `node`: the labels,
/// annotations and cordon our manager owns, with their current values.
pub fn current_intent(node: &Node) -> NodeIntent {
    let pick = |path: &[&str], from: &BTreeMap<String, String>| {
        owned_keys(node, path)
            .into_iter()
            .filter_map(|k| from.get(&k).map(|v| (k, v.clone())))
            .collect()
    };
    let unschedulable_owned = owned_keys(node, &["f:spec"])
        .iter()
        .any(|k| k == "unschedulable");
    NodeIntent {
        labels: pick(&["f:metadata", "f:labels"], node.labels()),
        annotations: pick(&["f:metadata", "f:annotations"], node.annotations()),
        unschedulable: (unschedulable_owned
            && node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true))
        .then_some(true),
    }
}

/// `intent` with `change` made.
pub fn changed(mut intent: NodeIntent, change: &NodeChange) -> NodeIntent {
    match change {
        NodeChange::Annotate { key, value } => {
            intent.annotations.insert(key.clone(), value.clone());
        }
        NodeChange::Label(labels) => intent.labels.extend(labels.clone()),
        NodeChange::Cordon { drain_started } => {
            intent.unschedulable = Some(true);
            if let Some((key, value)) = drain_started {
                intent.annotations.insert(key.clone(), value.clone());
            }
        }
    }
    intent
}

/// The apply body of `intent` for the Node `name`.
pub fn apply_body(name: &str, intent: &NodeIntent) -> Value {
    let mut body = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
    });
    if !intent.labels.is_empty() {
        body["metadata"]["labels"] = json!(intent.labels);
    }
    if !intent.annotations.is_empty() {
        body["metadata"]["annotations"] = json!(intent.annotations);
    }
    if let Some(unschedulable) = intent.unschedulable {
        body["spec"] = json!({ "unschedulable": unschedulable });
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn node_owned_by_us(fields: Value) -> Node {
        let mut node = serde_json::from_value::<Node>(json!({
            "metadata": {
                "name": "old-0",
                "labels": { "team": "a", "kubernetes.io/hostname": "old-0" },
                "annotations": { "confidential.dev/donor-for": "new-0", "other": "x" },
            },
            "spec": { "unschedulable": true },
        }))
        .unwrap_or_else(|e| panic!("node fixture: {e}"));
        node.metadata.managed_fields = Some(vec![
            ManagedFieldsEntry {
                manager: Some(FIELD_MANAGER.into()),
                operation: Some("Apply".into()),
                fields_v1: Some(FieldsV1(fields)),
                ..ManagedFieldsEntry::default()
            },
            ManagedFieldsEntry {
                manager: Some("kubelet".into()),
                operation: Some("Update".into()),
                fields_v1: Some(FieldsV1(json!({
                    "f:metadata": { "f:labels": { "f:kubernetes.io/hostname": {} } }
                }))),
                ..ManagedFieldsEntry::default()
            },
        ]);
        node
    }

    #[test]
    fn the_current_intent_is_exactly_what_our_manager_owns() {
        let node = node_owned_by_us(json!({
            "f:metadata": {
                "f:labels": { "f:team": {} },
                "f:annotations": { "f:confidential.dev/donor-for": {} },
            },
            "f:spec": { "f:unschedulable": {} },
        }));
        let intent = current_intent(&node);
        assert_eq!(
            intent.labels,
            BTreeMap::from([("team".to_owned(), "a".to_owned())])
        );
        assert_eq!(
            intent.annotations,
            BTreeMap::from([("confidential.dev/donor-for".to_owned(), "new-0".to_owned())])
        );
        assert_eq!(intent.unschedulable, Some(true));
    }

    #[test]
    fn a_cordon_someone_else_set_is_not_claimed() {
        let node = node_owned_by_us(json!({ "f:metadata": { "f:labels": { "f:team": {} } } }));
        let intent = current_intent(&node);
        assert_eq!(intent.unschedulable, None);
        assert!(intent.annotations.is_empty());
    }

    #[test]
    fn a_change_keeps_everything_applied_before() {
        let node = node_owned_by_us(json!({
            "f:metadata": { "f:annotations": { "f:confidential.dev/donor-for": {} } },
        }));
        let intent = changed(
            current_intent(&node),
            &NodeChange::Cordon {
                drain_started: Some((
                    "confidential.dev/drain-started".into(),
                    "2026-01-01T00:00:00Z".into(),
                )),
            },
        );
        assert_eq!(
            apply_body("old-0", &intent),
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": { "name": "old-0", "annotations": {
                    "confidential.dev/donor-for": "new-0",
                    "confidential.dev/drain-started": "2026-01-01T00:00:00Z",
                } },
                "spec": { "unschedulable": true },
            })
        );
    }
}
