//! The test environment of kubectl-confidential: a real Kubernetes control
//! plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) that
//! the end-to-end suites and the local playground start on loopback.
//!
//! [`TestCluster::start`] is the entry point. By default it builds (once) and
//! starts a private control plane per call; with `CONFIDENTIAL_TEST_KUBECONFIG`
//! set it uses that existing cluster instead (kind, k3d, a real cluster), so
//! users can run our suites against their own clusters. Tests create their
//! objects under unique names so runs against a shared cluster do not collide.

pub mod binaries;
pub mod cloud;
pub mod controlplane;
pub mod csr;
pub mod etcd;
pub mod fixtures;
pub mod kubelet;
pub mod node;
pub mod peers;
pub mod pki;
mod process;
pub mod standin;
pub mod swtpm;
pub mod vm;
pub mod world;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use kube::Client;

mod wait;

pub use controlplane::{ControlPlane, ControlPlaneOptions, client_kubeconfig, token_kubeconfig};
pub use process::ManagedProcess;
pub use wait::eventually;

/// Environment variable naming an existing cluster's kubeconfig to test against.
pub const EXISTING_CLUSTER_ENV: &str = "CONFIDENTIAL_TEST_KUBECONFIG";

/// Installs the ring crypto provider for rustls once per process (the
/// binaries' own start-up, [`confidential_startup::install_crypto_provider`]).
pub fn install_crypto_provider() {
    confidential_startup::install_crypto_provider();
}

/// Builds a client from a kubeconfig file, as the binaries do
/// ([`confidential_startup::kube_client`]: kube's silent retry of 429
/// responses off, since an eviction refused by a PodDisruptionBudget is a 429
/// the caller must see).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    install_crypto_provider();
    Ok(confidential_startup::kube_client(Some(path)).await?)
}

/// A cluster to test against: a private control plane, or an existing one.
pub struct TestCluster {
    pub client: Client,
    /// Path of an admin kubeconfig for this cluster.
    pub kubeconfig: PathBuf,
    /// The started control plane; `None` when testing an existing cluster.
    pub control_plane: Option<ControlPlane>,
}

impl TestCluster {
    /// Starts a private control plane, or connects to the cluster named by
    /// `CONFIDENTIAL_TEST_KUBECONFIG`.
    pub async fn start() -> Result<Self> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// Like [`TestCluster::start`], with options for a private control plane.
    pub async fn start_with(options: ControlPlaneOptions) -> Result<Self> {
        install_crypto_provider();
        if let Some(path) = std::env::var_os(EXISTING_CLUSTER_ENV) {
            let kubeconfig = PathBuf::from(path);
            let client = client_from_kubeconfig(&kubeconfig).await?;
            return Ok(Self {
                client,
                kubeconfig,
                control_plane: None,
            });
        }
        let control_plane = ControlPlane::start(options).await?;
        Ok(Self {
            client: control_plane.client().await?,
            kubeconfig: control_plane.kubeconfig.clone(),
            control_plane: Some(control_plane),
        })
    }
}

/// A name unique within this process and across processes, for objects a
/// test creates (`prefix-<pid>-<n>`), valid as a DNS label.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The committed CRD manifests (`manifests/crds/`).
pub fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds")
}

