//! `kubectl confidential init` on real components: a real control plane, the
//! real plugin binary, and the real gate (`confidential-webhook`) started by
//! the playground's host from the Secrets `init` created — the way a
//! kubelet would start it from the Deployment. Every behaviour is checked on
//! what the API server holds afterwards, and every refusal one by one with
//! "nothing changed" checked.

mod init_support;

use std::path::Path;

use anyhow::{Context, Result};
use confidential_api::{AttestationPolicy, NodeVersion};
use init_support::*;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn init_installs_everything_a_second_run_changes_nothing_and_rotation_reissues() -> Result<()>
{
    let playground = playground().await?;
    let client = playground.client.clone();
    // kubeadm's auto-approval, which undoes the gate: init must warn.
    confidential_testenv::apply_cluster_object(
        &client,
        &serde_json::from_value::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(json!({
            "metadata": {"name": "kubeadm:node-autoapprove-bootstrap"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                "name": "system:certificates.k8s.io:certificatesigningrequests:nodeclient"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                "name": "system:bootstrappers:kubeadm:default-node-token"}],
        }))?,
    )
    .await?;

    let out = run(&playground, &init_args(&playground, &[]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Warning: ClusterRoleBinding kubeadm:node-autoapprove-bootstrap"),
        "{stderr}"
    );
    assert!(
        stdout.contains("customresourcedefinition.apiextensions.k8s.io/attestationpolicies.confidential.dev created"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "validatingwebhookconfiguration.admissionregistration.k8s.io/confidential-gate created"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains("the gate answers admission requests"),
        "{stderr}"
    );
    assert!(!stderr.contains("ERROR"), "{stderr}");

    // The master secret: a local file only the owner reads, equal to the
    // Secret the gate reads.
    use std::os::unix::fs::PermissionsExt as _;
    let local = std::fs::read(&playground.files.master_secret)?;
    assert_eq!(
        std::fs::metadata(&playground.files.master_secret)?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "confidential-system");
    let master = secrets.get("confidential-master-secret").await?;
    let in_cluster = secret_data(&master, "master-secret.json");
    let parse = |b: &[u8]| serde_json::from_slice::<Value>(b).expect("json");
    assert_eq!(parse(&local), parse(&in_cluster));

    // The cluster file: ID and pin derived from that master secret.
    let file: Value = serde_json::from_slice(&std::fs::read(&playground.files.cluster_file)?)?;
    let m = parse(&local);
    let master_secret = confidential_attestation::kdf::MasterSecret::new(
        hex::decode(m["secret"].as_str().context("secret")?)?,
        hex::decode(m["salt"].as_str().context("salt")?)?,
    )?;
    let cluster_id = hex::encode(master_secret.cluster_id());
    assert_eq!(file["clusterId"], json!(cluster_id));
    assert!(
        stdout.contains(&format!("cluster ID: {cluster_id}")),
        "{stdout}"
    );
    assert_eq!(
        file["gatePin"],
        json!(hex::encode(
            confidential_attestation::atls::GateIdentity::derive(&master_secret)?.pin()
        ))
    );
    assert_eq!(file["gateEndpoint"], json!(playground.join_endpoint));
    assert!(
        file["images"].as_object().is_some_and(|i| i
            .values()
            .all(|d| d.as_str().is_some_and(|d| d.starts_with("sha256:")))),
        "{file}"
    );

    // CRDs, the policy from the signed files, the pool, the caBundle.
    for crd in confidential_api::crds() {
        let name = crd.metadata.name.clone().context("crd name")?;
        Api::<CustomResourceDefinition>::all(client.clone())
            .get(&name)
            .await
            .with_context(|| format!("CRD {name}"))?;
    }
    let policy = Api::<AttestationPolicy>::all(client.clone())
        .get("default")
        .await?;
    let images: Vec<&str> = policy
        .spec
        .images
        .iter()
        .map(|i| i.image.as_str())
        .collect();
    assert_eq!(
        images,
        [
            confidential_playground::IMAGE_V1,
            confidential_playground::IMAGE_V2
        ]
    );
    assert_eq!(policy.spec.publishers.len(), 1);
    let pool = Api::<NodeVersion>::all(client.clone())
        .get("default")
        .await?;
    assert_eq!(pool.spec.image, confidential_playground::IMAGE_V1);
    let tls = secrets.get("confidential-webhook-tls").await?;
    let ca = secret_data(&tls, "ca.crt");
    for bundle in ca_bundle(&client).await? {
        assert_eq!(bundle, ca, "every webhook trusts exactly the gate's CA");
    }
    gate_refuses_an_unattested_node(&client).await?;

    // Second run: nothing changes, and it says so.
    let before = (
        secrets
            .get("confidential-webhook-tls")
            .await?
            .metadata
            .resource_version,
        master.metadata.resource_version.clone(),
    );
    let out = run(&playground, &init_args(&playground, &[]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("cluster ID"))
        .collect();
    assert!(lines.len() > 20, "{stdout}");
    for line in &lines {
        assert!(line.contains(" unchanged"), "second run changed {line}");
    }
    assert!(stderr.contains("init changed nothing"), "{stderr}");
    let after = (
        secrets
            .get("confidential-webhook-tls")
            .await?
            .metadata
            .resource_version,
        secrets
            .get("confidential-master-secret")
            .await?
            .metadata
            .resource_version,
    );
    assert_eq!(before, after);
    assert_eq!(std::fs::read(&playground.files.master_secret)?, local);

    // Rotation: a new CA and certificate; the gate reloads it; every
    // caBundle ends up trusting only the new CA; admission keeps working.
    let out = run(
        &playground,
        &init_args(&playground, &["--rotate-serving-cert"]),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("secret/confidential-webhook-tls configured"),
        "{stdout}"
    );
    assert!(stdout.contains("previous CA removed"), "{stdout}");
    let rotated = secrets.get("confidential-webhook-tls").await?;
    let new_ca = secret_data(&rotated, "ca.crt");
    assert_ne!(new_ca, ca);
    for bundle in ca_bundle(&client).await? {
        assert_eq!(bundle, new_ca, "only the new CA is trusted after rotation");
    }
    assert!(
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .get_opt("kubectl-confidential-rotation-probe")
            .await?
            .is_none(),
        "the temporary rotation probe is removed"
    );
    gate_refuses_an_unattested_node(&client).await?;
    // The gate really serves a certificate of the new CA, and not of the old one.
    let served = served_certificate(&playground.gate_url).await?;
    let der = |pem: &[u8]| {
        confidential_attestation::tpm::parse_certificates(&String::from_utf8_lossy(pem))
            .expect("pem")
            .remove(0)
    };
    let (_, leaf) = x509_parser::parse_x509_certificate(&served).context("served cert")?;
    let new_ca_der = der(&new_ca);
    let old_ca_der = der(&ca);
    let (_, new_ca_cert) = x509_parser::parse_x509_certificate(&new_ca_der)?;
    let (_, old_ca_cert) = x509_parser::parse_x509_certificate(&old_ca_der)?;
    assert!(
        leaf.verify_signature(Some(new_ca_cert.public_key()))
            .is_ok()
    );
    assert!(
        leaf.verify_signature(Some(old_ca_cert.public_key()))
            .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_equals_the_manifests_and_every_bad_input_changes_nothing() -> Result<()> {
    let playground = playground().await?;
    let d = playground.dir.clone();
    let out_file = d.join("confidential-master-secret.json");

    // --dry-run in the in-cluster layout the manifests describe: the same
    // objects as `kubectl kustomize manifests/`, plus the generated ones.
    let mut args: Vec<String> = init_args(&playground, &[])
        .into_iter()
        .filter(|a| !a.starts_with("--gate-url") && !a.starts_with("--join-exposure"))
        .collect();
    args.extend(
        [
            "--dry-run",
            "-o",
            "json",
            "--node-api-server",
            "https://kubernetes.default.svc",
        ]
        .map(str::to_owned),
    );
    let out = run(&playground, &args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let list: Value = serde_json::from_str(&stdout)?;
    let mut generated = Vec::new();
    let mut applied: Vec<Value> = Vec::new();
    for mut object in list["items"].as_array().context("items")?.clone() {
        match object["kind"].as_str() {
            Some("Secret" | "AttestationPolicy" | "NodeVersion") => generated.push(key(&object)),
            _ => {
                for webhook in object
                    .get_mut("webhooks")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let bundle = webhook
                        .get_mut("clientConfig")
                        .and_then(Value::as_object_mut)
                        .and_then(|c| c.remove("caBundle"))
                        .context("init sets every caBundle")?;
                    assert!(bundle.as_str().is_some_and(|b| !b.is_empty()));
                }
                applied.push(object);
            }
        }
    }
    assert_eq!(
        generated,
        [
            "Secret/confidential-system/confidential-master-secret",
            "Secret/confidential-system/confidential-webhook-tls",
            "AttestationPolicy//default",
            "NodeVersion//default"
        ]
    );
    for secret in list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|o| o["kind"] == "Secret")
    {
        for value in secret["data"].as_object().context("data")?.values() {
            assert_eq!(
                value, "<generated; not shown>",
                "a dry run never prints secrets"
            );
        }
    }
    let manifests = kustomize_manifests()?;
    let keys = |objects: &[Value]| objects.iter().map(key).collect::<Vec<_>>();
    let (mut ours, mut theirs) = (keys(&applied), keys(&manifests));
    ours.sort();
    theirs.sort();
    assert_eq!(
        ours, theirs,
        "init applies exactly the objects of manifests/"
    );
    for object in &manifests {
        let mine = applied
            .iter()
            .find(|o| key(o) == key(object))
            .context("same keys")?;
        let difference = first_difference(&normalised(mine), &normalised(object), "");
        assert_eq!(difference, None, "{} differs from manifests/", key(object));
    }
    // The same objects as YAML documents.
    let yaml_args: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "json" {
                "yaml".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = run(&playground, &yaml_args);
    assert!(out.status.success());
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text(&out).0)?;
    let documents: Vec<Value> = documents.into_iter().filter(|d| !d.is_null()).collect();
    assert_eq!(
        documents.iter().map(key).collect::<Vec<_>>(),
        list["items"]
            .as_array()
            .context("items")?
            .iter()
            .map(key)
            .collect::<Vec<_>>()
    );
    assert!(!out_file.exists(), "a dry run writes no file");
    nothing_installed(&playground).await?;

    // Every bad input, one by one: a clear error, nothing changed.
    let garbage = d.join("garbage.json");
    std::fs::write(&garbage, "not a measurement file")?;
    std::fs::write(d.join("garbage.json.sig"), "AAAA\n")?;
    // A file signed by another key.
    let forged = d.join("forged.json");
    std::fs::copy(&playground.files.measurements_v2, &forged)?;
    let other = confidential_testenv::fixtures::Publisher::seeded("other", 7);
    let file = confidential_attestation::measurements::MeasurementFile::from_canonical_json(
        &std::fs::read(&forged)?,
    )?;
    std::fs::write(d.join("forged.json.sig"), other.sign(&file) + "\n")?;
    let foreign_images = d.join("foreign-images.json");
    std::fs::write(
        &foreign_images,
        json!({"images": [{"name": "ghcr.io/elsewhere/gate", "digest": format!("sha256:{}", "00".repeat(32))}]})
            .to_string(),
    )?;
    let gate_only_images = d.join("gate-only-images.json");
    std::fs::write(
        &gate_only_images,
        json!({"images": [{"name": "ghcr.io/kubectl-confidential/confidential-webhook", "digest": format!("sha256:{}", "5e".repeat(32))}]})
            .to_string(),
    )?;
    let both_images = d.join("both-images.json");
    std::fs::write(
        &both_images,
        json!({"images": [
            {"name": "ghcr.io/kubectl-confidential/confidential-webhook", "digest": format!("sha256:{}", "5e".repeat(32))},
            {"name": "ghcr.io/kubectl-confidential/confidential-controllers", "digest": format!("sha256:{}", "c0".repeat(32))},
        ]})
        .to_string(),
    )?;
    let both_images = both_images.display().to_string();
    let in_cluster = |extra: &[&str]| -> Vec<String> {
        init_args(&playground, extra)
            .into_iter()
            .filter(|a| !a.starts_with("--gate-url") && !a.starts_with("--join-exposure"))
            .collect()
    };
    let bad_master = d.join("bad-master.json");
    std::fs::write(&bad_master, r#"{"secret": "00", "salt": "00"}"#)?;
    let replace_measurements = |file: &Path| -> Vec<String> {
        init_args(&playground, &[])
            .into_iter()
            .map(|a| {
                if a.starts_with("--measurements=") && a.ends_with("node-v2.json") {
                    format!("--measurements={}", file.display())
                } else {
                    a
                }
            })
            .collect()
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing measurement file",
            replace_measurements(&d.join("missing.json")),
            "missing.json",
        ),
        (
            "invalid measurement file",
            replace_measurements(&garbage),
            "parsing",
        ),
        (
            "bad signature",
            replace_measurements(&forged),
            "is not signed by the publisher key",
        ),
        (
            "image without measurements",
            init_args(&playground, &["--image", "registry.example/unmeasured:v9"]),
            "has no signed measurement file",
        ),
        (
            "invalid master secret",
            init_args(
                &playground,
                &["--master-secret", &bad_master.display().to_string()],
            ),
            "not usable",
        ),
        (
            "images file naming an image the manifests do not use",
            init_args(
                &playground,
                &["--images", &foreign_images.display().to_string()],
            ),
            "is not used by manifests/",
        ),
        (
            "in-cluster install by the manifests' placeholder digests",
            in_cluster(&[]),
            "placeholder digests",
        ),
        (
            "in-cluster install with an images file missing the operator",
            in_cluster(&["--images", &gate_only_images.display().to_string()]),
            "pins ghcr.io/kubectl-confidential/confidential-controllers by placeholder",
        ),
        (
            "host network for a gate outside the cluster",
            init_args(&playground, &["--host-network"]),
            "with --gate-url no pods run",
        ),
        (
            "host network with the nodes sent to this machine's loopback",
            in_cluster(&["--images", &both_images, "--host-network"]),
            "is this machine's loopback",
        ),
        (
            "unreachable API server",
            init_args(&playground, &["--server", "https://127.0.0.1:1"]),
            "unreachable",
        ),
        (
            "webhook URL not https",
            init_args(&playground, &[])
                .into_iter()
                .map(|a| {
                    if a.starts_with("--gate-url=") {
                        "--gate-url=http://127.0.0.1:1".to_owned()
                    } else {
                        a
                    }
                })
                .collect(),
            "https only",
        ),
    ];
    for (what, args, says) in cases {
        let out = run(&playground, &args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{what}: must fail");
        assert!(stderr.contains(says), "{what}: {stderr}");
        assert!(
            !stderr.contains("ERROR"),
            "{what}: one clear error, no log noise"
        );
        assert!(!out_file.exists(), "{what}: wrote the master secret");
        nothing_installed(&playground).await?;
    }

    // An existing master-secret file is never overwritten.
    std::fs::write(&out_file, "precious\n")?;
    let out = run(&playground, &init_args(&playground, &[]));
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&out_file)?, "precious\n");
    nothing_installed(&playground).await?;
    Ok(())
}

/// The gate's namespace of the in-cluster test (`-n`).
const NS: &str = "confidential-test";

/// The in-cluster layout (no `--gate-url`) in another namespace (`-n`) on a
/// real API server: every
/// object of `manifests/` is accepted by server-side apply, the gate's
/// Deployment hands joining nodes this cluster's API server, the join
/// Service is a NodePort; with no kubelet to run the gate, init reports
/// that no pod of the gate is ready and what to check, instead of hanging,
/// and registers no webhook that would call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_cluster_install_applies_the_workloads_reports_a_gate_that_is_not_ready_and_registers_no_webhook()
-> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    let playground = playground().await?;
    let client = playground.client.clone();
    // The images `cargo xtask images` built replace the kustomization's digests.
    let built_digest = format!("sha256:{}", "5e".repeat(32));
    let images_file = playground.dir.join("images.json");
    std::fs::write(
        &images_file,
        json!({"version": "0.1.0", "images": [{
            "name": "ghcr.io/kubectl-confidential/confidential-webhook",
            "digest": built_digest,
            "tag": "v0.1.0",
        }, {
            "name": "ghcr.io/kubectl-confidential/confidential-controllers",
            "digest": format!("sha256:{}", "c0".repeat(32)),
            "tag": "v0.1.0",
        }]})
        .to_string(),
    )?;
    let images_arg = images_file.display().to_string();
    let args: Vec<String> = init_args(
        &playground,
        &["--timeout", "15s", "--images", &images_arg, "-n", NS],
    )
    .into_iter()
    .filter(|a| !a.starts_with("--gate-url") && !a.starts_with("--join-exposure"))
    .collect();
    let out = run(&playground, &args);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "no gate runs, so init cannot succeed"
    );
    assert!(
        stderr.contains("no pod of the gate became ready within"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kubectl -n confidential-test describe pods"),
        "{stderr}"
    );
    // The fail-closed webhooks are registered only once a gate serves:
    // none calls a gate that does not run.
    assert!(
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(
            client.clone()
        )
        .get_opt("confidential-gate")
        .await?
        .is_none(),
        "no webhook configuration without a ready gate"
    );
    assert!(!stderr.contains("ERROR"), "{stderr}");
    assert!(
        stdout.contains("deployment.apps/confidential-webhook created"),
        "{stdout}"
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for name in ["confidential-webhook", "confidential-controllers"] {
        let deployment = deployments.get(name).await?;
        let container = &deployment
            .spec
            .and_then(|s| s.template.spec)
            .context("pod spec")?
            .containers[0];
        let image = container.image.clone().unwrap_or_default();
        assert!(image.contains("@sha256:"), "{name}: {image}");
        if name == "confidential-webhook" {
            assert_eq!(
                image,
                format!("ghcr.io/kubectl-confidential/confidential-webhook@{built_digest}")
            );
            let args = container.args.clone().unwrap_or_default();
            let server = playground.control_plane.server.trim_end_matches('/');
            assert!(
                args.iter()
                    .any(|a| a.trim_end_matches('/') == format!("--join-api-server={server}")),
                "joining nodes get this cluster's API server: {args:?}"
            );
        }
    }
    let join = Api::<Service>::namespaced(client.clone(), NS)
        .get("confidential-gate-join")
        .await?;
    let spec = join.spec.context("spec")?;
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.ports.unwrap_or_default()[0].node_port, Some(30443));
    let tls = Api::<Secret>::namespaced(client.clone(), NS)
        .get("confidential-webhook-tls")
        .await?;
    // Everything of the gate's namespace moved; kube-system's Role stayed.
    assert!(
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .get_opt("confidential-system")
            .await?
            .is_none()
    );
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), "kube-system")
        .get("confidential-webhook-bootstrap-tokens")
        .await?;
    let names = tls
        .metadata
        .annotations
        .unwrap_or_default()
        .get("confidential.dev/serving-names")
        .cloned()
        .unwrap_or_default();
    assert!(
        names.contains("confidential-webhook.confidential-test.svc"),
        "{names}"
    );
    Ok(())
}
