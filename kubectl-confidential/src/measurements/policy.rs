//! `measurements add`: put a publisher-signed measurement file into an
//! AttestationPolicy. The signature is verified here first (a file that does
//! not verify changes nothing); the change is planned by a pure function,
//! shown as a diff, and applied only with `--yes`, guarded by the policy's
//! resourceVersion so a concurrent edit is not overwritten.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, MeasuredImage, Measurement, PublisherKey,
};
use confidential_attestation::measurements::{MeasurementFile, parse_public_key};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::connection::ConnectionArgs;
use crate::output::line_diff;
use crate::verify::trust::read_signed_file;

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The AttestationPolicy to change.
    #[arg(long)]
    policy: String,
    /// The measurement file (canonical; as `fetch` saves it).
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// Signature: base64 or @FILE (default: FILE.sig).
    #[arg(long)]
    signature: Option<String>,
    /// The publisher's public key (PEM).
    #[arg(long, value_name = "FILE")]
    publisher_key: PathBuf,
    /// Name under which to add the publisher key when the policy does not
    /// trust it yet.
    #[arg(long)]
    publisher: Option<String>,
    /// Apply the change (without it, only the diff is printed).
    #[arg(long)]
    yes: bool,
}

/// What `add` changes: the policy's new images and publishers.
#[derive(Debug, PartialEq)]
pub struct AddPlan {
    pub images: Vec<MeasuredImage>,
    pub publishers: Vec<PublisherKey>,
}

