//! Proves the test environment is a real control plane: each test here needs
//! a behaviour only the real etcd, kube-apiserver, kube-controller-manager or
//! kube-scheduler provide (schema validation, status subresources, bootstrap
//! token authentication, CSR signing, Node authorization, PDB-guarded
//! eviction, scheduling, process cleanup).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::{
    AttestationPolicy, AttestationPolicySpec, EvidenceKind, ImagePolicy, ImagePolicySpec,
    NodeAttestation, NodeAttestationSpec, NodeVersion, NodeVersionSpec, PendingGoal, PendingNode,
    PendingNodeSpec, Verdict,
};
use confidential_testenv::{
    TestCluster, client_kubeconfig, eventually, install_crds, pki::CertifiedKey, token_kubeconfig,
    unique_name,
};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, EvictParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn api_error_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Creates `object`, reads it back, patches its spec, sets its status through
/// the status subresource, and checks that status written through the main
/// resource is ignored (which only a real status subresource does).
async fn roundtrip<K>(client: &Client, object: K, spec_patch: Value, status: Value) -> Result<()>
where
    K: Resource<Scope = kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let name = object.meta().name.clone().context("object without name")?;
    api.create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating {name}"))?;
    let read = serde_json::to_value(api.get(&name).await?)?;
    assert_eq!(read["metadata"]["name"], json!(name));
    assert!(
        read["metadata"]["uid"].is_string(),
        "server assigned no uid: {read}"
    );

    let patched = serde_json::to_value(
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec_patch.clone() })),
        )
        .await?,
    )?;
    assert_contains(&patched["spec"], &spec_patch, "spec");

    // Status through the main resource: dropped by the status subresource.
    let ignored = serde_json::to_value(
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status.clone() })),
        )
        .await?,
    )?;
    assert_ne!(
        ignored["status"], status,
        "status was writable through the main resource"
    );

    let with_status = serde_json::to_value(
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status.clone() })),
        )
        .await?,
    )?;
    assert_contains(&with_status["status"], &status, "status");
    Ok(())
}

/// Asserts that every field of `expected` has the same value in `actual`
/// (the server may add defaulted fields).
fn assert_contains(actual: &Value, expected: &Value, path: &str) {
    match expected {
        Value::Object(fields) => {
            for (key, value) in fields {
                assert_contains(&actual[key], value, &format!("{path}.{key}"));
            }
        }
        _ => assert_eq!(actual, expected, "{path} differs"),
    }
}

fn time_in(seconds: i64) -> Result<Time> {
    Ok(Time(
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(seconds),
    ))
}

