//! The cloud abstraction: how the node operator gets and removes machines.
//!
//! A provider creates a machine for a pool and a node image under a node name
//! the controller chose (so the Node, the NodeAttestation and the PendingNode
//! all share it) and deletes a machine by that name. Every call must be
//! idempotent: the controller repeats calls after a restart. Implementations:
//! [`RecordOnly`] here; the simulated cloud of the test environment
//! (`confidential_testenv::cloud`) and the swtpm machines of the playground
//! (`confidential-playground`). A Cluster API provider maps machines to
//! `Machine` objects (name = node name, `spec.bootstrap.dataSecretName`
//! carrying the image); a scaling-group provider maps them to instances it
//! launches with the node name in user data and deletes by instance id.

use futures::future::BoxFuture;

/// Errors of a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused or failed the request; worth retrying later.
    #[error("provider request failed: {0}")]
    Failed(String),
    /// A Kubernetes API call of the provider failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
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
    /// Removes a control-plane node from etcd membership before its Node is
    /// deleted. Providers without control-plane machines keep the default.
    fn leave_control_plane<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        let _ = node;
        Box::pin(async { Ok(()) })
    }
}

/// A provider that only records: machines are the PendingNodes the
/// controller writes, and something outside (an admin, a Cluster API or
/// autoscaler bridge watching PendingNodes) creates and deletes them.
pub struct RecordOnly;

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
}
