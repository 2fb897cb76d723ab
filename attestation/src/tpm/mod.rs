//! TPM 2.0 evidence: a pure-Rust verifier of quotes and EK chains, a
//! pure-Rust `TPM2_MakeCredential` (so the gate can challenge an AK without
//! libtss2), and, behind the `tpm` feature, the issuer that talks to a real
//! TPM through tss-esapi.
//!
//! # Why credential activation binds the AK to the EK
//!
//! A TCG-template EK is a restricted *decryption* key: it cannot sign, so it
//! cannot certify an AK (`TPM2_Certify` needs a signing key). The standard way
//! to prove an AK lives in the same TPM as a certified EK is credential
//! activation: the verifier encrypts a secret to the EK public key (from the
//! EK certificate), bound to the AK's *name* (hash of its public area, which
//! includes the `fixedTPM | restricted | sign` attributes). Only a TPM that
//! holds that EK's private part *and* has that exact AK loaded releases the
//! secret (`TPM2_ActivateCredential`). The EK certificate chain up to a trusted
//! manufacturer CA (in tests the swtpm local CA) is the root of trust.
//! The join protocol does this on the same aTLS connection as the quote, so
//! nothing is written to the cluster before the AK is proven.

pub mod credential;
pub mod ek;
#[cfg(feature = "tpm")]
pub mod issuer;
pub mod verify;

pub use credential::{Challenge, make_credential};
pub use verify::{TpmError, VerifiedQuote, parse_certificates, verify_quote};
