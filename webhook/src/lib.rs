//! The cluster's gate as a library: the admission decisions, the AdmissionReview
//! wire format, the watched state the decisions read, the HTTPS server with
//! certificate reload, and its metrics.
//!
//! The binary (`src/main.rs`) only parses flags and calls [`server::run`]; the
//! integration tests, the fuzz target and the load generator use the same
//! pieces in-process.

pub mod handler;
pub mod image_ref;
pub mod join;
pub mod metrics;
pub mod reattest;
pub mod review;
pub mod server;
pub mod state;
pub mod validate;
pub mod verify;

#[cfg(test)]
mod property_seed;
