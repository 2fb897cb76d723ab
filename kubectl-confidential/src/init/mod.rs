//! `kubectl confidential init`: turns an existing cluster into a
//! confidential one. Every local input (signed measurement files, publisher
//! key, EK CAs, a given master secret, the output file) is checked before
//! the cluster is touched, so a bad input changes nothing. Then it installs,
//! by server-side apply, the objects of [`objects`] (the same as
//! `manifests/`), waits until the gate answers through its webhook, creates
//! the AttestationPolicy and the NodeVersion pool, and writes the cluster
//! file `verify` reads. Run again with the same inputs, it changes nothing
//! and says so.
//!
//! Modules: [`args`] (flags), [`secrets`] (master secret), [`pki`] (the
//! gate's serving certificate and CA), [`secret_objects`] (the generated
//! Secrets), [`objects`] (what is applied), [`addresses`] (where the gate is
//! reached), [`apply`] (server-side apply), [`wait`] (progress until it
//! works).

pub mod addresses;
pub mod apply;
pub mod args;
pub mod objects;
pub mod pki;
pub mod rotation;
pub mod secret_objects;
pub mod secrets;
pub mod wait;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, EvidenceKind, NodeVersion, NodeVersionSpec,
    RolloutStrategy, TpmTrust,
};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::connection::ConnectionArgs;
use crate::output::Format;
use crate::verify::trust::{ClusterFile, TrustedFile, read_ek_cas, read_signed_file};
use apply::{Mode, Outcome};
use args::InitArgs;
use objects::{GatePlacement, Install, Layout, PodNetwork};
use secrets::{Identity, LocalFile, MasterSecretFile};

pub use args::InitArgs as Args;

/// The local inputs, all checked.
struct Inputs {
    trusted: Vec<TrustedFile>,
    images: Vec<objects::PinnedImage>,
    publisher_key_pem: String,
    ek_ca_pems: Vec<String>,
    given_master: Option<MasterSecretFile>,
    image: String,
}

fn read_inputs(args: &InitArgs) -> Result<Inputs> {
    let publisher_key_pem = std::fs::read_to_string(&args.publisher_key)
        .with_context(|| format!("reading the publisher key {}", args.publisher_key.display()))?;
    confidential_attestation::measurements::parse_public_key(&publisher_key_pem).with_context(
        || {
            format!(
                "{} is not a P-256 public key (PEM)",
                args.publisher_key.display()
            )
        },
    )?;
    let trusted = args
        .measurements
        .iter()
        .map(|path| read_signed_file(path, None, &publisher_key_pem, &args.publisher_key))
        .collect::<Result<Vec<_>>>()?;
    read_ek_cas(&args.ek_ca)?;
    let ek_ca_pems = args
        .ek_ca
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let images = match &args.images {
        None => objects::pinned_images()?,
        Some(path) => {
            #[derive(serde::Deserialize)]
            struct ImagesFile {
                images: Vec<objects::PinnedImage>,
            }
            let text = std::fs::read(path)
                .with_context(|| format!("reading --images {}", path.display()))?;
            let file: ImagesFile = serde_json::from_slice(&text).with_context(|| {
                format!(
                    "{} is not an images file ({{\"images\": [{{\"name\": ..., \"digest\": ...}}]}})",
                    path.display()
                )
            })?;
            objects::images_with(&file.images)
                .with_context(|| format!("--images {}", path.display()))?
        }
    };
    let given_master = args
        .master_secret
        .as_deref()
        .map(MasterSecretFile::read)
        .transpose()?;
    let image = match &args.image {
        Some(image) => image.clone(),
        None => trusted
            .first()
            .map(|t| t.file.image.clone())
            .context("no --measurements given")?,
    };
    if !trusted.iter().any(|t| t.file.image == image) {
        bail!(
            "--image {image} has no signed measurement file among --measurements; \
             the gate would refuse every node of the pool"
        );
    }
    Ok(Inputs {
        trusted,
        images,
        publisher_key_pem,
        ek_ca_pems,
        given_master,
        image,
    })
}

