//! The environment of the control-plane pool tests: a real control plane
//! with the CRDs, three control-plane machines on V1 with their NodeVersion,
//! a real etcd whose members are named after machines, and the operator.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use confidential_api::conditions::types;
use confidential_api::keys::{LABEL_NODE_POOL, NAMESPACE};
use confidential_api::{NodeVersion, NodeVersionSpec, RolloutStrategy};
use confidential_controllers::etcd::{EtcdMembership, EtcdSettings};
use confidential_controllers::metrics::Metrics;
use confidential_controllers::operator;
use confidential_controllers::provider::{MachineRequest, Provider};
use confidential_controllers::reconciler::Settings;
use confidential_testenv::cloud::{CloudConfig, SimulatedCloud};
use confidential_testenv::etcd::EtcdCluster;
use confidential_testenv::{
    TestCluster, client_from_kubeconfig, eventually, install_crds, unique_name,
};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use super::machines::{ETCD_START, EtcdMachines};

pub const V1: &str = "registry.example/cp-image:v1";
pub const V2: &str = "registry.example/cp-image:v2";
pub const K8S: &str = "v1.35.4";
pub const WAIT: Duration = Duration::from_secs(300);

pub struct Env {
    _cluster: TestCluster,
    pub client: Client,
    pub sim: SimulatedCloud,
    pub pool: String,
    /// Names of the first machines (the etcd members the cluster starts with).
    pub initial: Vec<String>,
}

pub async fn cluster() -> Result<(TestCluster, Client)> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &confidential_testenv::crds_dir()).await?;
    let client = client_from_kubeconfig(&cluster.kubeconfig).await?;
    let created = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": NAMESPACE } }))?,
        )
        .await;
    match created {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    Ok((cluster, client))
}

/// A control plane, three control-plane machines on V1 and their NodeVersion.
pub async fn setup() -> Result<Env> {
    let (cluster, client) = cluster().await?;
    let sim =
        SimulatedCloud::new(client.clone(), &cluster.kubeconfig, CloudConfig::default()).await?;
    let pool = unique_name("cp");
    let initial: Vec<String> = (0..3).map(|i| format!("{pool}-v1-{i}")).collect();
    for name in &initial {
        sim.adopt(&MachineRequest {
            name: name.clone(),
            pool: pool.clone(),
            image: V1.into(),
            kubernetes_version: K8S.into(),
            control_plane: true,
        })
        .await?;
    }
    Api::<NodeVersion>::all(client.clone())
        .create(
            &PostParams::default(),
            &NodeVersion::new(
                &pool,
                NodeVersionSpec {
                    image: V1.into(),
                    kubernetes_version: K8S.into(),
                    replicas: 3,
                    control_plane: true,
                    strategy: RolloutStrategy::default(),
                },
            ),
        )
        .await?;
    Ok(Env {
        _cluster: cluster,
        client,
        sim,
        pool,
        initial,
    })
}

pub fn settings_for(etcd: &mut EtcdCluster) -> EtcdSettings {
    EtcdSettings {
        endpoints: etcd.endpoints(),
        ca_pem: etcd.ca_pem.clone(),
        cert_pem: etcd.client.cert_pem.clone(),
        key_pem: etcd.client.key_pem.clone(),
    }
}

pub async fn start_etcd(
    names: &[String],
) -> Result<(Arc<tokio::sync::Mutex<EtcdCluster>>, EtcdMembership)> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut etcd = EtcdCluster::start(&names, ETCD_START).await?;
    let membership = EtcdMembership::new(&settings_for(&mut etcd))?;
    // The cluster has formed when a quorum read succeeds with every member
    // started and healthy.
    eventually("etcd cluster formed", WAIT, || async {
        Ok(membership.members().await.ok().filter(|m| {
            m.len() == names.len() && m.iter().all(|m| m.member.started() && m.healthy)
        }))
    })
    .await?;
    Ok((Arc::new(tokio::sync::Mutex::new(etcd)), membership))
}

pub fn operator_for(env: &Env, provider: Arc<dyn Provider>) -> JoinHandle<()> {
    tokio::spawn(operator::run(
        env.client.clone(),
        provider,
        Metrics::new(),
        Settings {
            busy_requeue: Duration::from_millis(500),
            idle_requeue: Duration::from_secs(5),
            max_join_attempts: 3,
            join_retry_backoff: 1,
        },
        None,
    ))
}

pub async fn set_image(env: &Env, image: &str) -> Result<()> {
    Api::<NodeVersion>::all(env.client.clone())
        .patch(
            &env.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "image": image } })),
        )
        .await?;
    Ok(())
}

pub async fn pool_nodes(env: &Env) -> Result<Vec<String>> {
    let mut names: Vec<String> = Api::<Node>::all(env.client.clone())
        .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={}", env.pool)))
        .await?
        .iter()
        .map(|n| n.name_any())
        .collect();
    names.sort();
    Ok(names)
}

/// The pool's RolloutBlocked condition once it is true: (reason, message).
pub async fn blocked(env: &Env) -> Result<Option<(String, String)>> {
    let nv = Api::<NodeVersion>::all(env.client.clone())
        .get(&env.pool)
        .await?;
    Ok(nv.status.and_then(|s| {
        s.conditions
            .into_iter()
            .find(|c| c.type_ == types::ROLLOUT_BLOCKED && c.status == "True")
            .map(|c| (c.reason, c.message))
    }))
}

pub fn machines(
    env: &Env,
    etcd: &Arc<tokio::sync::Mutex<EtcdCluster>>,
    membership: &EtcdMembership,
    join_etcd: bool,
) -> Arc<EtcdMachines> {
    Arc::new(EtcdMachines {
        sim: env.sim.clone(),
        etcd: etcd.clone(),
        membership: membership.clone(),
        join_etcd,
        violations: Arc::new(Mutex::new(Vec::new())),
    })
}