fn condition(type_: &str) -> Value {
    json!([{ "type": type_, "status": "True", "reason": "Test", "message": "set by the test",
              "lastTransitionTime": "2026-01-01T00:00:00Z" }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_install_and_every_resource_round_trips_with_status() -> Result<()> {
    let cluster = TestCluster::start().await?;
    if let Some(cp) = &cluster.control_plane {
        eprintln!("control plane ready in {:?}", cp.startup);
    }
    let client = &cluster.client;
    let installed = install_crds(client, &confidential_testenv::crds_dir()).await?;
    assert_eq!(installed.len(), 5, "expected the five CRDs of DESIGN.md");

    let name = unique_name("policy");
    let policy = AttestationPolicy::new(
        &name,
        AttestationPolicySpec {
            evidence_kinds: vec![EvidenceKind::Tpm],
            ..Default::default()
        },
    );
    roundtrip(
        client,
        policy,
        json!({ "reattestationInterval": "12h" }),
        json!({ "conditions": condition("Ready"), "observedGeneration": 1 }),
    )
    .await?;

    let name = unique_name("pool");
    let version = NodeVersion::new(
        &name,
        NodeVersionSpec {
            image: "registry.example/node:v1".into(),
            kubernetes_version: "v1.35.4".into(),
            replicas: 3,
            control_plane: false,
            strategy: Default::default(),
        },
    );
    roundtrip(
        client,
        version,
        json!({ "image": "registry.example/node:v2", "strategy": { "maxSurge": "10%", "maxUnavailable": 1 } }),
        json!({ "upToDateCount": 2, "outdatedCount": 1, "outdated": ["node-a"], "conditions": condition("Outdated") }),
    )
    .await?;

    let name = unique_name("attestation");
    let attestation = NodeAttestation::new(
        &name,
        NodeAttestationSpec {
            node_name: name.clone(),
            evidence_kind: EvidenceKind::Tpm,
            image: "registry.example/node:v1".into(),
            pool: Some("workers".into()),
            measurements: BTreeMap::from([("4".to_owned(), "ab".repeat(32))]),
            ak_fingerprint: "cd".repeat(32),
            disk_uuid: None,
            attestation_endpoint: None,
            attested_at: time_in(0)?,
            expires_at: time_in(3600)?,
            verdict: Verdict::Trusted,
            warnings: vec![],
        },
    );
    roundtrip(
        client,
        attestation,
        json!({ "warnings": ["pcr 9 differs (warnOnly)"] }),
        json!({ "conditions": condition("Ready") }),
    )
    .await?;

    let name = unique_name("pending");
    let pending = PendingNode::new(
        &name,
        PendingNodeSpec {
            node_name: name.clone(),
            pool: "workers".into(),
            goal: PendingGoal::Join,
            provider_id: Some("sim://1".into()),
            image: "registry.example/node:v1".into(),
            deadline: time_in(600)?,
        },
    );
    roundtrip(
        client,
        pending,
        json!({ "image": "registry.example/node:v2" }),
        json!({ "state": "Failed", "attempts": 1 }),
    )
    .await?;

    let name = unique_name("images");
    let images = ImagePolicy::new(&name, ImagePolicySpec::default());
    roundtrip(
        client,
        images,
        json!({ "mode": "Warn", "allowedRepositories": ["registry.example/*"] }),
        json!({ "observedGeneration": 2, "conditions": condition("Ready") }),
    )
    .await?;

    // The schema is enforced by the server: a wrong type and an unknown enum
    // value are refused and nothing is created.
    let resource = ApiResource::erase::<NodeVersion>(&());
    let dynamic: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let bad_name = unique_name("bad-pool");
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "confidential.dev/v1alpha1", "kind": "NodeVersion",
        "metadata": { "name": bad_name },
        "spec": { "image": "x", "kubernetesVersion": "v1.35.4", "replicas": "three" }
    }))?;
    let err = dynamic
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("schema must refuse replicas: \"three\"");
    assert_eq!(api_error_code(&err), Some(422), "{err}");
    assert!(
        dynamic.get_opt(&bad_name).await?.is_none(),
        "a refused object was stored"
    );

    let resource = ApiResource::erase::<ImagePolicy>(&());
    let dynamic: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "confidential.dev/v1alpha1", "kind": "ImagePolicy",
        "metadata": { "name": unique_name("bad-images") }, "spec": { "mode": "Sometimes" }
    }))?;
    let err = dynamic
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("schema must refuse mode: Sometimes");
    assert_eq!(api_error_code(&err), Some(422), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_token_client_gets_a_kubelet_certificate_signed() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let client = &cluster.client;
    let server = cluster_server(&cluster)?;
    let ca_pem = cluster_ca(&cluster)?;

    // A bootstrap token as kubeadm creates it, and the binding that lets
    // bootstrappers submit CSRs.
    let token_id = format!("{:06x}", std::process::id() % 0xff_ffff);
    let token_secret = "0123456789abcdef";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": format!("bootstrap-token-{token_id}") },
        "type": "bootstrap.kubernetes.io/token",
        "stringData": {
            "token-id": token_id, "token-secret": token_secret,
            "usage-bootstrap-authentication": "true",
            "auth-extra-groups": "system:bootstrappers:confidential:attested-node"
        }
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    confidential_testenv::allow_node_bootstrap(client).await?;

    let dir = tempfile::tempdir()?;
    let token_config = dir.path().join("bootstrap.kubeconfig");
    std::fs::write(
        &token_config,
        token_kubeconfig(
            &server,
            &ca_pem,
            "bootstrap",
            &format!("{token_id}.{token_secret}"),
        ),
    )?;
    let bootstrap = confidential_testenv::client_from_kubeconfig(&token_config).await?;

    // The token authenticates, but only for bootstrapping: it cannot create Nodes.
    let node_name = unique_name("node");
    let err = Api::<Node>::all(bootstrap.clone())
        .create(&PostParams::default(), &node(&node_name))
        .await
        .expect_err("a bootstrap token must not create Nodes");
    assert_eq!(api_error_code(&err), Some(403), "{err}");

    // Submit a kubelet client CSR as the kubelet's TLS bootstrap does.
    let (csr_name, key_pem) =
        confidential_testenv::node::submit_kubelet_csr(&bootstrap, &node_name).await?;
    let created = Api::<CertificateSigningRequest>::all(bootstrap.clone())
        .get(&csr_name)
        .await?;
    assert_eq!(
        created.spec.username.as_deref(),
        Some(format!("system:bootstrap:{token_id}").as_str()),
        "the API server must record the token's identity on the CSR"
    );

    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let approval = json!({ "status": { "conditions": [{
        "type": "Approved", "status": "True", "reason": "TestApproved", "message": "approved by the test"
    }]}});
    csrs.patch_approval(&csr_name, &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    // The real controller-manager signs it with the cluster CA.
    let pem_text = confidential_testenv::node::signed_certificate(client, &csr_name).await?;
    let cn = confidential_testenv::node::common_name(&pem_text)?;
    assert_eq!(cn, Some(format!("system:node:{node_name}")));

    // The signed certificate is a working node identity: the Node authorizer
    // lets it create its own Node and NodeRestriction refuses another's.
    let node_config = dir.path().join("node.kubeconfig");
    let node_key = CertifiedKey {
        cert_pem: pem_text,
        key_pem,
    };
    std::fs::write(
        &node_config,
        client_kubeconfig(&server, &ca_pem, "node", &node_key),
    )?;
    let as_node = confidential_testenv::client_from_kubeconfig(&node_config).await?;
    let nodes: Api<Node> = Api::all(as_node);
    nodes
        .create(&PostParams::default(), &node(&node_name))
        .await?;
    let err = nodes
        .create(&PostParams::default(), &node(&unique_name("other-node")))
        .await
        .expect_err("a node must not create another node's Node");
    assert_eq!(api_error_code(&err), Some(403), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_is_refused_by_a_pdb_then_allowed() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let client = &cluster.client;
    let ns = unique_name("pdb");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let node_name = unique_name("node");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node(&node_name))
        .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_name = "guarded";
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": pod_name, "labels": { "app": "guarded" } },
        "spec": { "nodeName": node_name, "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10" }] }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    // No kubelet here: report the pod Running and Ready as a kubelet would.
    let now = jiff::Timestamp::now().to_string();
    pods.patch_status(
        pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "phase": "Running", "conditions": [
            { "type": "Ready", "status": "True", "lastTransitionTime": now }
        ]}})),
    )
    .await?;

    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": { "name": "guard" },
        "spec": { "minAvailable": 1, "selector": { "matchLabels": { "app": "guarded" } } }
    }))?;
    pdbs.create(&PostParams::default(), &pdb).await?;
    wait_for_pdb(&pdbs, 1, 0).await?;

    let err = pods
        .evict(pod_name, &EvictParams::default())
        .await
        .expect_err("the PDB must refuse the eviction");
    assert_eq!(api_error_code(&err), Some(429), "{err}");
    let still = pods.get(pod_name).await?;
    assert!(
        still.metadata.deletion_timestamp.is_none(),
        "a refused eviction must change nothing"
    );

    pdbs.patch(
        "guard",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "minAvailable": 0 } })),
    )
    .await?;
    wait_for_pdb(&pdbs, 1, 1).await?;
    pods.evict(pod_name, &EvictParams::default()).await?;
    let gone = pods.get_opt(pod_name).await?;
    assert!(
        gone.is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
        "an allowed eviction must delete the pod"
    );
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_binds_a_pod_to_a_ready_node() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let client = &cluster.client;
    let ns = unique_name("sched");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let node_name = unique_name("node");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node(&node_name))
        .await?;
    let now = jiff::Timestamp::now().to_string();
    let resources = json!({ "cpu": "4", "memory": "8Gi", "pods": "110" });
    nodes
        .patch_status(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "capacity": resources, "allocatable": resources,
                "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
                                 "lastHeartbeatTime": now, "lastTransitionTime": now }]
            }})),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "scheduled" },
        "spec": {
            "nodeSelector": { "kubernetes.io/hostname": node_name },
            "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10" }]
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let bound = eventually(
        "the scheduler to bind the pod",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move { Ok(pods.get("scheduled").await?.spec.and_then(|s| s.node_name)) }
        },
    )
    .await?;
    assert_eq!(bound, node_name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_control_plane_stops_every_process_it_started() -> Result<()> {
    if std::env::var_os(confidential_testenv::EXISTING_CLUSTER_ENV).is_some() {
        eprintln!("not applicable to an existing cluster: nothing is started");
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let cp = cluster
        .control_plane
        .as_ref()
        .context("private control plane")?;
    let pids: Vec<u32> = cp.processes().iter().filter_map(|p| p.pid()).collect();
    let names: Vec<String> = cp.processes().iter().map(|p| p.name().to_owned()).collect();
    assert_eq!(
        names,
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler"
        ]
    );
    let dir = cp.dir().to_owned();
    for pid in &pids {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} not running"
        );
    }
    drop(cluster);
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still exists after drop"
        );
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
    Ok(())
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } }
    }))
    .expect("static node manifest")
}

