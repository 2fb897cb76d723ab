//! Support shared by suites of this crate and its benchmarks (each includes
//! only what it uses, so some items are unused in some of them).

#![allow(dead_code)]

pub mod reattest;
