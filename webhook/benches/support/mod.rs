//! Code shared by the admission benchmarks (`loadgen`: our gate alone;
//! `peers`: our gate and Kyverno side by side in one run). Each bench target
//! compiles this module on its own and uses a part of it.
#![allow(dead_code, reason = "shared by two bench targets; each uses a part")]

pub mod client;
pub mod options;
pub mod ours;
pub mod reviews;
