//! Container images of the gate and the operator, built without a Docker
//! engine: an OCI image layout (and the same as one tar archive, what
//! `ctr image import` and `skopeo copy oci-archive:` read) per binary.
//!
//! Each image is one layer: the binary at `/<name>`, the shared libraries
//! `ldd` lists for it (this workspace builds for `x86_64-unknown-linux-gnu`;
//! no musl target is installed, so the binary is not static), `/etc/passwd`
//! and `/etc/group` naming the non-root user 65532, and `/tmp`. No shell, no
//! package manager. The config runs the binary as `65532:65532` and carries
//! the OCI labels `org.opencontainers.image.version`, `.revision` and
//! `.source`.
//!
//! Reproducible: tar entries sorted, fixed mtimes (`SOURCE_DATE_EPOCH`, else
//! 0), owners and modes fixed, gzip without a timestamp or name, JSON written
//! in one fixed order and no creation date: the same binary at the same
//! revision gives the same digest. The pure steps ([`parse_ldd`], [`layer`],
//! [`image`]) take data and return bytes; [`build`] does the file I/O.
//!
//! Length: about 450 lines of code (layer, config, manifest, index, archive
//! of one image format); the rest are its tests, kept beside it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// The non-root user and group the images run as (distroless' `nonroot`).
pub const NONROOT: u32 = 65532;
/// Where the manifests' images live (`manifests/`); the tag is the version.
pub const REPOSITORY_PREFIX: &str = "ghcr.io/kubectl-confidential";

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A file in the image's single layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFile {
    /// Path inside the image, relative (`lib/x86_64-linux-gnu/libc.so.6`).
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// What describes an image besides its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// Binary name: `confidential-webhook`.
    pub name: String,
    /// `org.opencontainers.image.version`: the workspace version.
    pub version: String,
    /// `org.opencontainers.image.revision`: the source commit.
    pub revision: String,
    /// `org.opencontainers.image.source`: the repository URL.
    pub source: String,
    /// Seconds since the epoch for every mtime.
    pub mtime: u64,
}

impl ImageMeta {
    /// `ghcr.io/kubectl-confidential/<name>`.
    pub fn repository(&self) -> String {
        format!("{REPOSITORY_PREFIX}/{}", self.name)
    }

    /// The tag: `v<version>`, as the manifests name it.
    pub fn tag(&self) -> String {
        format!("v{}", self.version)
    }
}

/// A content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            bytes,
        }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// A built image: its blobs and the manifest digest (the image's digest).
#[derive(Debug, Clone)]
pub struct Image {
    pub meta: ImageMeta,
    pub layer: Blob,
    pub config: Blob,
    pub manifest: Blob,
}

/// Every parent directory of the files, sorted (`etc/`, `lib/`, ...).
fn directories(files: &[LayerFile]) -> Vec<String> {
    let mut dirs: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let parts: Vec<&str> = f.path.split('/').collect();
            (1..parts.len())
                .map(|n| parts[..n].join("/"))
                .collect::<Vec<_>>()
        })
        .chain([
            "tmp".to_owned(),
            "home".to_owned(),
            "home/nonroot".to_owned(),
        ])
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn header(path: &str, mode: u32, size: u64, mtime: u64, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    let owner = if path == "home/nonroot" { NONROOT } else { 0 };
    h.set_uid(u64::from(owner));
    h.set_gid(u64::from(owner));
    h
}

/// The user database of the image: root and the non-root user, no shell.
pub fn user_files() -> Vec<LayerFile> {
    vec![
        LayerFile {
            path: "etc/passwd".into(),
            mode: 0o644,
            contents: format!(
                "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
            )
            .into_bytes(),
        },
        LayerFile {
            path: "etc/group".into(),
            mode: 0o644,
            contents: format!("root:x:0:\nnonroot:x:{NONROOT}:\n").into_bytes(),
        },
    ]
}