/// The initial AttestationPolicy from the verified files (pure).
fn policy(args: &InitArgs, inputs: &Inputs) -> Result<AttestationPolicy> {
    let mut spec = AttestationPolicySpec {
        evidence_kinds: vec![EvidenceKind::Tpm],
        tpm: Some(TpmTrust {
            ek_ca_certificates: inputs.ek_ca_pems.clone(),
        }),
        snp: None,
        publishers: Vec::new(),
        images: Vec::new(),
        reattestation_interval: Some(args.reattestation_interval.clone()),
    };
    for trusted in &inputs.trusted {
        let signature =
            crate::verify::trust::read_signature(&format!("@{}.sig", trusted.path.display()))?;
        let plan = crate::measurements::policy::plan_add(
            &spec,
            &trusted.file,
            &signature,
            &inputs.publisher_key_pem,
            Some(&args.publisher),
        )?;
        spec.images = plan.images;
        spec.publishers = plan.publishers;
    }
    Ok(AttestationPolicy::new(&args.policy, spec))
}

fn print_objects(objects: &[Value], format: Format) -> Result<()> {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": objects,
            }))?
        ),
        Format::Yaml | Format::Table => {
            for object in objects {
                print!("---\n{}", serde_saphyr::to_string(object)?);
            }
        }
    }
    Ok(())
}

fn write_cluster_file(path: &Path, file: &ClusterFile) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(file)? + "\n")
        .with_context(|| format!("writing the cluster file {}", path.display()))
}

/// How long the gate may take to see the new AttestationPolicy in its watch.
const POLICY_PROPAGATION: std::time::Duration = std::time::Duration::from_secs(30);

