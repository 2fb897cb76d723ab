//! Node Leases: a node's own credentials may renew its Lease only while its
//! attestation holds.
//!
//! The kubelet proves it is alive by renewing `kube-node-lease/<node>` every
//! few seconds, and the node-lifecycle controller keeps a node Ready as long
//! as that Lease (or the Node's status) is fresh. Refusing only the Node's
//! status would leave a revoked node Ready through its Lease; refusing its
//! Lease renewals too lets kube-controller-manager mark it NotReady (Ready
//! `Unknown`) after `--node-monitor-grace-period`, and then taint it
//! unreachable. Only node credentials are held to this: the rule is about
//! what a revoked machine may still claim, not about who else may edit
//! Leases (the webhook registration only sends node users' Lease writes).

use super::Decision;
use super::node::{Actor, Attestations};

/// The namespace of node heartbeat Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Decides a CREATE or UPDATE of the Lease `name` in `namespace` sent by
/// `actor`.
pub fn validate(
    namespace: &str,
    name: Option<&str>,
    actor: &Actor,
    state: &Attestations<'_>,
) -> Decision {
    if namespace != NODE_LEASE_NAMESPACE || *actor == Actor::Other {
        return Decision::allow("not_applicable");
    }
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Decision::deny("invalid", "node Lease without metadata.name");
    };
    if let Some(refusal) = actor.refuse_foreign("Lease", name) {
        return refusal;
    }
    match state.standing(name) {
        // Warnings are left to Node writes: a Lease is renewed every few
        // seconds and nobody reads its warnings.
        Ok(_) => Decision::allow("attested"),
        Err(mut refusal) => {
            refusal.message.push_str(
                "; until it does, its Lease is not renewed and the control plane marks the node NotReady",
            );
            refusal
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::validate::fixtures::*;
    use crate::verify::TrustCache;
    use confidential_api::{NodeAttestation, Verdict};

    fn decide(
        namespace: &str,
        name: &str,
        actor: &Actor,
        atts: &[Arc<NodeAttestation>],
    ) -> Decision {
        let policies = vec![policy(vec![signed_entry(IMAGE, &signing_key(1))])];
        let trust = TrustCache::default();
        let state = Attestations {
            attestations: atts,
            policies: &policies,
            trust: &trust,
            now: now(),
        };
        validate(namespace, Some(name), actor, &state)
    }

    fn untrusted() -> Arc<NodeAttestation> {
        let mut att = (*attestation("n1", 3600)).clone();
        att.spec.verdict = Verdict::Revoked;
        Arc::new(att)
    }

    #[test]
    fn the_kubelet_renews_its_lease_only_while_attested() {
        let own = Actor::Node("n1".into());
        let d = decide(NODE_LEASE_NAMESPACE, "n1", &own, &[attestation("n1", 60)]);
        assert!(d.allowed, "{}", d.message);
        for (atts, reason) in [
            (vec![attestation("n1", -1)], "expired"),
            (vec![untrusted()], "untrusted"),
            (vec![attestation("n2", 60)], "unattested"),
        ] {
            let d = decide(NODE_LEASE_NAMESPACE, "n1", &own, &atts);
            assert!(!d.allowed);
            assert_eq!(d.reason, reason);
            assert!(d.message.contains("NotReady"), "{}", d.message);
        }
        // A policy that no longer trusts the image stops renewals too.
        let policies = vec![policy(vec![signed_entry(IMAGE, &signing_key(2))])];
        let trust = TrustCache::default();
        let state = Attestations {
            attestations: &[attestation("n1", 60)],
            policies: &policies,
            trust: &trust,
            now: now(),
        };
        let d = validate(NODE_LEASE_NAMESPACE, Some("n1"), &own, &state);
        assert_eq!(d.reason, "image_not_trusted");
    }

    #[test]
    fn a_node_may_not_renew_another_nodes_lease() {
        let atts = [attestation("n1", 60), attestation("n2", 60)];
        let d = decide(NODE_LEASE_NAMESPACE, "n1", &Actor::Node("n2".into()), &atts);
        assert_eq!(d.reason, "other_node");
        assert!(
            d.message
                .contains("node n2 may not change the Lease of node n1")
        );
        let d = decide(NODE_LEASE_NAMESPACE, "n1", &Actor::NamelessNode, &atts);
        assert_eq!(d.reason, "other_node");
    }

    #[test]
    fn others_and_other_namespaces_are_not_concerned() {
        let atts = [attestation("n1", -1)];
        assert!(decide(NODE_LEASE_NAMESPACE, "n1", &Actor::Other, &atts).allowed);
        // Leader-election Leases elsewhere, even by a node user.
        assert!(decide("kube-system", "n1", &Actor::Node("n1".into()), &atts).allowed);
        let policies = Vec::new();
        let trust = TrustCache::default();
        let state = Attestations {
            attestations: &atts,
            policies: &policies,
            trust: &trust,
            now: now(),
        };
        let d = validate(
            NODE_LEASE_NAMESPACE,
            None,
            &Actor::Node("n1".into()),
            &state,
        );
        assert_eq!(d.reason, "invalid");
    }
}
