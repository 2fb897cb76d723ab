//! Server-side apply of `init`'s objects with the field manager
//! `kubectl-confidential`, reporting per object what happened as kubectl
//! does (`created`, `configured`, `unchanged`). A second run with the same
//! inputs changes nothing: the API server skips a no-op apply, so the
//! resourceVersion stays and the object is reported `unchanged`.

use anyhow::{Context, Result, bail};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::Value;

/// The field manager of everything `init` applies.
pub const FIELD_MANAGER: &str = "kubectl-confidential";

/// What applying one object did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    /// Exists and is left as it is: `init` only creates it (the pool and
    /// the policy are changed with `upgrade` and `measurements add`).
    Kept,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
            Self::Kept => "unchanged (exists; init only creates it)",
        }
    }
}

/// How an object is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Server-side apply: the object is made to match.
    Apply,
    /// Created when absent, otherwise left alone.
    CreateOnly,
}

/// Resource of a kind `init` installs: (group, version, plural, namespaced).
fn resource(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "Secret" => ("secrets", true),
        "Service" => ("services", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "Deployment" => ("deployments", true),
        "PodDisruptionBudget" => ("poddisruptionbudgets", true),
        "ValidatingWebhookConfiguration" => ("validatingwebhookconfigurations", false),
        "MutatingWebhookConfiguration" => ("mutatingwebhookconfigurations", false),
        "AttestationPolicy" => ("attestationpolicies", false),
        "NodeVersion" => ("nodeversions", false),
        _ => return None,
    };
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group.to_owned(), version.to_owned()),
        None => (String::new(), api_version.to_owned()),
    };
    Some((
        ApiResource {
            group,
            version,
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
        },
        namespaced,
    ))
}

/// `kind.group/name` as kubectl prints it.
pub fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?").to_ascii_lowercase();
    let group = object["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .map(|(g, _)| format!(".{g}"))
        .unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    format!("{kind}{group}/{name}")
}

/// An API handle for `object`, and its name.
pub fn api_for(client: &Client, object: &Value) -> Result<(Api<DynamicObject>, String)> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let Some((resource, namespaced)) = resource(api_version, kind) else {
        bail!("init does not know how to apply a {api_version} {kind}");
    };
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without a name")?
        .to_owned();
    let api = if namespaced {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .with_context(|| format!("{kind} {name} has no namespace"))?;
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    Ok((api, name))
}

/// Applies one object and says what it did.
pub async fn apply(client: &Client, object: &Value, mode: Mode) -> Result<Outcome> {
    let (api, name) = api_for(client, object)?;
    let what = describe(object);
    let before = api
        .get_opt(&name)
        .await
        .with_context(|| format!("reading {what}"))?;
    let dynamic: DynamicObject =
        serde_json::from_value(object.clone()).with_context(|| format!("encoding {what}"))?;
    if mode == Mode::CreateOnly {
        if before.is_some() {
            return Ok(Outcome::Kept);
        }
        api.create(&PostParams::default(), &dynamic)
            .await
            .with_context(|| format!("creating {what}"))?;
        return Ok(Outcome::Created);
    }
    let after = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&dynamic),
        )
        .await
        .with_context(|| format!("applying {what}"))?;
    Ok(match before {
        None => Outcome::Created,
        Some(before) if before.metadata.resource_version == after.metadata.resource_version => {
            Outcome::Unchanged
        }
        Some(_) => Outcome::Configured,
    })
}

/// Reads the object `object` names from the cluster, as JSON (None when absent).
pub async fn read(client: &Client, object: &Value) -> Result<Option<Value>> {
    let (api, name) = api_for(client, object)?;
    let what = describe(object);
    match api
        .get_opt(&name)
        .await
        .with_context(|| format!("reading {what}"))?
    {
        Some(found) => Ok(Some(serde_json::to_value(found)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_of_the_manifests_is_known() {
        for object in super::super::objects::manifest_objects().expect("manifests") {
            let api_version = object["apiVersion"].as_str().expect("apiVersion");
            let kind = object["kind"].as_str().expect("kind");
            let (resource, namespaced) = resource(api_version, kind).expect(kind);
            assert_eq!(
                namespaced,
                object["metadata"]["namespace"].is_string(),
                "{kind} {}",
                object["metadata"]["name"]
            );
            assert_eq!(resource.kind, kind);
        }
        assert!(resource("v1", "Pod").is_none());
    }

    #[test]
    fn objects_are_described_as_kubectl_does() {
        assert_eq!(
            describe(&json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})),
            "secret/s"
        );
        assert_eq!(
            describe(
                &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
            ),
            "deployment.apps/d"
        );
    }
}
