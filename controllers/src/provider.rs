//! The cloud abstraction: how the node operator gets and removes machines.
//!
//! A provider creates a machine for a pool and a node image under a node name
//! the controller chose (so the Node, the NodeAttestation and the PendingNode
//! all share it) and deletes a machine by that name. Every call must be
//! idempotent: the controller repeats calls after a restart.
//! Implementations: [`RecordOnly`], the shipped one (machines are the
//! PendingNodes it records; a Cluster API or autoscaler bridge creates
//! them), and the test environment's simulated cloud
//! (`confidential_testenv::cloud`, for suites, benchmarks and the
//! playground; never in a shipped binary). A Cluster API provider maps
//! machines to `Machine` objects (name = node name,
//! `spec.bootstrap.dataSecretName` carrying the image); a scaling-group
//! provider maps them to instances it launches with the node name in user
//! data and deletes by instance id. Control-plane machines also leave etcd
//! before they go ([`Provider::leave_control_plane`], see [`crate::etcd`]).

use futures::future::BoxFuture;

pub use crate::etcd::Leave;
use crate::etcd::{EtcdError, EtcdMembership, NO_ETCD_ACCESS};

/// Errors of a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused or failed the request; worth retrying later.
    #[error("provider request failed: {0}")]
    Failed(String),
    /// A Kubernetes API call of the provider failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// Talking to etcd failed (control-plane membership).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// What the controller asks a provider for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineRequest {
    /// Node name the machine must register as (also the PendingNode name).
    pub name: String,
    /// Node pool (NodeVersion name).
    pub pool: String,
    /// Node image the machine must boot.
    pub image: String,
    /// Kubernetes version of the kubelet.
    pub kubernetes_version: String,
    /// Whether it joins the control plane.
    pub control_plane: bool,
}

/// A machine as the provider sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub name: String,
    pub pool: String,
    pub image: String,
    /// Provider-specific id (`providerID` of the Node when it registers).
    pub provider_id: String,
}

/// Creates and deletes machines. Object-safe so the controller can hold
/// `Arc<dyn Provider>`.
pub trait Provider: Send + Sync + 'static {
    /// Creates the machine (or returns the existing one of that name).
    fn create_machine<'a>(
        &'a self,
        request: &'a MachineRequest,
    ) -> BoxFuture<'a, Result<Machine, ProviderError>>;
    /// Deletes the machine; deleting a missing machine succeeds.
    fn delete_machine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Whether this provider can take control-plane machines out of etcd;
    /// `Err` says what is missing. A control-plane pool changes nothing
    /// while it fails (the operator never strands an etcd member).
    fn control_plane_membership(&self) -> Result<(), String>;
    /// Removes a control-plane node from etcd before its machine and Node
    /// are deleted, or says why it must wait (quorum, the heir's member).
    /// Only control-plane pools call it. No default: each provider says what
    /// leaving means for its machines (a Cluster API provider whose control
    /// plane provider removes members itself answers `Left`).
    fn leave_control_plane<'a>(
        &'a self,
        request: &'a LeaveRequest,
    ) -> BoxFuture<'a, Result<Leave, ProviderError>>;
}

/// A control-plane node about to be replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaveRequest {
    /// The donor's node name (its etcd member is named after it).
    pub node: String,
    /// Its pool (NodeVersion name).
    pub pool: String,
    /// The voters the pool wants: fewer may not remain after the removal.
    pub replicas: u32,
}

/// A provider that only records: machines are the PendingNodes the
/// controller writes, and something outside (an admin, a Cluster API or
/// autoscaler bridge watching PendingNodes) creates and deletes them. The
/// operator itself removes control-plane donors from etcd when it was given
/// etcd access (`--etcd-*` flags); without it, control-plane pools do not
/// roll.
#[derive(Clone, Default)]
pub struct RecordOnly {
    etcd: Option<EtcdMembership>,
}

impl RecordOnly {
    /// Without etcd access: worker pools only.
    pub fn new() -> Self {
        Self::default()
    }

    /// With etcd access: control-plane pools roll too.
    pub fn with_etcd(etcd: EtcdMembership) -> Self {
        Self { etcd: Some(etcd) }
    }
}

impl Provider for RecordOnly {
    fn create_machine<'a>(
        &'a self,
        request: &'a MachineRequest,
    ) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            Ok(Machine {
                name: request.name.clone(),
                pool: request.pool.clone(),
                image: request.image.clone(),
                provider_id: String::new(),
            })
        })
    }

    fn delete_machine<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    fn control_plane_membership(&self) -> Result<(), String> {
        match self.etcd {
            Some(_) => Ok(()),
            None => Err(NO_ETCD_ACCESS.to_owned()),
        }
    }

    fn leave_control_plane<'a>(
        &'a self,
        request: &'a LeaveRequest,
    ) -> BoxFuture<'a, Result<Leave, ProviderError>> {
        Box::pin(async move {
            let etcd = self
                .etcd
                .as_ref()
                .ok_or_else(|| ProviderError::Failed(NO_ETCD_ACCESS.to_owned()))?;
            Ok(etcd.leave(&request.node, request.replicas).await?)
        })
    }
}
