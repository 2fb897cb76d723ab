//! Control-plane machines for the pool tests: the simulated cloud (Node,
//! NodeAttestation, kubelet stand-in) plus, per machine, a real etcd member
//! of a real three-member cluster. A machine joins etcd as a joining
//! control-plane machine does (`member add` with its peer URL, then its etcd
//! starts with `--initial-cluster-state=existing`); deleting a machine stops
//! its etcd. Leaving the control plane is the operator's own etcd code.
//!
//! The provider also checks the order the operator must keep: a machine
//! deleted while its member is still in etcd is recorded as a violation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use confidential_controllers::etcd::{
    EtcdError, EtcdMembership, Leave, Member, is_reconfiguration_refusal,
};
use confidential_controllers::provider::{
    LeaveRequest, Machine, MachineRequest, Provider, ProviderError,
};
use confidential_testenv::cloud::SimulatedCloud;
use confidential_testenv::etcd::{EtcdCluster, MemberSlot};
use confidential_testenv::eventually;
use futures::future::BoxFuture;

pub const ETCD_START: Duration = Duration::from_secs(60);

/// See the module documentation.
pub struct EtcdMachines {
    pub sim: SimulatedCloud,
    pub etcd: Arc<tokio::sync::Mutex<EtcdCluster>>,
    pub membership: EtcdMembership,
    /// When false, new machines boot without joining etcd (a heir whose
    /// etcd never comes up).
    pub join_etcd: bool,
    pub violations: Arc<Mutex<Vec<String>>>,
}

impl EtcdMachines {
    fn violation(&self, text: String) {
        self.violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(text);
    }

    /// What the machine's boot does before its kubelet: add its member and
    /// start its etcd (once; creation is repeated after restarts).
    async fn join_etcd(&self, name: &str) -> anyhow::Result<()> {
        let mut etcd = self.etcd.lock().await;
        if etcd.started().iter().any(|n| n == name) {
            return Ok(());
        }
        let slot = etcd.reserve(name)?;
        let members = add_member(&self.membership, &slot.peer_url).await?;
        etcd.join(slot.clone(), &initial_cluster(&members, &slot), ETCD_START)
            .await
    }
}

/// `member add` as a joining machine does it: retried while etcd's own
/// guard refuses (members connected for less than its health interval).
pub async fn add_member(
    membership: &EtcdMembership,
    peer_url: &str,
) -> anyhow::Result<Vec<Member>> {
    let peer = [peer_url.to_owned()];
    eventually("etcd accepts the new member", ETCD_START, || async {
        match membership.client().member_add(&peer).await {
            Ok(members) => Ok(Some(members)),
            Err(EtcdError::Refused { message, .. }) if is_reconfiguration_refusal(&message) => {
                Ok(None)
            }
            Err(err) => Err(err.into()),
        }
    })
    .await
}

/// `--initial-cluster` of a joining member: the started members and itself.
pub fn initial_cluster(members: &[Member], slot: &MemberSlot) -> Vec<(String, String)> {
    let mut initial: Vec<(String, String)> = members
        .iter()
        .filter(|m| m.started())
        .filter_map(|m| Some((m.name.clone(), m.peer_urls.first()?.clone())))
        .collect();
    initial.push((slot.name.clone(), slot.peer_url.clone()));
    initial
}

impl Provider for EtcdMachines {
    fn create_machine<'a>(
        &'a self,
        request: &'a MachineRequest,
    ) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            if request.control_plane && self.join_etcd {
                self.join_etcd(&request.name)
                    .await
                    .map_err(|e| ProviderError::Failed(format!("{e:#}")))?;
            }
            self.sim.create_machine(request).await
        })
    }

    fn delete_machine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            match self.membership.client().member_list().await {
                Ok(members) if members.iter().any(|m| m.name == name) => self.violation(format!(
                    "machine {name} deleted while it is still an etcd member"
                )),
                Ok(_) => {}
                Err(err) => self.violation(format!(
                    "no quorum to check {name}'s membership before its deletion: {err}"
                )),
            }
            self.etcd.lock().await.stop(name);
            self.sim.delete_machine(name).await
        })
    }

    fn control_plane_membership(&self) -> Result<(), String> {
        Ok(())
    }

    fn leave_control_plane<'a>(
        &'a self,
        request: &'a LeaveRequest,
    ) -> BoxFuture<'a, Result<Leave, ProviderError>> {
        Box::pin(async move {
            Ok(self
                .membership
                .leave(&request.node, request.replicas)
                .await?)
        })
    }
}
