//! The kubelet CSR approver: approves a kubelet client certificate request
//! only for the node name attested for the machine that asks.
//!
//! A first certificate is requested with the bootstrap token the join
//! endpoint issued (`spec.username` = `system:bootstrap:<token-id>`); the
//! join endpoint records the attested node name on the token Secret
//! (`kube-system/bootstrap-token-<id>`, annotation
//! [`ANNOTATION_TOKEN_NODE_NAME`]). A renewal comes from the node itself
//! (`system:node:<name>`). Either way the request, read as the API server and
//! the signer will read it ([`request`]), must ask for exactly
//! `CN=system:node:<name>, O=system:nodes` for that name, and the node must
//! hold a valid (trusted, unexpired) NodeAttestation. Other requests of the
//! kubelet signer are denied with the reason, as a Denied condition and a
//! Warning Event on the CSR; requests of other signers or from other users
//! are left alone.

pub mod request;

use std::sync::Arc;

use confidential_api::keys::ANNOTATION_TOKEN_NODE_NAME;
use confidential_api::{NodeAttestation, Verdict};
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::metrics::{Metrics, Outcome};

/// The signer of kubelet client certificates.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

/// What the approver does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Approve(String),
    Deny(String),
    /// Not ours to decide (other signer, other requester, already decided).
    Ignore,
}

/// Who asked, as far as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requester {
    /// A bootstrap token and the node name recorded on it (if any).
    Bootstrap {
        token_id: String,
        node_name: Option<String>,
    },
    /// A node renewing its certificate.
    Node(String),
    Other,
}

/// The parts of a CSR the decision reads.
#[derive(Clone, Copy, Debug)]
pub struct CsrSpec<'a> {
    pub signer_name: &'a str,
    pub usages: &'a [String],
    /// `spec.request`: the PEM the requester signed.
    pub request: &'a [u8],
}

/// Decides on a request. `attested` tells whether a node name holds a valid
/// NodeAttestation.
pub fn decide(
    spec: CsrSpec<'_>,
    requester: &Requester,
    attested: impl Fn(&str) -> bool,
) -> Decision {
    if spec.signer_name != KUBELET_CLIENT_SIGNER || *requester == Requester::Other {
        return Decision::Ignore;
    }
    let name = match request::kubelet_client_node_name(spec.request, spec.usages) {
        Ok(name) => name,
        Err(refusal) => return Decision::Deny(refusal.to_string()),
    };
    match requester {
        Requester::Bootstrap {
            token_id,
            node_name,
        } => match node_name {
            None => Decision::Deny(format!(
                "bootstrap token {token_id} was not issued to an attested node"
            )),
            Some(attested_name) if *attested_name != name => Decision::Deny(format!(
                "bootstrap token {token_id} was issued to {attested_name}, not {name}"
            )),
            Some(_) if !attested(&name) => {
                Decision::Deny(format!("{name} has no valid attestation"))
            }
            Some(_) => Decision::Approve(format!(
                "{name} is attested and bootstrap token {token_id} was issued to it"
            )),
        },
        Requester::Node(node) if *node != name => Decision::Deny(format!(
            "node {node} may not request a certificate for {name}"
        )),
        Requester::Node(_) if !attested(&name) => {
            Decision::Deny(format!("{name} has no valid attestation"))
        }
        Requester::Node(_) => Decision::Approve(format!("renewal by attested node {name}")),
        Requester::Other => Decision::Ignore,
    }
}

