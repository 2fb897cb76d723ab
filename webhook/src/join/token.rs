//! Bootstrap tokens for accepted joins: a single-use (the CSR approver
//! deletes it after approving the one kubelet client CSR it may obtain),
//! short-lived token bound to the node name, in our own bootstrap group.
//!
//! Usages are exactly what `kubeadm join` needs with our flow and nothing
//! more: `usage-bootstrap-authentication` (the kubelet's TLS bootstrap
//! authenticates with it) and `usage-bootstrap-signing` (kubeadm's
//! token-based discovery, `--discovery-token-ca-cert-hash`, trusts the
//! `cluster-info` ConfigMap only with a JWS the controller-manager's
//! bootstrap signer makes for tokens with this usage).

use std::collections::BTreeMap;
use std::time::Duration;

use confidential_api::keys::{ANNOTATION_TOKEN_NODE_NAME, BOOTSTRAP_TOKEN_GROUP};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use rand::Rng;

/// The usages a join token carries (each set to `"true"`).
pub const TOKEN_USAGES: [&str; 2] = ["usage-bootstrap-authentication", "usage-bootstrap-signing"];

/// A freshly generated token (`<id>.<secret>`, kubeadm's format).
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl BootstrapToken {
    pub fn generate() -> Self {
        Self {
            id: random_string(6),
            secret: random_string(16),
        }
    }

    /// `<id>.<secret>`, what `kubeadm join --token` takes.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// The Secret holding this token for `node_name`, expiring at `expiration`.
    pub fn secret_object(&self, node_name: &str, expiration: jiff::Timestamp) -> Secret {
        let mut data: BTreeMap<String, String> = [
            ("token-id", self.id.clone()),
            ("token-secret", self.secret.clone()),
            (
                "expiration",
                expiration.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ),
            ("auth-extra-groups", BOOTSTRAP_TOKEN_GROUP.to_owned()),
            (
                "description",
                format!("confidential join of node {node_name}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for usage in TOKEN_USAGES {
            data.insert(usage.to_owned(), "true".to_owned());
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(format!("bootstrap-token-{}", self.id)),
                namespace: Some("kube-system".into()),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_TOKEN_NODE_NAME.to_owned(),
                    node_name.to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("bootstrap.kubernetes.io/token".into()),
            string_data: Some(data),
            ..Default::default()
        }
    }
}

fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Creates a token for `node_name` valid for `ttl`.
pub async fn mint(client: &Client, node_name: &str, ttl: Duration) -> kube::Result<BootstrapToken> {
    let token = BootstrapToken::generate();
    let expiration = jiff::Timestamp::now()
        + jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::from_secs(900));
    Api::<Secret>::namespaced(client.clone(), "kube-system")
        .create(
            &PostParams::default(),
            &token.secret_object(node_name, expiration),
        )
        .await?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format_matches_kubeadm() {
        let token = BootstrapToken::generate();
        let exposed = token.expose();
        let (id, secret) = exposed.split_once('.').expect("id.secret");
        assert_eq!(id.len(), 6);
        assert_eq!(secret.len(), 16);
        assert!(
            exposed
                .chars()
                .all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert!(
            !format!("{token:?}").contains(secret),
            "Debug leaks the secret"
        );
        assert_ne!(BootstrapToken::generate(), token);
    }

    #[test]
    fn secret_carries_exactly_the_join_usages_and_our_group() {
        let token = BootstrapToken::generate();
        let secret = token.secret_object("node-1", jiff::Timestamp::UNIX_EPOCH);
        let data = secret.string_data.expect("data");
        let usages: Vec<&str> = data
            .keys()
            .filter(|k| k.starts_with("usage-"))
            .map(String::as_str)
            .collect();
        assert_eq!(usages, TOKEN_USAGES.to_vec());
        assert!(TOKEN_USAGES.iter().all(|u| data[*u] == "true"));
        assert_eq!(data["auth-extra-groups"], BOOTSTRAP_TOKEN_GROUP);
        assert_eq!(data["expiration"], "1970-01-01T00:00:00Z");
        assert_eq!(
            secret.metadata.annotations.expect("annotations")[ANNOTATION_TOKEN_NODE_NAME],
            "node-1"
        );
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some(format!("bootstrap-token-{}", token.id).as_str())
        );
    }
}
