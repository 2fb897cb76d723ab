//! Control-plane pools keep etcd quorum, on real components: the test
//! environment's control plane (kube-apiserver, kube-controller-manager, ...)
//! runs the operator against a real NodeVersion, and the pool's machines each
//! own a member of a real three-member etcd (the cached etcd binary, mutual
//! TLS on client and peer URLs). A watcher samples etcd throughout every roll
//! and fails on any loss of quorum, of fault tolerance, or of a member that
//! was never removed.

mod control_plane_pool {
    pub mod env;
    pub mod machines;
    pub mod quorum_watch;
}

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use confidential_api::conditions::{is_true, types};
use confidential_api::keys::LABEL_NODE_POOL;
use confidential_api::{NodeVersion, PendingNode};
use confidential_controllers::etcd::{EtcdMembership, EtcdSettings, Leave};
use confidential_controllers::provider::RecordOnly;
use confidential_testenv::eventually;
use confidential_testenv::pki::CertificateAuthority;
use control_plane_pool::env::{
    V2, WAIT, blocked, machines, operator_for, pool_nodes, set_image, settings_for, setup,
    start_etcd,
};
use control_plane_pool::machines::{ETCD_START, add_member, initial_cluster};
use control_plane_pool::quorum_watch::QuorumWatch;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_a_control_plane_pool_keeps_etcd_quorum() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let env = setup().await?;
    let (etcd, membership) = start_etcd(&env.initial).await?;
    let provider = machines(&env, &etcd, &membership, true);
    let watch = QuorumWatch::start(membership.clone(), etcd.clone(), 3);
    let operator = operator_for(&env, provider.clone());
    set_image(&env, V2).await?;

    let started = std::time::Instant::now();
    let rolled = eventually("control-plane pool rolled to V2", WAIT, || async {
        let nv = Api::<NodeVersion>::all(env.client.clone())
            .get(&env.pool)
            .await?;
        let Some(status) = nv.status else {
            return Ok(None);
        };
        let nodes = pool_nodes(&env).await?;
        let done = status.up_to_date_count == 3
            && status.outdated_count == 0
            && status.donors.is_empty()
            && status.pending.is_empty()
            && nodes.len() == 3
            && nodes.iter().all(|n| !env.initial.contains(n))
            && !is_true(&status.conditions, types::ROLLOUT_PROGRESSING);
        Ok(done.then_some(nodes))
    })
    .await;
    let took = started.elapsed();
    let nodes = match rolled {
        Ok(nodes) => nodes,
        Err(err) => {
            // Say what the watcher and the provider saw, not only the timeout.
            let report = watch.finish().await?;
            let order = provider
                .violations
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default();
            anyhow::bail!(
                "{err:#}; etcd watcher: {:#?}; machine order: {order:#?}",
                report.violations
            );
        }
    };
    // etcd's members are exactly the new nodes, all healthy.
    let members = eventually("etcd members are the new nodes", WAIT, || async {
        let members = membership.members().await?;
        let mut names: Vec<String> = members.iter().map(|m| m.member.name.clone()).collect();
        names.sort();
        Ok((names == nodes && members.iter().all(|m| m.healthy)).then_some(names))
    })
    .await?;
    let report = watch.finish().await?;
    operator.abort();
    eprintln!(
        "control-plane roll of 3 members: {took:?}; watcher: {} samples, at most {} voters, at least {} started voters, longest without a quorum read {:?}",
        report.samples, report.max_voters, report.min_started_voters, report.longest_without_quorum
    );
    assert!(
        report.violations.is_empty(),
        "etcd lost quorum or a member: {:#?}",
        report.violations
    );
    let order = provider
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(order.is_empty(), "{order:#?}");
    assert!(
        report.samples >= 10,
        "the watcher sampled only {} times",
        report.samples
    );
    // The heir's member was added before the donor's was removed.
    assert_eq!(
        report.max_voters, 4,
        "never saw the heir and the donor as members together"
    );
    assert!(report.min_started_voters >= 3);
    // Every donor's etcd left the cluster and stopped.
    let mut etcd = etcd.lock().await;
    for donor in &env.initial {
        assert!(!members.contains(donor), "{donor} is still a member");
        assert!(!etcd.running(donor), "{donor}'s etcd still runs");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_donor_whose_heir_never_joins_etcd_keeps_its_member_and_machine() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let env = setup().await?;
    let (etcd, membership) = start_etcd(&env.initial).await?;
    let provider = machines(&env, &etcd, &membership, false);
    let watch = QuorumWatch::start(membership.clone(), etcd.clone(), 3);
    let operator = operator_for(&env, provider.clone());
    set_image(&env, V2).await?;

    let (reason, message) = eventually("the roll waits for etcd", WAIT, || async {
        Ok(blocked(&env).await?.filter(|(r, _)| r == "EtcdQuorumWait"))
    })
    .await?;
    assert!(
        message.contains("waiting for its heir's member to join etcd"),
        "{reason}: {message}"
    );
    // It keeps waiting: the donor's Node, machine and member all stay.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let nodes = pool_nodes(&env).await?;
    for donor in &env.initial {
        assert!(nodes.contains(donor), "{donor} was deleted: {nodes:?}");
    }
    let mut names: Vec<String> = membership
        .client()
        .member_list()
        .await?
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    assert_eq!(names, env.initial);
    let waiting = eventually("a Warning Event on the waiting donor", WAIT, || async {
        let events = Api::<Event>::all(env.client.clone())
            .list(&ListParams::default())
            .await?;
        Ok(events
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("EtcdRemovalWaiting")
                    && e.type_.as_deref() == Some("Warning")
                    && e.involved_object
                        .name
                        .as_ref()
                        .is_some_and(|n| env.initial.contains(n))
            })
            .and_then(|e| e.message))
    })
    .await?;
    assert!(waiting.contains("pool wants 3"), "{waiting}");
    let report = watch.finish().await?;
    operator.abort();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    let order = provider
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(order.is_empty(), "{order:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_that_would_lose_quorum_or_strength_is_refused() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let names: Vec<String> = ["cp-a", "cp-b", "cp-c"].map(String::from).to_vec();
    let (etcd, membership) = start_etcd(&names).await?;
    let listed = || async {
        let mut names: Vec<String> = membership
            .client()
            .member_list()
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        names.sort();
        anyhow::Ok(names)
    };

    // 1. No heir: three members, the pool wants three.
    let Leave::Wait(reason) = membership.leave("cp-a", 3).await? else {
        panic!("cp-a removed although no heir joined");
    };
    assert!(
        reason.contains("would leave 2 voting members, the pool wants 3"),
        "{reason}"
    );
    assert_eq!(listed().await?, names);

    // A heir joins as a control-plane machine does.
    let slot = etcd.lock().await.reserve("cp-d")?;
    let members = add_member(&membership, &slot.peer_url).await?;
    // 2. Added but not started yet: it cannot vote.
    let Leave::Wait(reason) = membership.leave("cp-a", 3).await? else {
        panic!("cp-a removed while its heir had not started");
    };
    assert!(reason.contains("not started"), "{reason}");
    let initial = initial_cluster(&members, &slot);
    etcd.lock().await.join(slot, &initial, ETCD_START).await?;
    eventually("cp-d healthy", WAIT, || async {
        Ok(membership
            .members()
            .await
            .ok()
            .filter(|m| m.len() == 4 && m.iter().all(|m| m.healthy)))
    })
    .await?;

    // 3. Another member is down: removing cp-a would leave 3 voters with 2
    //    healthy, one failure from losing quorum.
    etcd.lock().await.stop("cp-b");
    let reason = eventually("removal refused while cp-b is down", WAIT, || async {
        Ok(match membership.leave("cp-a", 3).await? {
            Leave::Wait(reason) => Some(reason),
            Leave::Left => anyhow::bail!("cp-a removed while cp-b was down"),
        })
    })
    .await?;
    assert!(reason.contains("not healthy (cp-b)"), "{reason}");
    let mut expected = vec!["cp-a", "cp-b", "cp-c", "cp-d"];
    expected.sort_unstable();
    assert_eq!(listed().await?, expected);

    // 4. A node without a member has left (nothing removed).
    assert_eq!(membership.leave("cp-x", 3).await?, Leave::Left);
    assert_eq!(listed().await?, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_cluster_with_the_heir_lets_the_donor_leave_and_its_etcd_stops() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let names: Vec<String> = ["cp-a", "cp-b", "cp-c", "cp-d"].map(String::from).to_vec();
    let (etcd, membership) = start_etcd(&names).await?;
    // etcd counts a member active once connected for its health interval
    // (5 s); until then its own guard refuses, which is a wait.
    eventually("cp-a left etcd", WAIT, || async {
        Ok(match membership.leave("cp-a", 3).await? {
            Leave::Left => Some(()),
            Leave::Wait(reason) => {
                anyhow::ensure!(reason.contains("etcd refuses"), "{reason}");
                None
            }
        })
    })
    .await?;
    let left: Vec<String> = membership
        .client()
        .member_list()
        .await?
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert!(
        !left.contains(&"cp-a".to_owned()) && left.len() == 3,
        "{left:?}"
    );
    eventually("cp-a's etcd stops once removed", WAIT, || async {
        Ok((!etcd.lock().await.running("cp-a")).then_some(()))
    })
    .await?;
    // Idempotent: asked again (after a crash), it has left.
    assert_eq!(membership.leave("cp-a", 3).await?, Leave::Left);
    // Now at the pool's strength: the next removal waits for a heir.
    assert!(matches!(membership.leave("cp-b", 3).await?, Leave::Wait(_)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_access_is_mutual_tls_with_the_configured_ca() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let names: Vec<String> = ["cp-a"].map(String::from).to_vec();
    let (etcd, _membership) = start_etcd(&names).await?;
    let good = settings_for(&mut *etcd.lock().await);
    let other = CertificateAuthority::new("someone-else")?;
    let stranger = other.issue_client("confidential-controllers", None)?;

    // A server whose certificate the configured CA did not sign is refused.
    let impostor = EtcdMembership::new(&EtcdSettings {
        ca_pem: other.cert.cert_pem.clone(),
        ..good.clone()
    })?;
    let err = impostor
        .client()
        .member_list()
        .await
        .err()
        .context("trusted an etcd the CA did not sign")?;
    assert!(err.to_string().contains("certificate"), "{err}");

    // A client certificate from another CA is refused by etcd.
    let outsider = EtcdMembership::new(&EtcdSettings {
        cert_pem: stranger.cert_pem,
        key_pem: stranger.key_pem,
        ..good.clone()
    })?;
    assert!(
        outsider.client().member_list().await.is_err(),
        "etcd served a client of another CA"
    );
    assert!(outsider.leave("cp-a", 0).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_plane_pool_does_not_roll_without_etcd_access() -> Result<()> {
    confidential_testenv::install_crypto_provider();
    let env = setup().await?;
    let operator = operator_for(&env, Arc::new(RecordOnly::new()));
    set_image(&env, V2).await?;
    let (_, message) = eventually("the pool is blocked for etcd access", WAIT, || async {
        Ok(blocked(&env).await?.filter(|(r, _)| r == "EtcdUnavailable"))
    })
    .await?;
    assert!(message.contains("--etcd-endpoints"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pending = Api::<PendingNode>::all(env.client.clone())
        .list(&ListParams::default())
        .await?;
    assert!(
        pending.items.is_empty(),
        "machines requested: {:?}",
        pending
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    );
    assert_eq!(pool_nodes(&env).await?, env.initial);
    let cordoned = Api::<Node>::all(env.client.clone())
        .list(&ListParams::default().labels(&format!("{LABEL_NODE_POOL}={}", env.pool)))
        .await?
        .iter()
        .filter(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
        })
        .count();
    assert_eq!(cordoned, 0);
    operator.abort();
    Ok(())
}

#[test]
fn the_operator_refuses_partial_or_plain_http_etcd_flags() -> Result<()> {
    let binary = env!("CARGO_BIN_EXE_confidential-controllers");
    for (args, expected) in [
        (
            vec!["--etcd-endpoints", "https://127.0.0.1:2379"],
            "missing --etcd-ca-file, --etcd-cert-file, --etcd-key-file",
        ),
        (
            vec![
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "--etcd-ca-file",
                "/x",
                "--etcd-cert-file",
                "/x",
                "--etcd-key-file",
                "/x",
            ],
            "not an https:// URL",
        ),
        (
            vec![
                "--etcd-endpoints",
                "https://127.0.0.1:2379",
                "--etcd-ca-file",
                "/nonexistent/ca.crt",
                "--etcd-cert-file",
                "/x",
                "--etcd-key-file",
                "/x",
            ],
            "--etcd-ca-file /nonexistent/ca.crt",
        ),
    ] {
        let output = std::process::Command::new(binary)
            .args(&args)
            .arg("--no-leader-election")
            .env("KUBECONFIG", "/nonexistent")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    Ok(())
}
