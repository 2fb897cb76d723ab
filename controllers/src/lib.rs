//! The node operator of kubectl-confidential as a library: the pure rollout
//! planner and, at the edges, the reconciler, the machine providers, the
//! kubelet CSR approver and leader election that talk to the Kubernetes API.
//! The `confidential-controllers` binary wires them up. Simulated machines
//! and the simulated world of the tests live in the test environment
//! (`confidential-testenv`), never here.

pub mod csr;
pub mod etcd;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod planner;
pub mod provider;
pub mod reconciler;