/// Creates the pool. The gate checks its image against the policies it
/// watches; right after the policy was created its watch may not have it
/// yet, so that one refusal is retried for a while; any other fails at once.
async fn create_pool(client: &kube::Client, pool: &Value) -> Result<Outcome> {
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        match apply::apply(client, pool, Mode::CreateOnly).await {
            Err(err)
                if format!("{err:#}").contains("has no measurements in any AttestationPolicy")
                    && started.elapsed() < POLICY_PROPAGATION =>
            {
                if !said {
                    eprintln!("waiting for the gate to see the new AttestationPolicy");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            other => return other,
        }
    }
}

pub async fn run(connection: &ConnectionArgs, namespace: &str, args: &InitArgs) -> Result<()> {
    // Local inputs first: a bad one changes nothing anywhere.
    let inputs = read_inputs(args)?;
    let placement = match &args.gate_url {
        Some(url) => GatePlacement::External(url.clone()),
        None => GatePlacement::InCluster,
    };
    if matches!(placement, GatePlacement::InCluster) {
        if args.dry_run {
            if inputs
                .images
                .iter()
                .any(objects::PinnedImage::is_placeholder)
            {
                eprintln!(
                    "Warning: the images are pinned by placeholder digests; \
                     pass --images dist/images.json (from `cargo xtask images`)"
                );
            }
        } else {
            objects::refuse_placeholders(&inputs.images)?;
        }
    }
    let names = addresses::serving_names(&placement, namespace)?;
    if args.host_network && !matches!(placement, GatePlacement::InCluster) {
        bail!(
            "--host-network places the gate's and the operator's pods; with --gate-url no pods run"
        );
    }

    let cluster = connection.client().await?;
    let client = &cluster.client;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| cluster.explain("reaching the API server", e))?;
    for warning in crate::preflight::kubeadm_autoapprove_bindings(client).await? {
        eprintln!("Warning: {warning}");
    }

    // What the cluster holds already.
    let in_ns = |object: Value| objects::in_namespace(vec![object], namespace).remove(0);
    let existing_master = apply::read(
        client,
        &in_ns(secret_objects::master_secret_object(
            &MasterSecretFile::generate(),
        )),
    )
    .await?
    .map(|s| secret_objects::master_secret_from_secret(&s))
    .transpose()?;
    let plan = secrets::plan_master_secret(
        inputs.given_master.clone(),
        existing_master,
        &args.master_secret_out,
        LocalFile::inspect(&args.master_secret_out),
        MasterSecretFile::generate,
    )?;
    let identity = Identity::of(&plan.secret)?;
    let now = jiff::Timestamp::now();
    let placeholder_cert = pki::issue(&names, now)?;
    let existing_cert = apply::read(
        client,
        &secret_objects::tls_secret_object(&placeholder_cert),
    )
    .await?
    .and_then(|s| secret_objects::serving_cert_from_secret(&s));
    let serving = match &existing_cert {
        Some(cert) if pki::reusable(cert, &names, now, args.rotate_serving_cert) => cert.clone(),
        _ => placeholder_cert,
    };
    // While a replaced certificate may still be served, the API server
    // trusts both CAs.
    let previous_ca = existing_cert
        .as_ref()
        .filter(|old| old.ca_pem != serving.ca_pem)
        .map(|old| old.ca_pem.clone());
    let ca_bundle = match &previous_ca {
        Some(old) => format!("{}{old}", serving.ca_pem),
        None => serving.ca_pem.clone(),
    };

    let node_api_server = args
        .node_api_server
        .clone()
        .unwrap_or_else(|| cluster.server.clone());
    let pod_network = match args.host_network {
        false => PodNetwork::Pods,
        true => {
            let (api_host, api_port) =
                addresses::host_network_api_server(&node_api_server).context("--host-network")?;
            PodNetwork::Host { api_host, api_port }
        }
    };
    let layout = Layout {
        exposure: args.join_exposure.clone(),
        placement: placement.clone(),
        node_api_server,
        pod_network,
    };
    let pool = NodeVersion::new(
        &args.pool,
        NodeVersionSpec {
            image: inputs.image.clone(),
            kubernetes_version: args
                .kubernetes_version
                .clone()
                .unwrap_or_else(|| version.git_version.clone()),
            replicas: args.replicas,
            control_plane: false,
            strategy: RolloutStrategy {
                max_surge: Some(IntOrString::Int(args.max_surge)),
                ..Default::default()
            },
        },
    );
    let install = Install {
        namespace: namespace.to_owned(),
        layout,
        images: inputs.images.clone(),
        master: plan.secret.clone(),
        serving: serving.clone(),
        ca_bundle,
        policy: policy(args, &inputs)?,
        pool,
    };
    let all = objects::objects(&install)?;
    if args.dry_run {
        print_objects(&objects::redacted(&all), args.output)?;
        eprintln!(
            "dry run: {} objects; nothing was changed and no file was written",
            all.len()
        );
        return Ok(());
    }

    // The admin holds the master secret before the cluster depends on it.
    if let Some(path) = &plan.write {
        secrets::write_master_secret(path, &plan.secret)?;
        eprintln!(
            "wrote the master secret to {} (mode 0600): store it safely, it recovers the cluster",
            path.display()
        );
    }

    let mut outcomes = Vec::new();
    let is = |o: &Value, kind: &str| o["kind"].as_str() == Some(kind);
    let mut report = |object: &Value, outcome: Outcome| {
        println!("{} {}", apply::describe(object), outcome.as_str());
        outcomes.push(outcome);
    };
    let crds: Vec<&Value> = all
        .iter()
        .filter(|o| is(o, "CustomResourceDefinition"))
        .collect();
    for crd in &crds {
        report(crd, apply::apply(client, crd, Mode::Apply).await?);
    }
    let crd_names: Vec<String> = crds
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    wait::crds_established(client, &crd_names, args.timeout).await?;
    let late = [
        "ValidatingWebhookConfiguration",
        "AttestationPolicy",
        "NodeVersion",
    ];
    for object in all
        .iter()
        .filter(|o| !is(o, "CustomResourceDefinition") && !late.iter().any(|k| is(o, k)))
    {
        report(object, apply::apply(client, object, Mode::Apply).await?);
    }
    if matches!(placement, GatePlacement::InCluster) {
        wait::gate_pods_ready(client, namespace, objects::GATE, args.timeout).await?;
    }
    for object in all
        .iter()
        .filter(|o| is(o, "ValidatingWebhookConfiguration"))
    {
        report(object, apply::apply(client, object, Mode::Apply).await?);
    }
    let (where_, hint) = match &placement {
        GatePlacement::External(url) => (
            url.clone(),
            "Start the gate (confidential-webhook) there with the Secrets init created".to_owned(),
        ),
        GatePlacement::InCluster => (
            format!("Service {namespace}/{}", objects::GATE),
            format!("Check `kubectl -n {namespace} get pods` and the gate's logs"),
        ),
    };
    wait::gate_answers(client, &where_, args.timeout, &hint).await?;
    for object in all.iter().filter(|o| is(o, "AttestationPolicy")) {
        report(
            object,
            apply::apply(client, object, Mode::CreateOnly).await?,
        );
    }
    for object in all.iter().filter(|o| is(o, "NodeVersion")) {
        report(object, create_pool(client, object).await?);
    }

    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing Nodes for the join endpoint's address")?
        .items;
    let join_service = Api::<Service>::namespaced(client.clone(), namespace)
        .get_opt(objects::JOIN_SERVICE)
        .await
        .context("reading the join Service")?;
    let endpoint = addresses::gate_endpoint(
        &args.join_exposure,
        &nodes,
        join_service.as_ref(),
        &cluster.server,
    );
    let images: BTreeMap<String, String> = inputs
        .images
        .iter()
        .cloned()
        .map(|p| (p.name, p.digest))
        .collect();
    let cluster_file = ClusterFile {
        cluster_id: identity.cluster_id.clone(),
        gate_endpoint: endpoint.clone(),
        gate_pin: Some(identity.gate_pin.clone()),
        images,
    };
    write_cluster_file(&args.cluster_file, &cluster_file)?;
    if outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Unchanged | Outcome::Kept))
    {
        eprintln!("init changed nothing: the cluster is already initialised with these inputs");
    }
    eprintln!(
        "join endpoint for machines: {}; gate pin {}",
        endpoint
            .as_deref()
            .unwrap_or("<not known yet: the load balancer has no address>"),
        identity.gate_pin
    );
    if matches!(placement, GatePlacement::InCluster) {
        for image in &inputs.images {
            eprintln!("installed image {}@{}", image.name, image.digest);
        }
    }
    eprintln!(
        "wrote {} (cluster ID, gate endpoint and pin, image digests): `verify` reads it",
        args.cluster_file.display()
    );
    println!("cluster ID: {}", identity.cluster_id);
    if previous_ca.is_some() {
        complete_rotation(client, namespace, &all, &serving.ca_pem, args.timeout).await?;
    }
    Ok(())
}

/// Drops the previous CA from the caBundle once the API server reaches the
/// gate trusting the new CA alone (see [`rotation`]).
async fn complete_rotation(
    client: &kube::Client,
    namespace: &str,
    all: &[Value],
    ca_pem: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    let mut only_new = all.to_vec();
    objects::set_ca_bundle(&mut only_new, ca_pem);
    let configuration = only_new
        .iter()
        .find(|o| o["kind"] == "ValidatingWebhookConfiguration")
        .context("no webhook configuration")?;
    let client_config = &configuration["webhooks"][0]["clientConfig"];
    rotation::new_certificate_live(client, namespace, client_config, ca_pem, timeout).await?;
    apply::apply(client, configuration, Mode::Apply).await?;
    println!(
        "{} configured (previous CA removed from caBundle)",
        apply::describe(configuration)
    );
    Ok(())
}
