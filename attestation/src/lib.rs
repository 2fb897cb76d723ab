//! Attestation for kubectl-confidential: evidence types, issuers (TPM, SEV-SNP),
//! pure-Rust validators, signed measurements, attested TLS and key derivation.
//!
//! Validators take evidence and policy as data and return a verdict; they do no
//! I/O, which keeps them fast to test and to benchmark. The TPM issuer (which
//! links libtss2) sits behind the `tpm` cargo feature so that only the
//! bootstrapper pulls in the C libraries; the gate verifies in pure Rust.

pub mod atls;
pub mod evidence;
pub mod kdf;
pub mod measurements;
pub mod predict;
pub mod protocol;
pub mod snp;
pub mod tpm;
pub mod verify;
mod wire;

pub use evidence::{Evidence, EvidenceEnvelope, EvidenceKind, SnpEvidence, TpmEvidence};