/// Bounds a message for a condition and an Event note (at most 1 kB): parts
/// of it come from the requester.
fn bounded(mut message: String) -> String {
    const MAX: usize = 1000;
    if message.len() > MAX {
        let mut cut = MAX - 3;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

async fn requester(client: &Client, username: &str) -> Result<Requester, kube::Error> {
    if let Some(token_id) = username.strip_prefix("system:bootstrap:") {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
        let secret = secrets
            .get_opt(&format!("bootstrap-token-{token_id}"))
            .await?;
        return Ok(Requester::Bootstrap {
            token_id: token_id.to_owned(),
            node_name: secret
                .and_then(|s| s.annotations().get(ANNOTATION_TOKEN_NODE_NAME).cloned()),
        });
    }
    Ok(username
        .strip_prefix("system:node:")
        .map_or(Requester::Other, |n| Requester::Node(n.to_owned())))
}

async fn handle(
    client: &Client,
    recorder: &Recorder,
    metrics: &Metrics,
    csr: &CertificateSigningRequest,
) -> Result<(), kube::Error> {
    let decided = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Approved" || c.type_ == "Denied")
        });
    if decided || csr.spec.signer_name != KUBELET_CLIENT_SIGNER {
        return Ok(());
    }
    let who = requester(client, csr.spec.username.as_deref().unwrap_or_default()).await?;
    if who == Requester::Other {
        return Ok(());
    }
    let attestations: Api<NodeAttestation> = Api::all(client.clone());
    let now = jiff::Timestamp::now();
    let valid: Vec<String> = attestations
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|a| a.spec.verdict == Verdict::Trusted && a.spec.expires_at.0 > now)
        .map(|a| a.spec.node_name)
        .collect();
    let spec = CsrSpec {
        signer_name: &csr.spec.signer_name,
        usages: csr.spec.usages.as_deref().unwrap_or_default(),
        request: &csr.spec.request.0,
    };
    let decision = decide(spec, &who, |n| valid.iter().any(|v| v == n));
    let (type_, message) = match decision {
        Decision::Ignore => return Ok(()),
        Decision::Approve(m) => ("Approved", bounded(m)),
        Decision::Deny(m) => ("Denied", bounded(m)),
    };
    let username = csr.spec.username.as_deref().unwrap_or_default();
    let patch = json!({ "status": { "conditions": [{
        "type": type_, "status": "True", "reason": "ConfidentialAttestation",
        "message": message, "lastUpdateTime": now.to_string() }] } });
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    api.patch_approval(
        &csr.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    // Counted and logged once it is written: a refused write (RBAC, a
    // conflict) is an error of its own, not a decision taken.
    metrics
        .csr_decisions
        .get_or_create(&Outcome {
            result: type_.to_lowercase(),
        })
        .inc();
    tracing::info!(csr = %csr.name_any(), %username, decision = type_, %message, "kubelet CSR");
    let event = Event {
        type_: if type_ == "Approved" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: format!("KubeletCSR{type_}"),
        note: Some(bounded(format!("requested by {username}: {message}"))),
        action: "ReviewKubeletCSR".into(),
        secondary: None,
    };
    // The decision stands without its Event; a failed Event is only logged.
    if let Err(err) = recorder.publish(&event, &csr.object_ref(&())).await {
        tracing::warn!(csr = %csr.name_any(), %err, "publishing the CSR decision Event");
    }
    // A join token buys exactly one kubelet certificate: once it did, delete
    // it so it cannot authenticate again (the gate only sets an expiry).
    if let (Requester::Bootstrap { token_id, .. }, "Approved") = (&who, type_) {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
        match secrets
            .delete(&format!("bootstrap-token-{token_id}"), &Default::default())
            .await
        {
            Ok(_) => tracing::info!(%token_id, "bootstrap token used up and deleted"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Watches CSRs and decides on kubelet client requests until the stream ends.
pub async fn run(client: Client, metrics: Arc<Metrics>) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "confidential-controllers".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let csr = match event {
            Ok(csr) => csr,
            Err(err) => {
                // The watcher retries with backoff; say why it has to.
                tracing::warn!(%err, "watching kubelet CSRs");
                continue;
            }
        };
        if let Err(err) = handle(&client, &recorder, &metrics, &csr).await {
            tracing::warn!(csr = %csr.name_any(), %err, "kubelet CSR");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_testenv::csr::{NameAttribute, RawRequest};

    const USAGES: [&str; 2] = ["digital signature", "client auth"];

    fn csr_pem(cn: &str, org: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, org);
        let csr = params.serialize_request(&key).expect("csr");
        csr.pem().expect("pem").into_bytes()
    }

    fn bootstrap(name: Option<&str>) -> Requester {
        Requester::Bootstrap {
            token_id: "abcdef".into(),
            node_name: name.map(str::to_owned),
        }
    }

    fn decide_on(signer: &str, who: &Requester, request: &[u8]) -> Decision {
        let usages: Vec<String> = USAGES.iter().map(|u| (*u).to_owned()).collect();
        let spec = CsrSpec {
            signer_name: signer,
            usages: &usages,
            request,
        };
        decide(spec, who, |n| n == "n1" || n == "victim")
    }

    fn node_request(n: &str) -> Vec<u8> {
        csr_pem(&format!("system:node:{n}"), "system:nodes")
    }

    #[test]
    fn approves_only_the_name_attested_for_the_token() {
        let decide =
            |who: &Requester, request: &[u8]| decide_on(KUBELET_CLIENT_SIGNER, who, request);
        assert!(matches!(
            decide(&bootstrap(Some("n1")), &node_request("n1")),
            Decision::Approve(_)
        ));
        // A stolen token asking for another node's name.
        assert!(
            matches!(decide(&bootstrap(Some("n1")), &node_request("n2")), Decision::Deny(m) if m.contains("issued to n1"))
        );
        // A token the join endpoint did not issue.
        assert!(matches!(
            decide(&bootstrap(None), &node_request("n1")),
            Decision::Deny(_)
        ));
        // Attested name recorded, but the attestation is gone or expired.
        assert!(
            matches!(decide(&bootstrap(Some("n2")), &node_request("n2")), Decision::Deny(m) if m.contains("no valid attestation"))
        );
        // Wrong organization.
        assert!(matches!(
            decide(&bootstrap(Some("n1")), &csr_pem("system:node:n1", "system:masters")),
            Decision::Deny(m) if m.contains("organizations")
        ));
        // Renewals: only for itself, only while attested.
        assert!(matches!(
            decide(&Requester::Node("n1".into()), &node_request("n1")),
            Decision::Approve(_)
        ));
        assert!(matches!(
            decide(&Requester::Node("n1".into()), &node_request("n3")),
            Decision::Deny(m) if m.contains("may not request a certificate for n3")
        ));
        assert!(matches!(
            decide(&Requester::Node("n3".into()), &node_request("n3")),
            Decision::Deny(m) if m.contains("no valid attestation")
        ));
        // Not ours.
        assert_eq!(
            decide(&Requester::Other, &node_request("n1")),
            Decision::Ignore
        );
        assert_eq!(
            decide_on(
                "kubernetes.io/kubelet-serving",
                &bootstrap(Some("n1")),
                &node_request("n1")
            ),
            Decision::Ignore
        );
    }

    #[test]
    fn a_second_common_name_is_denied_for_tokens_and_renewals() {
        let key = rcgen::KeyPair::generate().expect("key");
        let two_names = RawRequest::subject(vec![
            NameAttribute::common_name("system:node:n1"),
            NameAttribute::organization("system:nodes"),
            NameAttribute::common_name("system:node:victim"),
        ])
        .pem(&key)
        .expect("request");
        for who in [bootstrap(Some("n1")), Requester::Node("n1".into())] {
            let decision = decide_on(KUBELET_CLIENT_SIGNER, &who, two_names.as_bytes());
            assert!(
                matches!(&decision, Decision::Deny(m) if m.contains("2 common names")),
                "{who:?}: {decision:?}"
            );
        }
    }

    #[test]
    fn messages_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short".into()), "short");
        let long = bounded("é".repeat(800));
        assert!(
            long.len() <= 1000 && long.ends_with("..."),
            "{}",
            long.len()
        );
    }
}
