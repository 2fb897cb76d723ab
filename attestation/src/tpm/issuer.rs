//! The TPM issuer (feature `tpm`): creates an attestation key under the
//! endorsement key, quotes PCRs with the aTLS nonce as qualifying data,
//! activates credentials, extends and reads PCRs. Works with any TCTI string
//! (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, ...).
//!
//! Every call opens its own ESAPI context, recreates the EK (deterministic
//! from the TCG template) and reloads the AK from its wrapped blobs, so the
//! issuer holds no TPM handles between calls and works with swtpm's
//! one-client-at-a-time socket. tss-esapi calls block: the async wrappers run
//! them on the blocking pool.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;
use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek, pcr};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::AsymmetricAlgorithm;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectionList, PcrSlot, Private,
    Public, Signature, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::evidence::TpmEvidence;
use crate::tpm::Challenge;

#[derive(Debug, Error)]
pub enum IssuerError {
    #[error("TPM: {0}")]
    Tpm(#[from] tss_esapi::Error),
    #[error("TPM returned something unexpected: {0}")]
    Unexpected(&'static str),
    #[error("TPM task failed: {0}")]
    Join(String),
}

/// A TPM with an attestation key created under its EK.
pub struct TpmIssuer {
    tcti: String,
    ak_private: Private,
    ak_public: Public,
    /// One TPM operation at a time: a node may be asked for evidence by the
    /// gate's re-attestation and an admin's `verify` at the same moment, and
    /// a TPM behind a single-client transport (swtpm's socket, a TPM without
    /// a resource manager) refuses a second concurrent context.
    busy: std::sync::Mutex<()>,
}

impl std::fmt::Debug for TpmIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmIssuer")
            .field("tcti", &self.tcti)
            .finish()
    }
}

fn context(tcti: &str) -> Result<Context, IssuerError> {
    let conf = TctiNameConf::from_str(tcti)?;
    Ok(Context::new(conf)?)
}

/// Frees a transient object or session. A failure leaves it for the TPM's
/// resource manager (or the next context) to reclaim, so it is only logged.
fn flush(ctx: &mut Context, handle: tss_esapi::handles::ObjectHandle) {
    if let Err(error) = ctx.flush_context(handle) {
        tracing::debug!(%error, "could not flush a TPM handle");
    }
}

fn ek_handle(ctx: &mut Context) -> Result<KeyHandle, IssuerError> {
    Ok(ek::create_ek_object(ctx, AsymmetricAlgorithm::Rsa, None)?)
}

fn selection(pcrs: &[u32]) -> Result<PcrSelectionList, IssuerError> {
    let mut slots = Vec::new();
    for index in pcrs {
        let bit = 1u32
            .checked_shl(*index)
            .ok_or(IssuerError::Unexpected("PCR index out of range"))?;
        slots.push(PcrSlot::try_from(bit)?);
    }
    Ok(PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()?)
}

