//! The TPM issuer and the pure-Rust verifier against a real software TPM
//! (swtpm with an EK certificate from a local CA): quotes verify, every
//! tampering is refused, and credential activation binds the AK to the EK.

use anyhow::Result;
use confidential_attestation::tpm::issuer::TpmIssuer;
use confidential_attestation::tpm::{TpmError, make_credential, parse_certificates, verify_quote};
use confidential_testenv::node::{IMAGE_PCR, NodeImage};
use confidential_testenv::swtpm::{Swtpm, SwtpmCa};

fn booted(ca: &SwtpmCa, image: &NodeImage) -> Result<Swtpm> {
    let tpm = Swtpm::start(ca)?;
    tpm.measure_boot(IMAGE_PCR, &image.components)?;
    Ok(tpm)
}

#[tokio::test]
async fn quote_verifies_and_pcr_matches_the_replayed_image() -> Result<()> {
    let ca = SwtpmCa::new()?;
    let image = NodeImage::new("img-a");
    let tpm = booted(&ca, &image)?;
    let issuer = TpmIssuer::open(&tpm.tcti()).await?;
    let nonce = [7u8; 32];
    let ev = issuer.quote(nonce, vec![IMAGE_PCR, 0]).await?;
    let cas = parse_certificates(&ca.issuer_pem()?)?;
    let v = verify_quote(&ev, &nonce, &cas)?;
    assert_eq!(v.pcrs.get(&IMAGE_PCR), Some(&image.expected_pcr()));
    assert_eq!(v.pcrs.get(&0), Some(&[0u8; 32]));
    Ok(())
}

#[tokio::test]
async fn tampering_is_refused() -> Result<()> {
    let ca = SwtpmCa::new()?;
    let tpm = booted(&ca, &NodeImage::new("img-b"))?;
    let issuer = TpmIssuer::open(&tpm.tcti()).await?;
    let nonce = [1u8; 32];
    let ev = issuer.quote(nonce, vec![IMAGE_PCR]).await?;
    let cas = parse_certificates(&ca.issuer_pem()?)?;

    assert_eq!(
        verify_quote(&ev, &[2u8; 32], &cas).err(),
        Some(TpmError::Nonce)
    );

    let mut bad = ev.clone();
    let last = bad.attest.len() - 1;
    bad.attest[last] ^= 1;
    assert_eq!(
        verify_quote(&bad, &nonce, &cas).err(),
        Some(TpmError::Signature)
    );

    let mut bad = ev.clone();
    bad.pcrs.insert(IMAGE_PCR, vec![0; 32]);
    assert_eq!(
        verify_quote(&bad, &nonce, &cas).err(),
        Some(TpmError::PcrDigest)
    );

    let other_ca = SwtpmCa::new()?;
    let _other = Swtpm::start(&other_ca)?;
    let untrusted = parse_certificates(&other_ca.issuer_pem()?)?;
    assert_eq!(
        verify_quote(&ev, &nonce, &untrusted).err(),
        Some(TpmError::EkUntrusted)
    );
    Ok(())
}

#[tokio::test]
async fn credential_activates_only_in_the_tpm_of_the_ek() -> Result<()> {
    let ca = SwtpmCa::new()?;
    let image = NodeImage::new("img-c");
    let a = booted(&ca, &image)?;
    let b = booted(&ca, &image)?;
    let issuer_a = TpmIssuer::open(&a.tcti()).await?;
    let issuer_b = TpmIssuer::open(&b.tcti()).await?;
    let cas = parse_certificates(&ca.issuer_pem()?)?;
    let nonce = [3u8; 32];
    let ev_a = issuer_a.quote(nonce, vec![IMAGE_PCR]).await?;
    let v_a = verify_quote(&ev_a, &nonce, &cas)?;

    let secret = [0x5au8; 32];
    let challenge = make_credential(&v_a.ek_public, &v_a.ak_name, &secret)?;
    assert_eq!(
        issuer_a.activate_credential(challenge.clone()).await?,
        secret.to_vec()
    );

    // B's AK with A's (public, trusted) EK certificate: the quote verifies,
    // but B's TPM cannot activate a credential made for A's EK.
    let mut ev_b = issuer_b.quote(nonce, vec![IMAGE_PCR]).await?;
    ev_b.ek_certificate = ev_a.ek_certificate.clone();
    let v_b = verify_quote(&ev_b, &nonce, &cas)?;
    let challenge = make_credential(&v_b.ek_public, &v_b.ak_name, &secret)?;
    assert!(
        issuer_b
            .activate_credential(challenge.clone())
            .await
            .is_err()
    );
    // And A's TPM does not release it for B's AK name either.
    assert!(issuer_a.activate_credential(challenge).await.is_err());
    Ok(())
}

/// Regenerates `attestation/testdata/tpm/` (a real swtpm quote over the
/// nonce `[0x11; 32]` and the EK CA that certifies its EK), which the
/// attestation crate's unit tests and benchmarks verify without a TPM:
/// `cargo test -p confidential-e2e --test tpm -- --ignored write_quote_fixture`.
#[tokio::test]
#[ignore = "regenerates committed test data"]
async fn write_quote_fixture() -> Result<()> {
    let ca = SwtpmCa::new()?;
    let image = NodeImage::new("fixture-image");
    let tpm = booted(&ca, &image)?;
    let issuer = TpmIssuer::open(&tpm.tcti()).await?;
    let ev = issuer.quote([0x11; 32], vec![0, IMAGE_PCR, 7]).await?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../attestation/testdata/tpm");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("quote.json"), serde_json::to_string_pretty(&ev)?)?;
    std::fs::write(dir.join("ek-ca.pem"), ca.issuer_pem()?)?;
    std::fs::write(
        dir.join("image-pcr4.hex"),
        hex::encode(image.expected_pcr()),
    )?;
    Ok(())
}

#[tokio::test]
async fn persisted_ak_survives_a_reboot_and_stays_in_its_tpm() -> Result<()> {
    let ca = SwtpmCa::new()?;
    let tpm = Swtpm::start(&ca)?;
    let other = Swtpm::start(&ca)?;
    let blob = tpm.dir().join("ak.blob");
    let first = TpmIssuer::open_persistent(&tpm.tcti(), &blob).await?;
    let again = TpmIssuer::open_persistent(&tpm.tcti(), &blob).await?;
    assert_eq!(first.ak_public_bytes()?, again.ak_public_bytes()?);
    // The wrapped AK does not load into another TPM.
    assert!(
        TpmIssuer::open_persistent(&other.tcti(), &blob)
            .await
            .is_err()
    );
    Ok(())
}