/// The uncompressed layer tar: directories and files in sorted order, one
/// mtime, fixed owners.
pub fn layer_tar(files: &[LayerFile], mtime: u64) -> Result<Vec<u8>> {
    let mut entries: Vec<(String, Option<&LayerFile>)> = directories(files)
        .into_iter()
        .map(|d| (format!("{d}/"), None))
        .chain(files.iter().map(|f| (f.path.clone(), Some(f))))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut builder = tar::Builder::new(Vec::new());
    for (path, file) in entries {
        match file {
            None => {
                let dir = path.trim_end_matches('/');
                let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
                let mut h = header(dir, mode, 0, mtime, tar::EntryType::Directory);
                builder.append_data(&mut h, &path, std::io::empty())?;
            }
            Some(file) => {
                let size = u64::try_from(file.contents.len())?;
                let mut h = header(&path, file.mode, size, mtime, tar::EntryType::Regular);
                builder.append_data(&mut h, &path, file.contents.as_slice())?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// gzip without a name or timestamp, at a fixed level.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::new(6));
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

fn labels(meta: &ImageMeta) -> serde_json::Value {
    serde_json::json!({
        "org.opencontainers.image.revision": meta.revision,
        "org.opencontainers.image.source": meta.source,
        "org.opencontainers.image.title": meta.name,
        "org.opencontainers.image.version": meta.version,
    })
}

/// Builds the image from its layer files; it runs `/<name>`.
pub fn image(meta: &ImageMeta, files: &[LayerFile]) -> Result<Image> {
    let entrypoint = format!("/{}", meta.name);
    image_with_entrypoint(meta, files, &[entrypoint.as_str()])
}

/// Builds the image from its layer files with another entrypoint (the node
/// image's busybox-based pause and demo images).
pub fn image_with_entrypoint(
    meta: &ImageMeta,
    files: &[LayerFile],
    entrypoint: &[&str],
) -> Result<Image> {
    let tar = layer_tar(files, meta.mtime)?;
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    let layer = Blob::new(gzip(&tar)?);
    let config = Blob::new(serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": format!("{NONROOT}:{NONROOT}"),
            "Entrypoint": entrypoint,
            "Env": ["PATH=/"],
            "WorkingDir": "/",
            "Labels": labels(meta),
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(MEDIA_CONFIG),
        "layers": [layer.descriptor(MEDIA_LAYER)],
        "annotations": labels(meta),
    }))?);
    Ok(Image {
        meta: meta.clone(),
        layer,
        config,
        manifest,
    })
}

/// The names `index.json` gives an image's manifest: what `ctr image
/// import` names the image in containerd's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexNames {
    /// `repository:tag` only (the gate's and the operator's images).
    Tag,
    /// `repository:tag` and `repository@sha256:<manifest digest>`: a second
    /// index entry naming the same manifest by digest, so a node that
    /// imports the archive resolves a digest-pinned reference locally
    /// (containerd's CRI looks images up by their exact name in the store;
    /// an import by tag alone leaves no name with the digest).
    TagAndDigest,
}

impl Image {
    /// `repository:tag`, the name `ctr image import` gives it.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.meta.repository(), self.meta.tag())
    }

    /// `repository@sha256:<manifest digest>`: the digest-pinned reference
    /// an ImagePolicy admits.
    pub fn digest_reference(&self) -> String {
        format!("{}@{}", self.meta.repository(), self.manifest.digest)
    }

    /// The image's digest (of its manifest).
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    /// The OCI layout's files (`oci-layout`, `index.json`, blobs), sorted;
    /// `index.json` names the manifest by its tag.
    pub fn layout_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.layout_files_named(IndexNames::Tag)
    }

    /// The OCI layout's files with `index.json` naming the manifest as
    /// `names` says.
    pub fn layout_files_named(&self, names: IndexNames) -> Result<Vec<(String, Vec<u8>)>> {
        let mut by_tag = self.manifest.descriptor(MEDIA_MANIFEST);
        by_tag["annotations"] = serde_json::json!({
            "io.containerd.image.name": self.reference(),
            "org.opencontainers.image.ref.name": self.meta.tag(),
        });
        let mut manifests = vec![by_tag];
        if names == IndexNames::TagAndDigest {
            // No `org.opencontainers.image.ref.name`: its grammar has no
            // digest form, and containerd takes the full name from
            // `io.containerd.image.name` first.
            let mut by_digest = self.manifest.descriptor(MEDIA_MANIFEST);
            by_digest["annotations"] = serde_json::json!({
                "io.containerd.image.name": self.digest_reference(),
            });
            manifests.push(by_digest);
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))?;
        let blob = |b: &Blob| {
            (
                format!("blobs/sha256/{}", b.digest.trim_start_matches("sha256:")),
                b.bytes.clone(),
            )
        };
        let mut files = vec![
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_owned(), index),
            blob(&self.layer),
            blob(&self.config),
            blob(&self.manifest),
        ];
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|a, b| a.0 == b.0);
        Ok(files)
    }

    /// The layout as one tar archive (sorted, fixed mtimes and owners);
    /// `index.json` names the manifest by its tag.
    pub fn archive(&self) -> Result<Vec<u8>> {
        self.archive_named(IndexNames::Tag)
    }

    /// The layout as one tar archive with `index.json` naming the manifest
    /// as `names` says.
    pub fn archive_named(&self, names: IndexNames) -> Result<Vec<u8>> {
        let files: Vec<LayerFile> = self
            .layout_files_named(names)?
            .into_iter()
            .map(|(path, contents)| LayerFile {
                path,
                mode: 0o644,
                contents,
            })
            .collect();
        let mut builder = tar::Builder::new(Vec::new());
        let mut dirs: Vec<&str> = vec!["blobs/", "blobs/sha256/"];
        dirs.sort_unstable();
        for dir in dirs {
            let mut h = header(dir, 0o755, 0, self.meta.mtime, tar::EntryType::Directory);
            builder.append_data(&mut h, dir, std::io::empty())?;
        }
        for file in &files {
            let size = u64::try_from(file.contents.len())?;
            let mut h = header(
                &file.path,
                file.mode,
                size,
                self.meta.mtime,
                tar::EntryType::Regular,
            );
            builder.append_data(&mut h, &file.path, file.contents.as_slice())?;
        }
        Ok(builder.into_inner()?)
    }
}

