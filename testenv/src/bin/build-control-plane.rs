//! Builds (or finds) the control-plane binaries and the VM nodes' kubelet and kube-proxy the
//! tests use and prints where they are. `.ci/run` calls it so the builds show
//! up as their own step (and run beside clippy) instead of inside a test.

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
    let kubelet = confidential_testenv::binaries::ensure_kubelet()?;
    println!("kubelet (VM nodes)      {}", kubelet.display());
    let kube_proxy = confidential_testenv::binaries::ensure_kube_proxy()?;
    println!("kube-proxy (VM nodes)   {}", kube_proxy.display());
    Ok(())
}
