//! The attested join and rejoin endpoints of the gate, on their own aTLS
//! listener (not the admission server's TLS: the node cannot know a cluster
//! CA before it joined, and attestation is bound to *this* TLS channel).
//!
//! A join is accepted only when, in order: the request parses; the node's
//! pool (NodeVersion) wants an image that the AttestationPolicy lists with a
//! measurement file signed by a trusted publisher (the same check as
//! admission); the evidence verifies against the policy's trust roots, is
//! bound to this connection's exporter, and its PCRs match the image's
//! measurements (warnOnly honoured); the node name is not recorded for a
//! different attesting key; a known machine asks for its recorded disk; and,
//! for TPM evidence, the node activated the credential challenge on the same
//! connection (AK proven to live next to the certified EK). Only then does
//! the gate write the NodeAttestation (conditionally: the API server
//! serializes concurrent joins for one name) and a single-use, short-TTL
//! bootstrap token bound to the node name, and answer with the secrets.
//! Every refusal answers `{reason, message}` and counts in
//! `join_refusals_total{reason}`; nothing is written before the last check.
//!
//! Modules, one job each: [`args`] (flags, master-secret file, gate pin),
//! [`decide`] (the pure decision), [`record`] (what is written and handed
//! out), [`token`] (bootstrap tokens), [`limit`] (attempts per source),
//! [`metrics`], [`server`] (the listener and the I/O around the decision).

pub mod args;
pub mod decide;
pub mod limit;
pub mod metrics;
pub mod record;
pub mod server;
pub mod token;

pub use args::{JoinArgs, gate_pin, read_master_secret};
pub use decide::{Mode, Reason, Refusal};
pub use limit::AttemptLimit;
pub use metrics::JoinMetrics;
pub use server::{Gate, GateConfig, MAX_JOIN_BODY_BYTES, ca_pin, run, serve};