/// The files of the image of `binary`: it, the libraries `ldd` lists, the
/// user database.
pub fn image_files(name: &str, binary: &Path) -> Result<Vec<LayerFile>> {
    let mut files = user_files();
    files.push(LayerFile {
        path: name.to_owned(),
        mode: 0o755,
        contents: std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
    });
    let mut libraries = crate::ldd::libraries(binary)?;
    libraries.sort();
    libraries.dedup();
    for lib in libraries {
        let contents = std::fs::read(&lib)
            .with_context(|| format!("reading the shared library {}", lib.display()))?;
        files.push(LayerFile {
            path: lib.to_string_lossy().trim_start_matches('/').to_owned(),
            mode: 0o755,
            contents,
        });
    }
    Ok(files)
}

/// One image to build: its binary name and where the binary is.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub binary: PathBuf,
}

/// What `build` wrote for one image.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Written {
    /// The repository, as kustomize's `images[].name` and the manifests use it.
    pub name: String,
    /// The manifest digest: kustomize's `images[].digest`.
    pub digest: String,
    pub tag: String,
    /// `repository@digest`: what a Pod spec references.
    pub reference: String,
    /// The OCI archive (`ctr image import`, `skopeo copy oci-archive:`),
    /// relative to the directory of `images.json`.
    pub archive: String,
    /// The OCI layout directory, relative to the directory of `images.json`.
    pub layout: String,
}

/// `dist/images.json`: what `init` reads to pin the images it installs.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImagesFile {
    pub version: String,
    pub revision: String,
    pub images: Vec<Written>,
}

/// Writes each target's OCI layout (`<out>/<name>/`) and archive
/// (`<out>/<name>.oci.tar`), then `<out>/images.json`.
pub fn build(targets: &[Target], meta: &ImageMeta, out: &Path) -> Result<ImagesFile> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for target in targets {
        let meta = ImageMeta {
            name: target.name.clone(),
            ..meta.clone()
        };
        let image = image(&meta, &image_files(&target.name, &target.binary)?)?;
        let layout = out.join(&target.name);
        if layout.exists() {
            std::fs::remove_dir_all(&layout)
                .with_context(|| format!("replacing {}", layout.display()))?;
        }
        for (path, bytes) in image.layout_files()? {
            let path = layout.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        let archive = out.join(format!("{}.oci.tar", target.name));
        std::fs::write(&archive, image.archive()?)
            .with_context(|| format!("writing {}", archive.display()))?;
        written.push(Written {
            name: meta.repository(),
            digest: image.manifest.digest.clone(),
            tag: meta.tag(),
            reference: format!("{}@{}", meta.repository(), image.manifest.digest),
            archive: format!("{}.oci.tar", target.name),
            layout: target.name.clone(),
        });
    }
    let file = ImagesFile {
        version: meta.version.clone(),
        revision: meta.revision.clone(),
        images: written,
    };
    let json = out.join("images.json");
    let mut text = serde_json::to_string_pretty(&file)?;
    text.push('\n');
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    Ok(file)
}