async fn wait_for_pdb(pdbs: &Api<PodDisruptionBudget>, healthy: i32, allowed: i32) -> Result<()> {
    eventually(
        &format!("PDB status currentHealthy={healthy} disruptionsAllowed={allowed}"),
        Duration::from_secs(30),
        || {
            let pdbs = pdbs.clone();
            async move {
                let pdb = pdbs.get("guard").await?;
                let generation = pdb.metadata.generation;
                Ok(pdb
                    .status
                    .filter(|s| {
                        s.observed_generation == generation
                            && s.current_healthy == healthy
                            && s.disruptions_allowed == allowed
                    })
                    .map(|_| ()))
            }
        },
    )
    .await
}

fn cluster_server(cluster: &TestCluster) -> Result<String> {
    match &cluster.control_plane {
        Some(cp) => Ok(cp.server.clone()),
        None => kubeconfig_field(cluster, "server"),
    }
}

fn cluster_ca(cluster: &TestCluster) -> Result<String> {
    match &cluster.control_plane {
        Some(cp) => Ok(cp.ca_pem.clone()),
        None => {
            use base64::Engine;
            let data = kubeconfig_field(cluster, "certificate-authority-data")?;
            Ok(String::from_utf8(
                base64::engine::general_purpose::STANDARD.decode(data)?,
            )?)
        }
    }
}

/// Reads a field of the current cluster from the kubeconfig (for existing clusters).
fn kubeconfig_field(cluster: &TestCluster, field: &str) -> Result<String> {
    let config = kube::config::Kubeconfig::read_from(&cluster.kubeconfig)?;
    let context = config
        .current_context
        .clone()
        .context("kubeconfig has no current context")?;
    let cluster_name = config
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .context("current context not found")?;
    let entry = config
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.clone())
        .context("cluster not found")?;
    match field {
        "server" => entry.server.context("cluster has no server"),
        _ => entry
            .certificate_authority_data
            .context("cluster has no certificate-authority-data"),
    }
}
