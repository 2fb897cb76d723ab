//! The gate's re-attestation flags (flattened into its command line).

use std::time::Duration;

/// Flags of continuous re-attestation (flattened into the gate's flags).
#[derive(clap::Args, Debug, Clone)]
pub struct ReattestArgs {
    /// Time between two re-attestation sweeps; `0s` turns re-attestation
    /// off. Keep it well below the policy's `reattestationInterval`.
    #[arg(long = "reattest-period", default_value = "5m", value_parser = confidential_api::duration::parse_flag, env = "CONFIDENTIAL_REATTEST_PERIOD")]
    pub period: Duration,
    /// How long a node may fail re-attestation, or not answer, before its
    /// attestation is revoked.
    #[arg(long = "reattest-grace", default_value = "15m", value_parser = confidential_api::duration::parse_flag, env = "CONFIDENTIAL_REATTEST_GRACE")]
    pub grace: Duration,
    /// Port of the nodes' attestation endpoint (the bootstrapper's
    /// `--attest-listen`), used with the Node's InternalIP when the join
    /// recorded no endpoint.
    #[arg(
        long = "reattest-port",
        default_value_t = 9444,
        env = "CONFIDENTIAL_REATTEST_PORT"
    )]
    pub port: u16,
    /// Nodes re-verified at the same time.
    #[arg(
        long = "reattest-concurrency",
        default_value_t = 16,
        env = "CONFIDENTIAL_REATTEST_CONCURRENCY"
    )]
    pub concurrency: usize,
    /// Bound on connecting to a node and receiving its evidence.
    #[arg(long = "reattest-timeout", default_value = "10s", value_parser = confidential_api::duration::parse_flag, env = "CONFIDENTIAL_REATTEST_TIMEOUT")]
    pub timeout: Duration,
}
