//! What an image publisher runs: `compute` replays measured boot over the
//! image's components (the same replay the firmware performs into the TPM)
//! and prints the canonical measurement file, or, given a UKI, predicts the
//! whole measured boot from the file (`confidential_attestation::predict`); `sign` signs a file's bytes as
//! `cosign sign-blob --key` would, after checking they are canonical (so what
//! is on disk is exactly what is signed and what the cluster re-verifies).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use confidential_attestation::measurements::{
    Expected, MeasurementFile, Measurements, component_digest, parse_pcr_index, replay,
};
use confidential_attestation::predict::{UNPREDICTABLE, predict_uki_boot};
use p256::ecdsa::SigningKey;
use p256::pkcs8::DecodePrivateKey;

pub fn compute(image: &str, pcrs: &[String], warn_only: &[String]) -> Result<MeasurementFile> {
    let warn: Vec<u8> = warn_only
        .iter()
        .map(|p| parse_pcr_index(p))
        .collect::<Result<_, _>>()
        .context("--warn-only")?;
    let mut values = BTreeMap::new();
    for spec in pcrs {
        let (index, components) = spec
            .split_once('=')
            .with_context(|| format!("--pcr {spec:?}: expected PCR=COMPONENT[,COMPONENT...]"))?;
        let pcr = parse_pcr_index(index).with_context(|| format!("--pcr {spec:?}"))?;
        let digests = components
            .split(',')
            .filter(|c| !c.is_empty())
            .map(component)
            .collect::<Result<Vec<_>>>()?;
        if digests.is_empty() {
            bail!("--pcr {spec:?} names no component");
        }
        let previous = values.insert(
            pcr,
            Expected {
                expected: replay(&digests),
                warn_only: warn.contains(&pcr),
            },
        );
        if previous.is_some() {
            bail!("PCR {pcr} given twice; list all its components in one --pcr");
        }
    }
    if let Some(pcr) = warn.iter().find(|p| !values.contains_key(p)) {
        bail!("--warn-only {pcr} names a PCR that no --pcr computes");
    }
    Ok(MeasurementFile {
        image: image.to_owned(),
        measurements: Measurements::new(values)?,
    })
}

/// Predicts the PCRs of a UKI's measured boot. Returns the file and notes for
/// the publisher: which PCRs are enforced and why the firmware-internal ones
/// (PCR 0, 1) are not in the file. `--warn-only` demotes predicted PCRs.
pub fn predict(
    image: &str,
    uki: &Path,
    warn_only: &[String],
) -> Result<(MeasurementFile, Vec<String>)> {
    let warn: Vec<u8> = warn_only
        .iter()
        .map(|p| parse_pcr_index(p))
        .collect::<Result<_, _>>()
        .context("--warn-only")?;
    let bytes = std::fs::read(uki).with_context(|| format!("reading the UKI {}", uki.display()))?;
    let prediction = predict_uki_boot(&bytes)
        .with_context(|| format!("predicting the measured boot of {}", uki.display()))?;
    let mut values = BTreeMap::new();
    for (pcr, expected) in prediction.pcr_values() {
        values.insert(
            pcr,
            Expected {
                expected,
                warn_only: warn.contains(&pcr),
            },
        );
    }
    if let Some(pcr) = warn.iter().find(|p| !values.contains_key(p)) {
        bail!("--warn-only {pcr} names a PCR the prediction does not compute");
    }
    let mut notes = vec![format!(
        "predicted from {}: PCRs {}",
        uki.display(),
        values
            .keys()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )];
    for (pcr, reason) in UNPREDICTABLE {
        notes.push(format!(
            "PCR {pcr} is not in the file (not predictable from files): {reason}"
        ));
    }
    let file = MeasurementFile {
        image: image.to_owned(),
        measurements: Measurements::new(values)?,
    };
    Ok((file, notes))
}

fn component(text: &str) -> Result<[u8; 32]> {
    if let Some(hex_digest) = text.strip_prefix("sha256:") {
        let bytes = hex::decode(hex_digest).with_context(|| format!("{text}: not hex"))?;
        return bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{text}: a SHA-256 digest has 32 bytes"));
    }
    let bytes = std::fs::read(text).with_context(|| format!("reading component {text}"))?;
    Ok(component_digest(&bytes))
}

/// Reads a measurement file whose bytes must be canonical.
pub fn read_canonical(path: &Path) -> Result<MeasurementFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    MeasurementFile::from_canonical_json(&bytes)
        .with_context(|| format!("parsing {}", path.display()))
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if pem.contains("ENCRYPTED") {
        bail!(
            "{} is encrypted (a cosign key?); sign with `cosign sign-blob --key {} <file>` instead, \
             or export an unencrypted PKCS#8 key",
            path.display(),
            path.display()
        );
    }
    SigningKey::from_pkcs8_pem(&pem)
        .or_else(|_| p256::SecretKey::from_sec1_pem(&pem).map(SigningKey::from))
        .map_err(|_| {
            anyhow::anyhow!(
                "{} is not an ECDSA P-256 private key in PEM",
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_replays_components_in_order() {
        let a = "sha256:".to_owned() + &"11".repeat(32);
        let b = "sha256:".to_owned() + &"22".repeat(32);
        let file = compute(
            "img:v1",
            &[format!("4={a},{b}"), format!("9={a}")],
            &["9".into()],
        )
        .expect("compute");
        let expected4 = replay(&[[0x11; 32], [0x22; 32]]);
        assert_eq!(
            file.measurements.get(4).map(|e| e.expected),
            Some(expected4)
        );
        assert_eq!(file.measurements.get(9).map(|e| e.warn_only), Some(true));
    }

    #[test]
    fn compute_refuses_bad_specs() {
        let d = "sha256:".to_owned() + &"11".repeat(32);
        assert!(compute("i", &["4".into()], &[]).is_err(), "missing =");
        assert!(
            compute("i", &[format!("24={d}")], &[]).is_err(),
            "pcr out of range"
        );
        assert!(
            compute("i", &["4=sha256:zz".into()], &[]).is_err(),
            "bad hex"
        );
        assert!(
            compute("i", &[format!("4={d}"), format!("4={d}")], &[]).is_err(),
            "twice"
        );
        assert!(
            compute("i", &[format!("4={d}")], &["9".into()]).is_err(),
            "warn-only unknown pcr"
        );
        assert!(
            compute("i", &["4=/no/such/file".into()], &[]).is_err(),
            "missing file"
        );
    }
}
