//! Builds (or finds) the control-plane binaries the tests use and prints where
//! they are. `.ci/run` calls it so the build shows up as its own step.

fn main() -> anyhow::Result<()> {
    let binaries = confidential_testenv::binaries::ensure()?;
    println!("etcd                    {}", binaries.etcd.display());
    println!(
        "kube-apiserver          {}",
        binaries.kube_apiserver.display()
    );
    println!(
        "kube-controller-manager {}",
        binaries.kube_controller_manager.display()
    );
    println!(
        "kube-scheduler          {}",
        binaries.kube_scheduler.display()
    );
    println!("kubectl                 {}", binaries.kubectl.display());
    Ok(())
}