/// Plans adding a verified `file` to `spec`. The publisher is the policy's
/// entry with the same key; without one, `new_publisher` names a new entry.
/// An entry for the same image from the same publisher is replaced.
pub fn plan_add(
    spec: &AttestationPolicySpec,
    file: &MeasurementFile,
    signature: &str,
    key_pem: &str,
    new_publisher: Option<&str>,
) -> Result<AddPlan> {
    let key = parse_public_key(key_pem)?;
    let mut publishers = spec.publishers.clone();
    let known = publishers
        .iter()
        .find(|p| parse_public_key(&p.public_key).is_ok_and(|k| k == key))
        .map(|p| p.name.clone());
    let publisher = match (known, new_publisher) {
        (Some(name), _) => name,
        (None, Some(name)) => {
            if publishers.iter().any(|p| p.name == name) {
                bail!(
                    "the policy already has a publisher named {name:?} with another key; choose another --publisher"
                );
            }
            publishers.push(PublisherKey {
                name: name.to_owned(),
                public_key: key_pem.trim().to_owned() + "\n",
            });
            name.to_owned()
        }
        (None, None) => bail!(
            "the policy does not trust this publisher key; pass --publisher NAME to add it (the diff shows it)"
        ),
    };
    let entry = MeasuredImage {
        image: file.image.clone(),
        // The SNP launch values are signed with the PCRs, so they travel
        // into the policy with them.
        snp: file
            .measurements
            .snp()
            .map(|snp| confidential_api::SnpLaunch {
                measurement: hex::encode(snp.measurement),
                vmpl: snp.vmpl,
                allow_smt: snp.allow_smt,
                allow_migration_agent: snp.allow_migration_agent,
            }),
        measurements: file
            .measurements
            .iter()
            .map(|(pcr, e)| {
                (
                    pcr.to_string(),
                    Measurement {
                        expected: hex::encode(e.expected),
                        warn_only: e.warn_only,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        publisher: publisher.clone(),
        signature: signature.trim().to_owned(),
    };
    let mut images: Vec<MeasuredImage> = spec
        .images
        .iter()
        .filter(|i| !(i.image == entry.image && i.publisher == publisher))
        .cloned()
        .collect();
    images.push(entry);
    Ok(AddPlan { images, publishers })
}

fn yaml_of(images: &[MeasuredImage], publishers: &[PublisherKey]) -> Result<String> {
    Ok(serde_saphyr::to_string(&json!({
        "publishers": publishers,
        "images": images,
    }))?)
}

pub async fn run(connection: &ConnectionArgs, args: &AddArgs) -> Result<()> {
    let key_pem = std::fs::read_to_string(&args.publisher_key)
        .with_context(|| format!("reading the publisher key {}", args.publisher_key.display()))?;
    let trusted = read_signed_file(
        &args.file,
        args.signature.as_deref(),
        &key_pem,
        &args.publisher_key,
    )
    .context("refusing to add it; the policy was not changed")?;
    let signature = match &args.signature {
        Some(s) => crate::verify::trust::read_signature(s)?,
        None => crate::verify::trust::read_signature(&format!("@{}.sig", args.file.display()))?,
    };
    let cluster = connection.client().await?;
    let policies: Api<AttestationPolicy> = Api::all(cluster.client.clone());
    let policy = policies
        .get_opt(&args.policy)
        .await
        .map_err(|e| cluster.explain(&format!("reading AttestationPolicy {}", args.policy), e))?
        .with_context(|| {
            format!(
                "AttestationPolicy {:?} not found; list them with `kubectl get attestationpolicies`",
                args.policy
            )
        })?;
    let plan = plan_add(
        &policy.spec,
        &trusted.file,
        &signature,
        &key_pem,
        args.publisher.as_deref(),
    )?;
    let before = yaml_of(&policy.spec.images, &policy.spec.publishers)?;
    let after = yaml_of(&plan.images, &plan.publishers)?;
    if before == after {
        println!(
            "AttestationPolicy {} already holds this file; nothing to change",
            args.policy
        );
        return Ok(());
    }
    println!("AttestationPolicy {} spec:", args.policy);
    print!("{}", line_diff(&before, &after));
    if !args.yes {
        println!("not applied; run again with --yes to apply");
        return Ok(());
    }
    let patch = json!({
        "metadata": { "resourceVersion": policy.metadata.resource_version },
        "spec": { "images": plan.images, "publishers": plan.publishers },
    });
    policies
        .patch(&args.policy, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| cluster.explain(&format!("updating AttestationPolicy {}", args.policy), e))?;
    println!(
        "AttestationPolicy {} now trusts image {}",
        args.policy, trusted.file.image
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use confidential_attestation::measurements::{Expected, Measurements};
    use p256::pkcs8::EncodePublicKey;

    fn key(seed: u8) -> (p256::ecdsa::SigningKey, String) {
        let key = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("scalar");
        let pem = key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("pem");
        (key, pem)
    }

    fn file(image: &str) -> MeasurementFile {
        MeasurementFile {
            image: image.into(),
            measurements: Measurements::new(BTreeMap::from([(
                4,
                Expected {
                    expected: [4; 32],
                    warn_only: false,
                },
            )]))
            .expect("valid"),
        }
    }

    #[test]
    fn adds_with_a_known_publisher_and_replaces_its_entry() {
        let (signing, pem) = key(3);
        let spec = AttestationPolicySpec {
            publishers: vec![PublisherKey {
                name: "acme".into(),
                public_key: pem.clone(),
            }],
            ..Default::default()
        };
        let f = file("node:v1");
        let plan = plan_add(&spec, &f, &f.sign(&signing), &pem, None).expect("plan");
        assert_eq!(plan.images.len(), 1);
        assert_eq!(plan.images[0].publisher, "acme");
        assert_eq!(
            plan.images[0].measurements["4"].expected,
            hex::encode([4; 32])
        );
        assert_eq!(plan.publishers, spec.publishers);
        let again = AttestationPolicySpec {
            images: plan.images.clone(),
            ..spec
        };
        let replan = plan_add(&again, &f, &f.sign(&signing), &pem, None).expect("plan");
        assert_eq!(replan.images.len(), 1, "same image and publisher: replaced");
    }

    #[test]
    fn unknown_publishers_need_a_free_name() {
        let (_, known) = key(3);
        let (signing, pem) = key(5);
        let spec = AttestationPolicySpec {
            publishers: vec![PublisherKey {
                name: "acme".into(),
                public_key: known,
            }],
            ..Default::default()
        };
        let f = file("node:v1");
        let sig = f.sign(&signing);
        assert!(plan_add(&spec, &f, &sig, &pem, None).is_err());
        assert!(plan_add(&spec, &f, &sig, &pem, Some("acme")).is_err());
        let plan = plan_add(&spec, &f, &sig, &pem, Some("other")).expect("plan");
        assert_eq!(plan.publishers.len(), 2);
        assert_eq!(plan.images[0].publisher, "other");
        assert!(plan_add(&spec, &f, &sig, "not a key", Some("x")).is_err());
    }
}
