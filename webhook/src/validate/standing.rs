//! Whether a node's attestation holds right now: the one check that both
//! the Node rule and the node Lease rule apply to a node's own writes, so a
//! node whose attestation lapsed, failed or no longer matches the policy in
//! force loses both its status updates and its Lease renewals at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use confidential_api::{AttestationPolicy, NodeAttestation, Verdict};
use confidential_attestation::measurements::{parse_pcr_index, parse_pcr_value};

use super::Decision;
use crate::verify::{ImageTrust, TrustCache};

/// The latest attestation (by `attestedAt`) recorded for `node_name`.
pub fn latest_attestation<'a>(
    node_name: &str,
    attestations: &'a [Arc<NodeAttestation>],
) -> Option<&'a NodeAttestation> {
    attestations
        .iter()
        .filter(|a| a.spec.node_name == node_name)
        .max_by_key(|a| a.spec.attested_at.0)
        .map(AsRef::as_ref)
}

/// What the cluster knows about a node's attestation right now.
pub struct Attestations<'a> {
    pub attestations: &'a [Arc<NodeAttestation>],
    pub policies: &'a [Arc<AttestationPolicy>],
    pub trust: &'a TrustCache,
    pub now: jiff::Timestamp,
}

/// A node whose attestation holds: the attestation and the `warnOnly`
/// measurement warnings.
pub struct Standing<'a> {
    pub attestation: &'a NodeAttestation,
    pub warnings: Vec<String>,
}

impl<'a> Attestations<'a> {
    /// Whether `name` holds a valid attestation now: present, `Trusted`,
    /// unexpired, its image signed into a policy, its PCRs matching it. The
    /// refusal says what is wrong and what happens to the node.
    pub fn standing(&self, name: &str) -> Result<Standing<'a>, Decision> {
        let Some(att) = latest_attestation(name, self.attestations) else {
            return Err(Decision::deny(
                "unattested",
                format!(
                    "node {name} has no NodeAttestation: the machine has not proved by remote attestation that it booted a measured image"
                ),
            ));
        };
        if att.spec.verdict != Verdict::Trusted {
            return Err(Decision::deny(
                "untrusted",
                format!(
                    "node {name}: its attestation verdict is {:?}; the node must re-attest",
                    att.spec.verdict
                ),
            ));
        }
        if att.spec.expires_at.0 <= self.now {
            return Err(Decision::deny(
                "expired",
                format!(
                    "node {name}: its attestation expired at {}; the node must re-attest",
                    att.spec.expires_at.0
                ),
            ));
        }
        let image = att.spec.image.as_str();
        let expected = match self.trust.image_trust(image, self.policies) {
            ImageTrust::Trusted { measurements, .. } => measurements,
            ImageTrust::NotListed => {
                return Err(Decision::deny(
                    "image_not_trusted",
                    format!(
                        "node {name}: its image {image} has no measurements in any AttestationPolicy"
                    ),
                ));
            }
            ImageTrust::Untrusted(reasons) => {
                return Err(Decision::deny(
                    "image_not_trusted",
                    format!(
                        "node {name}: the measurements of its image {image} are not signed by a trusted publisher: {}",
                        reasons.join("; ")
                    ),
                ));
            }
        };
        let mut measured = BTreeMap::new();
        for (index, value) in &att.spec.measurements {
            let parsed =
                parse_pcr_index(index).and_then(|pcr| Ok((pcr, parse_pcr_value(pcr, value)?)));
            match parsed {
                Ok((pcr, value)) => {
                    measured.insert(pcr, value);
                }
                Err(e) => {
                    return Err(Decision::deny(
                        "measurement_mismatch",
                        format!("node {name}: its attestation records an invalid measurement: {e}"),
                    ));
                }
            }
        }
        match expected.compare(&measured) {
            Ok(warnings) => Ok(Standing {
                attestation: att,
                warnings: warnings
                    .into_iter()
                    .map(|w| format!("node {name}: {w}"))
                    .collect(),
            }),
            Err(e) => Err(Decision::deny(
                "measurement_mismatch",
                format!(
                    "node {name}: attested measurements do not match the policy for {image}: {e}"
                ),
            )),
        }
    }
}
