//! The one way the webhook's property tests are seeded: a new seed per run
//! (so every CI run explores new cases), printed so a failure can be replayed
//! with `PROPTEST_SEED=<seed>`, and the cases found kept as regressions
//! beside the test's source file (`<file>.regressions`), replayed first on
//! every run.

use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};

/// The configuration of the property test `name` with `cases` cases.
pub fn config(name: &str, cases: u32) -> Config {
    let seed = std::env::var("PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{name} properties: PROPTEST_SEED={seed}");
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    }
}
