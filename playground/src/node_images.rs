//! Node images as VM machines boot them: a pool's image reference
//! (`registry.example/confidential-node:v1`) names a version (`v1`), and the
//! version's UKI is what `cargo xtask node-image --version v1` builds (the
//! same code, [`xtask::node_image::build`]), built once per version into the
//! playground's directory and reused by every machine of that version.
//!
//! The measurement files the playground's publisher signs for VM nodes are
//! predicted from those UKI files ([`predict_uki_boot`]), never read from a
//! booted VM, as `kubectl confidential measurements compute --uki` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use confidential_attestation::measurements::MeasurementFile;
use confidential_attestation::predict::predict_uki_boot;
use xtask::node_image::runtime::BakedImage;
use xtask::node_image::{ImageVersion, NodeImageInputs};

/// Why an image reference names no buildable node image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageRefError {
    #[error(
        "node image {0:?} has no tag: VM machines boot images built by `cargo xtask node-image --version vN`, named by a `:vN` tag"
    )]
    NoTag(String),
    #[error(
        "node image {image:?}: tag {tag:?} is not an image version (`v` followed by digits, as `cargo xtask node-image --version` takes)"
    )]
    NotAVersion { image: String, tag: String },
}

/// The image version an image reference's tag names (`...:v2` -> `v2`). A
/// digest reference (`@sha256:...`) or a tag of another form is refused:
/// the provider builds UKIs by version and boots nothing else.
pub fn image_version(image: &str) -> Result<ImageVersion, ImageRefError> {
    if image.contains('@') {
        return Err(ImageRefError::NoTag(image.to_owned()));
    }
    // The tag follows the last ':' after the last '/' (a registry port is
    // not a tag).
    let last_component = image.rsplit('/').next().unwrap_or(image);
    let tag = last_component
        .rsplit_once(':')
        .map(|(_, tag)| tag)
        .ok_or_else(|| ImageRefError::NoTag(image.to_owned()))?;
    tag.parse::<ImageVersion>()
        .map_err(|_| ImageRefError::NotAVersion {
            image: image.to_owned(),
            tag: tag.to_owned(),
        })
}

/// The demo workload image as the node images of this machine bake it:
/// `digest_reference` (`ghcr.io/kubectl-confidential/demo@sha256:...`) is
/// what a Pod under an `Enforce` ImagePolicy names, and what the kubelet
/// finds already present on a VM node.
pub fn demo_image() -> Result<BakedImage> {
    xtask::node_image::runtime::system_demo_image().context("building the demo workload image")
}

/// The UKIs of this playground, built on first use and cached by version.
pub struct NodeImages {
    dir: PathBuf,
    bootstrapper: PathBuf,
    kubelet: PathBuf,
    kube_proxy: PathBuf,
    built: Mutex<BTreeMap<String, PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeImages {
    /// UKIs go to `dir`; the node agent inside is the workspace's
    /// `confidential-bootstrapper` (built when missing), the kubelet the
    /// one built from the control plane's Kubernetes module (cached).
    pub fn new(dir: &Path) -> Result<Self> {
        let bootstrapper = confidential_testenv::workspace_binary(
            "confidential-bootstrapper",
            "confidential-bootstrapper",
            "CONFIDENTIAL_BOOTSTRAPPER",
        )?;
        let kubelet = confidential_testenv::binaries::ensure_kubelet()?;
        let kube_proxy = confidential_testenv::binaries::ensure_kube_proxy()?;
        Ok(Self {
            dir: dir.to_owned(),
            bootstrapper,
            kubelet,
            kube_proxy,
            built: Mutex::new(BTreeMap::new()),
        })
    }

    /// The UKI of `image` (blocking: the first call per version builds it).
    pub fn uki(&self, image: &str) -> Result<PathBuf> {
        let version = image_version(image)?;
        // Held while building: two machines of a new version build it once.
        let mut built = lock(&self.built);
        if let Some(path) = built.get(version.as_str()) {
            return Ok(path.clone());
        }
        let started = std::time::Instant::now();
        let inputs = NodeImageInputs::node(
            self.bootstrapper.clone(),
            self.kubelet.clone(),
            self.kube_proxy.clone(),
        )?;
        let path = xtask::node_image::build(&version, &inputs, &self.dir)
            .with_context(|| format!("building the node image {}", version.as_str()))?;
        tracing::info!(version = version.as_str(), path = %path.display(), seconds = started.elapsed().as_secs_f64(), "built the node image");
        built.insert(version.as_str().to_owned(), path.clone());
        Ok(path)
    }

    /// The measurement file of `image`, every PCR predicted from its UKI
    /// enforced (what a publisher signs).
    pub fn measurement_file(&self, image: &str) -> Result<MeasurementFile> {
        let uki = self.uki(image)?;
        let bytes = std::fs::read(&uki).with_context(|| format!("reading {}", uki.display()))?;
        let prediction = predict_uki_boot(&bytes)
            .with_context(|| format!("predicting the measured boot of {}", uki.display()))?;
        Ok(MeasurementFile {
            image: image.to_owned(),
            measurements: prediction.measurements(&BTreeMap::new())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_names_the_version() {
        for (image, version) in [
            ("registry.example/confidential-node:v1", "v1"),
            ("registry.example:5000/confidential-node:v12", "v12"),
            ("node:v2", "v2"),
        ] {
            assert_eq!(image_version(image).expect(image).as_str(), version);
        }
    }

    #[test]
    fn references_without_a_version_tag_are_refused_one_by_one() {
        for (image, expected) in [
            ("registry.example/confidential-node", "has no tag"),
            ("registry.example:5000/confidential-node", "has no tag"),
            (
                "registry.example/confidential-node@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "has no tag",
            ),
            (
                "registry.example/confidential-node:latest",
                "is not an image version",
            ),
            (
                "registry.example/confidential-node:v",
                "is not an image version",
            ),
            (
                "registry.example/confidential-node:v1.2",
                "is not an image version",
            ),
            ("registry.example/confidential-node:v1/x", "has no tag"),
        ] {
            let err = image_version(image).expect_err(image).to_string();
            assert!(err.contains(expected), "{image}: {err}");
        }
    }
}
