//! The kubelet CSR approver: approves a kubelet client certificate request
//! only for the node name attested for the machine that asks.
//!
//! A first certificate is requested with the bootstrap token the join
//! endpoint issued (`spec.username` = `system:bootstrap:<token-id>`); the
//! join endpoint records the attested node name on the token Secret
//! (`kube-system/bootstrap-token-<id>`, annotation
//! [`ANNOTATION_TOKEN_NODE_NAME`]). A renewal comes from the node itself
//! (`system:node:<name>`). Either way the requested subject must be
//! `CN=system:node:<name>, O=system:nodes` for that name, and the node must
//! hold a valid (trusted, unexpired) NodeAttestation. Other requests of the
//! kubelet signer are denied with the reason; requests of other signers or
//! from other users are left alone.

use std::sync::Arc;

use confidential_api::keys::ANNOTATION_TOKEN_NODE_NAME;
use confidential_api::{NodeAttestation, Verdict};
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
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

/// The requested subject of a PEM certificate request: (CN, organizations).
pub fn requested_subject(pem: &[u8]) -> Option<(String, Vec<String>)> {
    use x509_parser::prelude::FromDer;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let (_, request) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
            .ok()?;
    let subject = &request.certification_request_info.subject;
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let orgs = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some((cn, orgs))
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

/// Decides on a request. `attested` tells whether a node name holds a valid
/// NodeAttestation.
pub fn decide(
    signer: &str,
    requester: &Requester,
    subject: Option<(String, Vec<String>)>,
    attested: impl Fn(&str) -> bool,
) -> Decision {
    if signer != KUBELET_CLIENT_SIGNER || *requester == Requester::Other {
        return Decision::Ignore;
    }
    let Some((cn, orgs)) = subject else {
        return Decision::Deny("the certificate request cannot be parsed".into());
    };
    let Some(name) = cn.strip_prefix("system:node:") else {
        return Decision::Deny(format!("subject CN {cn:?} is not system:node:<name>"));
    };
    if orgs != ["system:nodes"] {
        return Decision::Deny(format!(
            "subject organizations {orgs:?} are not [system:nodes]"
        ));
    }
    match requester {
        Requester::Bootstrap {
            token_id,
            node_name,
        } => match node_name {
            None => Decision::Deny(format!(
                "bootstrap token {token_id} was not issued to an attested node"
            )),
            Some(attested_name) if attested_name != name => Decision::Deny(format!(
                "bootstrap token {token_id} was issued to {attested_name}, not {name}"
            )),
            Some(_) if !attested(name) => {
                Decision::Deny(format!("{name} has no valid attestation"))
            }
            Some(_) => Decision::Approve(format!(
                "{name} is attested and bootstrap token {token_id} was issued to it"
            )),
        },
        Requester::Node(node) if node != name => Decision::Deny(format!(
            "node {node} may not request a certificate for {name}"
        )),
        Requester::Node(_) if !attested(name) => {
            Decision::Deny(format!("{name} has no valid attestation"))
        }
        Requester::Node(_) => Decision::Approve(format!("renewal by attested node {name}")),
        Requester::Other => Decision::Ignore,
    }
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
    let subject = requested_subject(&csr.spec.request.0);
    let attestations: Api<NodeAttestation> = Api::all(client.clone());
    let now = jiff::Timestamp::now();
    let valid: Vec<String> = attestations
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|a| a.spec.verdict == Verdict::Trusted && a.spec.expires_at.0 > now)
        .map(|a| a.spec.node_name)
        .collect();
    let decision = decide(&csr.spec.signer_name, &who, subject, |n| {
        valid.iter().any(|v| v == n)
    });
    let (type_, message) = match decision {
        Decision::Ignore => return Ok(()),
        Decision::Approve(m) => ("Approved", m),
        Decision::Deny(m) => ("Denied", m),
    };
    metrics
        .csr_decisions
        .get_or_create(&Outcome {
            result: type_.to_lowercase(),
        })
        .inc();
    tracing::info!(csr = %csr.name_any(), decision = type_, %message, "kubelet CSR");
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
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(csr) = event else { continue };
        if let Err(err) = handle(&client, &metrics, &csr).await {
            tracing::warn!(csr = %csr.name_any(), %err, "kubelet CSR");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn parses_the_requested_subject() {
        let pem = csr_pem("system:node:n1", "system:nodes");
        assert_eq!(
            requested_subject(&pem),
            Some(("system:node:n1".into(), vec!["system:nodes".into()]))
        );
        assert_eq!(requested_subject(b"not a csr"), None);
    }

    #[test]
    fn approves_only_the_name_attested_for_the_token() {
        let subject =
            |n: &str| requested_subject(&csr_pem(&format!("system:node:{n}"), "system:nodes"));
        let attested = |n: &str| n == "n1";
        let decide = |who: &Requester, s| decide(KUBELET_CLIENT_SIGNER, who, s, attested);
        assert!(matches!(
            decide(&bootstrap(Some("n1")), subject("n1")),
            Decision::Approve(_)
        ));
        // A stolen token asking for another node's name.
        assert!(
            matches!(decide(&bootstrap(Some("n1")), subject("n2")), Decision::Deny(m) if m.contains("issued to n1"))
        );
        // A token the join endpoint did not issue.
        assert!(matches!(
            decide(&bootstrap(None), subject("n1")),
            Decision::Deny(_)
        ));
        // Attested name recorded, but the attestation is gone or expired.
        assert!(
            matches!(decide(&bootstrap(Some("n2")), subject("n2")), Decision::Deny(m) if m.contains("no valid attestation"))
        );
        // Wrong organization.
        let wrong_org = requested_subject(&csr_pem("system:node:n1", "system:masters"));
        assert!(matches!(
            decide(&bootstrap(Some("n1")), wrong_org),
            Decision::Deny(_)
        ));
        // Renewals: only for itself.
        assert!(matches!(
            decide(&Requester::Node("n1".into()), subject("n1")),
            Decision::Approve(_)
        ));
        assert!(matches!(
            decide(&Requester::Node("n1".into()), subject("n3")),
            Decision::Deny(_)
        ));
        // Not ours.
        assert_eq!(decide(&Requester::Other, subject("n1")), Decision::Ignore);
        assert_eq!(
            super::decide(
                "kubernetes.io/kubelet-serving",
                &bootstrap(Some("n1")),
                subject("n1"),
                attested
            ),
            Decision::Ignore
        );
    }
}