fn pad32(v: &[u8]) -> Result<[u8; 32], IssuerError> {
    if v.len() > 32 {
        return Err(IssuerError::Unexpected(
            "ECC parameter longer than 32 bytes",
        ));
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

impl TpmIssuer {
    /// Opens the TPM at `tcti` and creates a fresh AK (ECC P-256, ECDSA-SHA256,
    /// restricted signing) under the RSA EK.
    pub fn open_blocking(tcti: &str) -> Result<Self, IssuerError> {
        let mut ctx = context(tcti)?;
        let ek = ek_handle(&mut ctx)?;
        let created = ak::create_ak(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        )?;
        ctx.flush_context(ek.into())?;
        Ok(Self {
            tcti: tcti.to_owned(),
            ak_private: created.out_private,
            ak_public: created.out_public,
            busy: std::sync::Mutex::new(()),
        })
    }

    /// Loads the AK saved at `path` by an earlier boot, or creates one and
    /// saves it there. The file holds the AK's public area and its private
    /// part *wrapped by the EK's storage key*: it is useless outside this TPM,
    /// so it may live on unencrypted storage. A stable AK is the machine's
    /// identity across reboots (rejoin, node-name ownership).
    pub fn open_persistent_blocking(
        tcti: &str,
        path: &std::path::Path,
    ) -> Result<Self, IssuerError> {
        if let Ok(bytes) = std::fs::read(path) {
            let split = bytes
                .get(..2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                .ok_or(IssuerError::Unexpected("AK state file too short"))?;
            let private = bytes
                .get(2..2 + split)
                .ok_or(IssuerError::Unexpected("AK state file truncated"))?;
            let public = bytes
                .get(2 + split..)
                .ok_or(IssuerError::Unexpected("AK state file truncated"))?;
            let issuer = Self {
                tcti: tcti.to_owned(),
                ak_private: Private::try_from(private.to_vec())?,
                ak_public: Public::unmarshall(public)?,
                busy: std::sync::Mutex::new(()),
            };
            // Fails when the blobs belong to another TPM.
            issuer.with_ak(|_, _, _| Ok(()))?;
            return Ok(issuer);
        }
        let issuer = Self::open_blocking(tcti)?;
        let private = issuer.ak_private.value();
        let mut out = u16::try_from(private.len())
            .map_err(|_| IssuerError::Unexpected("AK private part too long"))?
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(private);
        out.extend_from_slice(&issuer.ak_public.marshall()?);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| IssuerError::Join(format!("creating AK state dir: {e}")))?;
        }
        std::fs::write(path, out)
            .map_err(|e| IssuerError::Join(format!("writing AK state: {e}")))?;
        Ok(issuer)
    }

    /// [`TpmIssuer::open_persistent_blocking`] on the blocking pool.
    pub async fn open_persistent(
        tcti: &str,
        path: &std::path::Path,
    ) -> Result<Arc<Self>, IssuerError> {
        let tcti = tcti.to_owned();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            Self::open_persistent_blocking(&tcti, &path).map(Arc::new)
        })
        .await
        .map_err(|e| IssuerError::Join(e.to_string()))?
    }

    /// [`TpmIssuer::open_blocking`] on the blocking pool.
    pub async fn open(tcti: &str) -> Result<Arc<Self>, IssuerError> {
        let tcti = tcti.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&tcti).map(Arc::new))
            .await
            .map_err(|e| IssuerError::Join(e.to_string()))?
    }

    fn with_ak<T>(
        &self,
        f: impl FnOnce(&mut Context, KeyHandle, KeyHandle) -> Result<T, IssuerError>,
    ) -> Result<T, IssuerError> {
        let mut ctx = context(&self.tcti)?;
        let ek = ek_handle(&mut ctx)?;
        let ak = ak::load_ak(
            &mut ctx,
            ek,
            None,
            self.ak_private.clone(),
            self.ak_public.clone(),
        )?;
        let result = f(&mut ctx, ek, ak);
        flush(&mut ctx, ak.into());
        flush(&mut ctx, ek.into());
        result
    }

    /// Marshalled `TPMT_PUBLIC` of the AK.
    pub fn ak_public_bytes(&self) -> Result<Vec<u8>, IssuerError> {
        Ok(self.ak_public.marshall()?)
    }

    /// The DER EK certificate from the TPM's NV index (RSA 2048 EK).
    pub fn ek_certificate_blocking(&self) -> Result<Vec<u8>, IssuerError> {
        let mut ctx = context(&self.tcti)?;
        Ok(ek::retrieve_ek_pubcert(
            &mut ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )?)
    }

    /// Quotes `pcrs` (SHA-256 bank) with `nonce` as qualifying data.
    pub fn quote_blocking(
        &self,
        nonce: &[u8; 32],
        pcrs: &[u32],
    ) -> Result<TpmEvidence, IssuerError> {
        // A poisoned lock only means another quote panicked; the TPM state
        // is per-context, so going on is safe.
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let ek_certificate = self.ek_certificate_blocking()?;
        let ak_public = self.ak_public_bytes()?;
        let sel = selection(pcrs)?;
        let (attest, signature, values) = self.with_ak(|ctx, _ek, ak| {
            let (attest, signature) = ctx.execute_with_nullauth_session(|ctx| {
                ctx.quote(
                    ak,
                    Data::try_from(nonce.to_vec())?,
                    SignatureScheme::Null,
                    sel.clone(),
                )
            })?;
            let values = ctx.execute_without_session(|ctx| pcr::read_all(ctx, sel.clone()))?;
            Ok((attest, signature, values))
        })?;
        let Signature::EcDsa(sig) = signature else {
            return Err(IssuerError::Unexpected("AK signature is not ECDSA"));
        };
        let mut raw = pad32(sig.signature_r().value())?.to_vec();
        raw.extend_from_slice(&pad32(sig.signature_s().value())?);
        let bank = values
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or(IssuerError::Unexpected("no SHA-256 PCR bank"))?;
        let mut map = BTreeMap::new();
        for index in pcrs {
            let slot = PcrSlot::try_from(1u32 << index)?;
            let digest = bank
                .get_digest(slot)
                .ok_or(IssuerError::Unexpected("PCR missing from read"))?;
            map.insert(*index, digest.value().to_vec());
        }
        // PCRs could change between the quote and the read; the verifier
        // catches that through the quoted PCR digest.
        Ok(TpmEvidence {
            attest: attest.marshall()?,
            signature: raw,
            pcrs: map,
            ak_public,
            ek_certificate,
        })
    }

    /// Async [`TpmIssuer::quote_blocking`].
    pub async fn quote(
        self: &Arc<Self>,
        nonce: [u8; 32],
        pcrs: Vec<u32>,
    ) -> Result<TpmEvidence, IssuerError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.quote_blocking(&nonce, &pcrs))
            .await
            .map_err(|e| IssuerError::Join(e.to_string()))?
    }

    /// Releases the credential of a challenge: succeeds only in the TPM that
    /// holds both the EK and this AK.
    pub fn activate_credential_blocking(
        &self,
        challenge: &Challenge,
    ) -> Result<Vec<u8>, IssuerError> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let blob = IdObject::try_from(challenge.credential_blob.clone())?;
        let secret = EncryptedSecret::try_from(challenge.secret.clone())?;
        self.with_ak(|ctx, ek, ak| {
            let (attrs, mask) = SessionAttributesBuilder::new().build();
            let hmac = ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Hmac,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )?
                .ok_or(IssuerError::Unexpected("no HMAC session"))?;
            ctx.tr_sess_set_attributes(hmac, attrs, mask)?;
            let policy = ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )?
                .ok_or(IssuerError::Unexpected("no policy session"))?;
            ctx.tr_sess_set_attributes(policy, attrs, mask)?;
            ctx.execute_with_session(Some(hmac), |ctx| {
                ctx.policy_secret(
                    PolicySession::try_from(policy)?,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })?;
            ctx.set_sessions((Some(hmac), Some(policy), None));
            let out = ctx.activate_credential(ak, ek, blob, secret);
            ctx.clear_sessions();
            flush(ctx, SessionHandle::from(hmac).into());
            flush(ctx, SessionHandle::from(policy).into());
            Ok(out?.value().to_vec())
        })
    }

    /// Async [`TpmIssuer::activate_credential_blocking`].
    pub async fn activate_credential(
        self: &Arc<Self>,
        challenge: Challenge,
    ) -> Result<Vec<u8>, IssuerError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.activate_credential_blocking(&challenge))
            .await
            .map_err(|e| IssuerError::Join(e.to_string()))?
    }
}

