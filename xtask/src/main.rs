//! Workspace tasks:
//! - `cargo xtask gen-crds` writes `manifests/crds/` from the types in `api/`;
//! - `cargo xtask krew --version vX.Y.Z --base-url URL --platform linux/amd64=PATH [--out DIR]`
//!   writes the Krew archives and the plugin manifest (default `dist/`);
//! - `cargo xtask images [--out DIR] [--profile release|dev] [--no-build]` builds
//!   the gate's and the operator's binaries and writes their OCI images
//!   (layouts, archives, `images.json` with the digests; default `dist/`).
//! - `cargo xtask node-image --version v1 [--out DIR] [--bootstrapper PATH] [--kubelet PATH --kube-proxy PATH]`
//!   builds the node image UKI (default `target/node-image/`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds")
}

fn gen_crds() -> Result<()> {
    let dir = crds_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for crd in confidential_api::crds() {
        let path = dir.join(confidential_api::crd_file_name(&crd));
        let yaml = confidential_api::crd_yaml(&crd).context("rendering CRD")?;
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn krew(args: &[String]) -> Result<()> {
    let mut version = None;
    let mut base_url = None;
    let mut out = PathBuf::from("dist");
    let mut platforms = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--version" => version = Some(value.clone()),
            "--base-url" => base_url = Some(value.clone()),
            "--out" => out = PathBuf::from(value),
            "--platform" => platforms.push(value.parse()?),
            other => bail!("unknown flag {other}; see `cargo xtask help`"),
        }
    }
    let version = version.context("--version is required (e.g. v0.1.0)")?;
    let base_url =
        base_url.context("--base-url is required (where the archives will be served)")?;
    let package = xtask::krew::package(&version, &base_url, &platforms, &out)?;
    for (archive, sha) in &package.archives {
        println!("{sha}  {}", archive.display());
    }
    println!("wrote {}", package.manifest.display());
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn images(args: &[String]) -> Result<()> {
    let mut out = PathBuf::from("dist");
    let mut profile = "release".to_owned();
    let mut build = true;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--no-build" => build = false,
            "--out" => out = PathBuf::from(it.next().context("--out needs a directory")?),
            "--profile" => profile = it.next().context("--profile needs a name")?.clone(),
            other => bail!(
                "unknown flag {other}; usage: cargo xtask images [--out DIR] [--profile release|dev] [--no-build]"
            ),
        }
    }
    let root = workspace_root();
    if build {
        let mut cargo =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(&root)
            .args(["build", "--profile", &profile]);
        for (_, package) in xtask::images::BINARIES {
            cargo.args(["-p", package]);
        }
        let status = cargo.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --profile {profile} failed");
        }
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let dir = target_dir.join(if profile == "dev" { "debug" } else { &profile });
    let targets: Vec<xtask::images::Target> = xtask::images::BINARIES
        .iter()
        .map(|(name, _)| xtask::images::Target {
            name: (*name).to_owned(),
            binary: dir.join(name),
        })
        .collect();
    let meta = xtask::images::workspace_meta(&root)?;
    let file = xtask::images::build(&targets, &meta, &out)?;
    for image in &file.images {
        println!(
            "{}  {}:{}  {}",
            image.digest, image.name, image.tag, image.archive
        );
    }
    println!("wrote {}", out.join("images.json").display());
    Ok(())
}

fn node_image(args: &[String]) -> Result<()> {
    let root = workspace_root();
    let mut version = None;
    let mut out = root.join("target/node-image");
    let mut bootstrapper = root.join("target/debug/confidential-bootstrapper");
    let mut kubelet = None;
    let mut kube_proxy = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--version" => version = Some(value.parse::<xtask::node_image::ImageVersion>()?),
            "--out" => out = PathBuf::from(value),
            "--bootstrapper" => bootstrapper = PathBuf::from(value),
            "--kubelet" => kubelet = Some(PathBuf::from(value)),
            "--kube-proxy" => kube_proxy = Some(PathBuf::from(value)),
            other => bail!("unknown flag {other}; see `cargo xtask help`"),
        }
    }
    let version = version.context("--version is required (e.g. v1)")?;
    if !bootstrapper.exists() {
        bail!(
            "{} is missing: run `cargo build -p confidential-bootstrapper` or pass --bootstrapper",
            bootstrapper.display()
        );
    }
    let inputs = match (kubelet, kube_proxy) {
        (Some(kubelet), Some(kube_proxy)) => {
            xtask::node_image::NodeImageInputs::node(bootstrapper, kubelet, kube_proxy)?
        }
        (Some(_), None) | (None, Some(_)) => {
            bail!("a node runs both: pass --kubelet and --kube-proxy, or neither")
        }
        (None, None) => {
            eprintln!(
                "node-image: no --kubelet: the image reports its boot but runs no node \
                 (the VM suite builds the kubelet into ~/.cache/kubectl-confidential/kubelet-k8s-v*/bin/kubelet)"
            );
            xtask::node_image::NodeImageInputs::system(bootstrapper)?
        }
    };
    let uki = xtask::node_image::build(&version, &inputs, &out)?;
    println!("wrote {}", uki.display());
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen-crds") => gen_crds(),
        Some("krew") => krew(&args[1..]),
        Some("images") => images(&args[1..]),
        Some("node-image") => node_image(&args[1..]),
        _ => bail!(
            "usage: cargo xtask gen-crds | cargo xtask krew --version vX.Y.Z --base-url URL --platform OS/ARCH=PATH [--out DIR] \
             | cargo xtask images [--out DIR] [--profile release|dev] [--no-build] \
             | cargo xtask node-image --version vN [--out DIR] [--bootstrapper PATH] [--kubelet PATH --kube-proxy PATH]"
        ),
    }
}
