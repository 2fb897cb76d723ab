//! `confidential-playground`: starts a local control plane on real components
//! with the CRDs installed and keeps it running until Ctrl-C. It grows into the
//! full local playground (gate, controllers, simulated confidential nodes).

use anyhow::{Context, Result};
use confidential_testenv::{ControlPlane, ControlPlaneOptions, crds_dir, install_crds};

#[tokio::main]
async fn main() -> Result<()> {
    eprintln!(
        "playground: starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler"
    );
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let crds = install_crds(&client, &crds_dir()).await?;
    eprintln!(
        "playground: control plane ready in {:.1?}; installed {} CRDs",
        cp.startup,
        crds.len()
    );
    println!("export KUBECONFIG={}", cp.kubeconfig.display());
    eprintln!(
        "playground: try `kubectl get nodeversions,attestationpolicies`; Ctrl-C stops everything"
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("playground: stopping");
    drop(cp);
    Ok(())
}
