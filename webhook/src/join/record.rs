//! What an admitted node gets recorded and handed: the NodeAttestation built
//! from the plan and the *bound* verdict (a [`BoundVerdict`] is the only way
//! in, so no unactivated TPM key is ever recorded), its conditional write,
//! and the state-disk key.
//!
//! The disk key is derived from the master secret for the attesting key's
//! identity *and* the disk UUID recorded at first join: a machine that names
//! another machine's disk UUID derives a different key, and the decision
//! refuses a rejoin that names another disk than the recorded one.

use std::collections::BTreeMap;

use confidential_api::{NodeAttestation, NodeAttestationSpec, Verdict as ApiVerdict};
use confidential_attestation::kdf::MasterSecret;
use confidential_attestation::verify::BoundVerdict;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, PostParams};

use super::decide::{JoinPlan, Reason, Record, Refusal, api_kind};

/// The key of state disk `disk_uuid` of the machine attesting as `identity`
/// (HKDF-SHA256 of the master secret, info `key-disk-<identity>/<uuid>`):
/// [`MasterSecret::node_disk_key`], the one derivation `kubectl confidential
/// recover` also uses.
pub fn disk_key(master: &MasterSecret, identity: &str, disk_uuid: &str) -> [u8; 32] {
    master.node_disk_key(identity, disk_uuid)
}

/// The NodeAttestation an admitted node gets, attested at `now`.
pub fn attestation_object(
    plan: &JoinPlan,
    bound: &BoundVerdict,
    now: jiff::Timestamp,
) -> NodeAttestation {
    let verdict = bound.verdict();
    let valid_for = jiff::SignedDuration::try_from(plan.valid_for)
        .unwrap_or(jiff::SignedDuration::from_hours(24));
    let expires = now.checked_add(valid_for).unwrap_or(now);
    let mut object = NodeAttestation::new(
        &plan.node_name,
        NodeAttestationSpec {
            node_name: plan.node_name.clone(),
            evidence_kind: api_kind(verdict.kind),
            image: plan.image.clone(),
            pool: Some(plan.pool.clone()),
            measurements: verdict
                .measured
                .iter()
                .map(|(k, v)| (k.to_string(), hex::encode(v)))
                .collect::<BTreeMap<_, _>>(),
            ak_fingerprint: verdict.identity.clone(),
            disk_uuid: Some(plan.disk_uuid.clone()),
            attestation_endpoint: plan.attestation_endpoint.clone(),
            attested_at: Time(now),
            expires_at: Time(expires),
            verdict: ApiVerdict::Trusted,
            warnings: verdict.warnings.clone(),
        },
    );
    if let Record::Replace { resource_version } = &plan.record {
        object.metadata.resource_version = Some(resource_version.clone());
    }
    object
}

/// Why a write was refused, from the API server's answer.
pub fn write_refusal(plan: &JoinPlan, error: kube::Error) -> Refusal {
    let (created_meanwhile, changed_meanwhile) = match &error {
        kube::Error::Api(status) => (
            status.is_already_exists(),
            status.is_conflict() || status.is_not_found(),
        ),
        _ => (false, false),
    };
    match (&plan.record, created_meanwhile, changed_meanwhile) {
        (Record::Create, true, _) => Refusal::new(
            Reason::NameTaken,
            format!(
                "node name {} was taken by another machine while this join was verified",
                plan.node_name
            ),
        ),
        (Record::Replace { .. }, _, true) => Refusal::new(
            Reason::AttestationChanged,
            format!(
                "the NodeAttestation of {} changed or was deleted while this join was verified; retry",
                plan.node_name
            ),
        ),
        _ => Refusal::new(
            Reason::Internal,
            format!("writing NodeAttestation {}: {error}", plan.node_name),
        ),
    }
}

/// Writes `object` as the plan says: create, or replace exactly the version
/// the decision read. The API server serializes concurrent joins here.
pub async fn write(
    client: &Client,
    plan: &JoinPlan,
    object: &NodeAttestation,
) -> Result<(), Refusal> {
    let api = Api::<NodeAttestation>::all(client.clone());
    let written = match plan.record {
        Record::Create => api.create(&PostParams::default(), object).await,
        Record::Replace { .. } => {
            api.replace(&plan.node_name, &PostParams::default(), object)
                .await
        }
    };
    written.map(drop).map_err(|e| write_refusal(plan, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterSecret {
        MasterSecret::new(vec![7; 32], b"salt".to_vec()).expect("master")
    }

    #[test]
    fn disk_key_is_the_hkdf_derivation_for_identity_and_disk() {
        let m = master();
        let key = disk_key(&m, "ab12", "5E1F0000-0000-4000-8000-000000000001");
        // HKDF-SHA256(salt "salt", ikm 32x0x07,
        // info "key-disk-ab12/5e1f0000-0000-4000-8000-000000000001"),
        // computed independently of this crate (Python's hmac/hashlib, RFC
        // 5869 by hand): the key a node gets is exactly the documented
        // derivation, the UUID lower-cased, bound to the identity.
        assert_eq!(
            hex::encode(key),
            "b6980d4305940908a0f0c5c37c5a8488fbd20c404330ebfbc7c4e47580be0be4"
        );
        assert_ne!(
            key,
            disk_key(&m, "cd34", "5e1f0000-0000-4000-8000-000000000001"),
            "another machine naming the same disk gets another key"
        );
        assert_ne!(
            key,
            disk_key(&m, "ab12", "5e1f0000-0000-4000-8000-000000000002")
        );
    }

    fn plan(record: Record) -> JoinPlan {
        JoinPlan {
            mode: super::super::decide::Mode::Join,
            node_name: "node-1".into(),
            image: "img".into(),
            pool: "workers".into(),
            valid_for: std::time::Duration::from_secs(60),
            disk_uuid: "d".into(),
            attestation_endpoint: None,
            record,
        }
    }

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("secret internals", reason)
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn lost_races_are_refusals_and_other_failures_internal() {
        let create = plan(Record::Create);
        let replace = plan(Record::Replace {
            resource_version: "1".into(),
        });
        assert_eq!(
            write_refusal(&create, api_error(409, "AlreadyExists")).reason,
            Reason::NameTaken
        );
        assert_eq!(
            write_refusal(&replace, api_error(409, "Conflict")).reason,
            Reason::AttestationChanged
        );
        assert_eq!(
            write_refusal(&replace, api_error(404, "NotFound")).reason,
            Reason::AttestationChanged
        );
        assert_eq!(
            write_refusal(&create, api_error(403, "Forbidden")).reason,
            Reason::Internal
        );
    }
}
