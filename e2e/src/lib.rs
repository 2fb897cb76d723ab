//! Cross-component end-to-end suites: the real gate, bootstrapper and operator
//! against a real control plane with swtpm and VM nodes.
//!
//! The suites live in `tests/` and the benchmarks in `benches/`; the machinery
//! they share (control plane, swtpm, nodes, VMs, fixtures) is the
//! `confidential-testenv` library, which every crate's own suites use too. This
//! library is empty on purpose: a package needs one target besides its tests.