/// The metadata of this checkout: workspace version, `git rev-parse HEAD`,
/// the workspace repository URL, `SOURCE_DATE_EPOCH` (else 0).
pub fn workspace_meta(repo: &Path) -> Result<ImageMeta> {
    let revision = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"))?,
        Err(_) => 0,
    };
    let manifest = std::fs::read_to_string(repo.join("Cargo.toml"))?;
    let field = |key: &str| {
        manifest
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
            .with_context(|| format!("no {key} in the workspace Cargo.toml"))
    };
    Ok(ImageMeta {
        name: String::new(),
        version: field("version")?,
        revision,
        source: field("repository")?,
        mtime,
    })
}

/// The images this workspace ships: binary name and its package.
pub const BINARIES: [(&str, &str); 2] = [
    ("confidential-webhook", "confidential-webhook"),
    ("confidential-controllers", "confidential-controllers"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ImageMeta {
        ImageMeta {
            name: "confidential-webhook".into(),
            version: "0.1.0".into(),
            revision: "abc".into(),
            source: "https://example.invalid/x".into(),
            mtime: 0,
        }
    }

    fn files() -> Vec<LayerFile> {
        let mut files = user_files();
        files.push(LayerFile {
            path: "confidential-webhook".into(),
            mode: 0o755,
            contents: b"\x7fELF".to_vec(),
        });
        files.push(LayerFile {
            path: "lib/x86_64-linux-gnu/libc.so.6".into(),
            mode: 0o755,
            contents: b"libc".to_vec(),
        });
        files
    }

    #[test]
    fn layer_is_sorted_owned_by_root_and_timeless() {
        let tar = layer_tar(&files(), 0).expect("tar");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let h = entry.header();
            let path = entry.path().expect("path").display().to_string();
            assert_eq!(h.mtime().expect("mtime"), 0, "{path}");
            let owner = if path.starts_with("home/nonroot") {
                u64::from(NONROOT)
            } else {
                0
            };
            assert_eq!(h.uid().expect("uid"), owner, "{path}");
            if path == "tmp/" {
                assert_eq!(h.mode().expect("mode"), 0o1777);
            }
            seen.push(path);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert!(
            seen.contains(&"lib/".to_owned()) && seen.contains(&"lib/x86_64-linux-gnu/".to_owned())
        );
        assert!(
            !seen
                .iter()
                .any(|p| p.starts_with("bin") || p.ends_with("/sh")),
            "no shell: {seen:?}"
        );
    }

    #[test]
    fn same_inputs_same_digest_and_every_input_counts() {
        let a = image(&meta(), &files()).expect("image");
        let b = image(&meta(), &files()).expect("image");
        assert_eq!(a.manifest.digest, b.manifest.digest);
        assert_eq!(a.archive().expect("archive"), b.archive().expect("archive"));
        let mut other = files();
        other[2].contents.push(0);
        assert_ne!(
            image(&meta(), &other).expect("image").manifest.digest,
            a.manifest.digest
        );
        let revised = ImageMeta {
            revision: "def".into(),
            ..meta()
        };
        assert_ne!(
            image(&revised, &files()).expect("image").manifest.digest,
            a.manifest.digest
        );
    }

    #[test]
    fn config_runs_the_binary_as_nonroot_with_labels() {
        let image = image(&meta(), &files()).expect("image");
        let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).expect("json");
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["config"]["Entrypoint"][0], "/confidential-webhook");
        let labels = &config["config"]["Labels"];
        assert_eq!(labels["org.opencontainers.image.version"], "0.1.0");
        assert_eq!(labels["org.opencontainers.image.revision"], "abc");
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://example.invalid/x"
        );
        assert!(
            config.get("created").is_none(),
            "no build date in the config"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&image.manifest.bytes).expect("json");
        assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
        assert_eq!(manifest["layers"][0]["digest"], image.layer.digest.as_str());
        // The gzip header carries no timestamp (bytes 4..8) and no name.
        assert_eq!(&image.layer.bytes[4..8], &[0, 0, 0, 0]);
        assert_eq!(image.layer.bytes[3] & 0x08, 0, "no FNAME");
    }
}
