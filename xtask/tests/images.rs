//! `cargo xtask images` on the real binaries and a real container runtime:
//! two builds give the same digests, and each archive imports into Debian's
//! `containerd` (started here with its own root, state and socket under a
//! temporary directory, stopped by pid) and runs under `runc` with `ctr run`,
//! answering `--version`.
//!
//! The images are built from the workspace's dev binaries (`target/debug`,
//! built when missing); `cargo xtask images` builds release binaries by
//! default, the same code path with another directory.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::images::{BINARIES, ImageMeta, ImagesFile, Target, build, workspace_meta};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The dev binaries of the images, built when missing.
fn targets() -> Result<Vec<Target>> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debug");
    let mut targets = Vec::new();
    for (name, package) in BINARIES {
        let binary = dir.join(name);
        if !binary.exists() {
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(root())
                .args(["build", "-p", package])
                .status()?;
            if !status.success() {
                bail!("cargo build -p {package} failed");
            }
        }
        targets.push(Target {
            name: name.to_owned(),
            binary,
        });
    }
    Ok(targets)
}

fn meta() -> Result<ImageMeta> {
    workspace_meta(&root())
}

#[test]
fn two_builds_give_the_same_digests_and_images_json_names_them() -> Result<()> {
    let targets = targets()?;
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let first = build(&targets, &meta()?, a.path())?;
    let second = build(&targets, &meta()?, b.path())?;
    assert_eq!(first.images.len(), 2);
    for (x, y) in first.images.iter().zip(&second.images) {
        assert_eq!(x.digest, y.digest, "{} is reproducible", x.name);
        assert_eq!(
            std::fs::read(a.path().join(&x.archive))?,
            std::fs::read(b.path().join(&y.archive))?,
            "{}: byte-identical archives",
            x.name
        );
        assert!(
            x.digest.starts_with("sha256:") && x.digest.len() == 71,
            "{}",
            x.digest
        );
        assert_eq!(x.reference, format!("{}@{}", x.name, x.digest));
    }
    let names: Vec<&str> = first.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ghcr.io/kubectl-confidential/confidential-webhook",
            "ghcr.io/kubectl-confidential/confidential-controllers"
        ]
    );
    // images.json is what `init` reads: the same digests.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("images.json"))?)?;
    for (i, image) in first.images.iter().enumerate() {
        assert_eq!(json["images"][i]["name"], image.name.as_str());
        assert_eq!(json["images"][i]["digest"], image.digest.as_str());
    }
    assert_eq!(json["version"], meta()?.version.as_str());
    // The layout's blobs are named by their digests.
    let layout = a.path().join(&first.images[0].layout);
    let manifest_blob = layout.join(format!(
        "blobs/sha256/{}",
        first.images[0].digest.trim_start_matches("sha256:")
    ));
    assert!(manifest_blob.exists(), "{}", manifest_blob.display());
    Ok(())
}

/// containerd started for one test, stopped by pid on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SIGTERM by pid, then wait; SIGKILL after a grace period.
            let terminated = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            let deadline = Instant::now() + Duration::from_secs(10);
            while terminated && Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Err(e) = self.child.kill() {
            eprintln!("stopping containerd: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("waiting for containerd: {e}");
        }
    }
}

impl Containerd {
    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("containerd-").tempdir()?;
        let d = dir.path();
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{0}/containerd-ttrpc.sock\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{0}/opt\"\n",
                d.display()
            ),
        )?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "starting containerd (scripts/install-deps installs Debian's containerd and runc)",
            )?;
        let mut containerd = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if containerd
                .ctr(&["version"])
                .is_ok_and(|o| o.status.success())
            {
                return Ok(containerd);
            }
            if let Some(status) = containerd.child.try_wait()? {
                bail!("containerd exited with {status}:\n{}", containerd.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within 60 s:\n{}",
                    containerd.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("ctr")
            .arg("-a")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["-n", "confidential-test"])
            .args(args)
            .output()?)
    }

    fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "ctr {args:?} failed: {text}\ncontainerd log:\n{}",
                self.log()
            );
        }
        Ok(text)
    }
}

#[test]
fn each_image_imports_into_containerd_and_runs_its_binary() -> Result<()> {
    let out = tempfile::tempdir()?;
    let file: ImagesFile = build(&targets()?, &meta()?, out.path())?;
    let containerd = Containerd::start()?;
    for image in &file.images {
        let archive = out.path().join(&image.archive).display().to_string();
        let imported = containerd.ctr_ok(&["image", "import", &archive])?;
        let reference = format!("{}:{}", image.name, image.tag);
        let listed = containerd.ctr_ok(&["image", "ls"])?;
        let line = listed
            .lines()
            .find(|l| l.starts_with(&reference))
            .with_context(|| {
                format!("{reference} not listed after import ({imported}):\n{listed}")
            })?;
        assert!(
            line.contains(&image.digest),
            "containerd knows {reference} by our digest {}: {line}",
            image.digest
        );
        let binary = reference
            .rsplit('/')
            .next()
            .and_then(|n| n.split(':').next())
            .context("image name")?;
        let id = format!("{binary}-{}", std::process::id());
        let ran = containerd.ctr_ok(&[
            "run",
            "--rm",
            &reference,
            &id,
            &format!("/{binary}"),
            "--version",
        ])?;
        assert!(
            ran.contains(&format!("{binary} {}", meta()?.version)),
            "{reference} printed: {ran}"
        );
        // No shell in the image: running one fails.
        let shell = containerd.ctr(&[
            "run",
            "--rm",
            &reference,
            &format!("{id}-sh"),
            "/bin/sh",
            "-c",
            "true",
        ])?;
        assert!(!shell.status.success(), "{reference} has no /bin/sh");
    }
    Ok(())
}

/// The demo workload the node image bakes: one import leaves it in
/// containerd's store under its tag and under `repository@sha256:<digest>`
/// (the same manifest), and it runs by the digest name, as a digest-pinned
/// Pod needs on a node without a registry. (The CRI's lookup of that name
/// by a real kubelet is proven on a VM node: `e2e/tests/vm_node.rs`.)
#[test]
fn the_baked_demo_image_imports_under_its_tag_and_its_digest() -> Result<()> {
    let demo = xtask::node_image::runtime::system_demo_image()?;
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join(&demo.file_name);
    std::fs::write(&archive, &demo.archive)?;
    let containerd = Containerd::start()?;
    let imported = containerd.ctr_ok(&["image", "import", &archive.display().to_string()])?;
    let listed = containerd.ctr_ok(&["image", "ls"])?;
    for name in [&demo.reference, &demo.digest_reference] {
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .with_context(|| format!("{name} not listed after import ({imported}):\n{listed}"))?;
        assert!(line.contains(&demo.digest), "{name}: {line}");
    }
    let id = format!("demo-{}", std::process::id());
    let ran = containerd.ctr_ok(&[
        "run",
        "--rm",
        &demo.digest_reference,
        &id,
        "/bin/busybox",
        "echo",
        "by digest",
    ])?;
    assert!(ran.contains("by digest"), "{ran}");
    Ok(())
}