/// Extends SHA-256 PCR `index` with `digest` on the TPM at `tcti` (what
/// measured-boot firmware does; the bootstrapper uses it for the cluster ID).
pub fn extend_pcr_blocking(tcti: &str, index: u32, digest: &[u8; 32]) -> Result<(), IssuerError> {
    let mut ctx = context(tcti)?;
    let handle = PcrHandle::try_from(index).map_err(|_| IssuerError::Unexpected("PCR index"))?;
    let mut values = DigestValues::new();
    values.set(HashingAlgorithm::Sha256, Digest::try_from(digest.to_vec())?);
    ctx.execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))?;
    Ok(())
}

/// Reads SHA-256 PCR values.
pub fn read_pcrs_blocking(
    tcti: &str,
    pcrs: &[u32],
) -> Result<BTreeMap<u32, [u8; 32]>, IssuerError> {
    let mut ctx = context(tcti)?;
    let sel = selection(pcrs)?;
    let values = ctx.execute_without_session(|ctx| pcr::read_all(ctx, sel))?;
    let bank = values
        .pcr_bank(HashingAlgorithm::Sha256)
        .ok_or(IssuerError::Unexpected("no SHA-256 PCR bank"))?;
    let mut out = BTreeMap::new();
    for index in pcrs {
        let digest = bank
            .get_digest(PcrSlot::try_from(1u32 << index)?)
            .ok_or(IssuerError::Unexpected("PCR missing from read"))?;
        out.insert(*index, pad32(digest.value())?);
    }
    Ok(out)
}