/// Applies every CRD manifest in `dir` (server-side apply) and waits until
/// each is Established. Returns their names.
pub async fn install_crds(client: &Client, dir: &Path) -> Result<Vec<String>> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let yaml = std::fs::read_to_string(&path)?;
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&yaml).with_context(|| format!("parsing {}", path.display()))?;
        let name = crd.metadata.name.clone().context("CRD without name")?;
        crds.patch(
            &name,
            &PatchParams::apply("confidential-testenv").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying {name}"))?;
        names.push(name);
    }
    for name in &names {
        eventually(
            &format!("{name} Established"),
            std::time::Duration::from_secs(30),
            || {
                let crds = crds.clone();
                async move {
                    let crd = crds.get(name).await?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(established.then_some(()))
                }
            },
        )
        .await?;
    }
    // Established is not the end: until the new resource's storage is
    // initialised, requests get 429 "storage is (re)initializing".
    for crd in crds.list(&Default::default()).await?.items {
        let Some(name) = crd.metadata.name.as_ref().filter(|n| names.contains(n)) else {
            continue;
        };
        let Some(version) = crd.spec.versions.iter().find(|v| v.storage) else {
            continue;
        };
        let resource = kube::core::ApiResource {
            group: crd.spec.group.clone(),
            version: version.name.clone(),
            api_version: format!("{}/{}", crd.spec.group, version.name),
            kind: crd.spec.names.kind.clone(),
            plural: crd.spec.names.plural.clone(),
        };
        let api: Api<kube::core::DynamicObject> = Api::all_with(client.clone(), &resource);
        eventually(
            &format!("{name} storage ready"),
            std::time::Duration::from_secs(30),
            || {
                let api = api.clone();
                async move { Ok(api.list(&Default::default()).await.ok().map(|_| ())) }
            },
        )
        .await?;
    }
    Ok(names)
}

/// Path of a binary of this workspace (`confidential-webhook`, ...): the
/// environment variable `env` when set, else the one in the same target
/// directory as the running executable (`target/<profile>/` or its `deps/`),
/// built with `cargo build -p <package>` when it is missing.
pub fn workspace_binary(name: &str, package: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable without a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        let status =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "-p", package])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .with_context(|| format!("building {package}"))?;
        if !status.success() || !path.exists() {
            anyhow::bail!(
                "{name} is not built at {}; run `cargo build -p {package}` or set {env}",
                path.display()
            );
        }
    }
    Ok(path)
}

/// Path of a file under `manifests/`.
pub fn manifest_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(relative)
}

/// Reads a one-object manifest under `manifests/` as `K`.
pub fn read_manifest<K: serde::de::DeserializeOwned>(relative: &str) -> Result<K> {
    let path = manifest_path(relative);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Server-side applies a cluster-scoped object.
pub async fn apply_cluster_object<K>(client: &Client, object: &K) -> Result<K>
where
    K: kube::Resource<Scope = kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    use kube::api::{Api, Patch, PatchParams};
    let name = object
        .meta()
        .name
        .clone()
        .context("object without a name")?;
    Api::<K>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply("confidential-testenv").force(),
            &Patch::Apply(object),
        )
        .await
        .with_context(|| format!("applying {name}"))
}

/// Grants join tokens what the install grants them
/// (`manifests/base/node-bootstrap.yaml`): submitting kubelet CSRs and the
/// reads `kubeadm join` makes. Every document of the file is applied.
pub async fn allow_node_bootstrap(client: &Client) -> Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use kube::api::{Api, Patch, PatchParams};
    let path = manifest_path("base/node-bootstrap.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    let params = PatchParams::apply("confidential-testenv").force();
    for document in documents {
        let kind = document["kind"].as_str().unwrap_or_default().to_owned();
        let name = document["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = document["metadata"]["namespace"]
            .as_str()
            .unwrap_or("kube-system")
            .to_owned();
        let patch = Patch::Apply(&document);
        let applied = match kind.as_str() {
            "ClusterRole" => Api::<ClusterRole>::all(client.clone())
                .patch(&name, &params, &patch)
                .await
                .map(drop),
            "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(client.clone())
                .patch(&name, &params, &patch)
                .await
                .map(drop),
            "Role" => Api::<Role>::namespaced(client.clone(), &namespace)
                .patch(&name, &params, &patch)
                .await
                .map(drop),
            "RoleBinding" => Api::<RoleBinding>::namespaced(client.clone(), &namespace)
                .patch(&name, &params, &patch)
                .await
                .map(drop),
            other => anyhow::bail!("{}: unexpected kind {other}", path.display()),
        };
        applied.with_context(|| format!("applying {kind} {name}"))?;
    }
    Ok(())
}
