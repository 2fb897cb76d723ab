//! Attestation for kubectl-confidential: evidence types, issuers (TPM, SEV-SNP),
//! pure-Rust validators, signed measurements, attested TLS and key derivation.
//!
//! Validators take evidence and policy as data and return a verdict; they do no
//! I/O, which keeps them fast to test and to benchmark.
