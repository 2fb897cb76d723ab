//! The node operator of kubectl-confidential as a library: the pure rollout
//! planner, a simulated world for testing and benchmarking it, and (at the
//! edges) the executor, reconciler, providers and CSR approver that talk to
//! the Kubernetes API. The `confidential-controllers` binary wires them up.

pub mod csr;
pub mod etcd;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod planner;
pub mod provider;
pub mod reconciler;
pub mod sim;
pub mod sim_provider;
