//! Finding or building the control-plane binaries.
//!
//! There is no network access to release buckets, so the binaries are built
//! from the Go modules with the machine's Go toolchain: a generated module
//! requires `k8s.io/kubernetes` at [`KUBERNETES_VERSION`] and maps every staging
//! module (`k8s.io/api`, `k8s.io/apiserver`, ...) to the matching `v0.X.Y`
//! through `replace` lines read from Kubernetes' own `go.mod`; a second module
//! builds etcd from `go.etcd.io/etcd/server/v3`. Results are cached by version
//! under `$CONFIDENTIAL_TESTENV_CACHE`, else `$XDG_CACHE_HOME/kubectl-confidential`,
//! else `~/.cache/kubectl-confidential`, so only the first run pays.
//!
//! When `KUBEBUILDER_ASSETS` names a directory (the controller-runtime envtest
//! convention), any binary found there is used instead of building it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Kubernetes release the control plane is built from.
pub const KUBERNETES_VERSION: &str = "1.35.4";
/// etcd release the control plane is built from.
pub const ETCD_VERSION: &str = "3.6.16";

/// Paths of the four control-plane binaries and of `kubectl` (built from the
/// same module, so tests never depend on a `kubectl` that happens to be on
/// the host's `PATH`).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
}

const KUBE_COMMANDS: [&str; 4] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

/// The directory binaries of this version are cached in.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("CONFIDENTIAL_TESTENV_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| PathBuf::from(d).join("kubectl-confidential"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/kubectl-confidential"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("kubectl-confidential-cache"));
    base.join(format!(
        "controlplane-k8s-v{KUBERNETES_VERSION}-etcd-v{ETCD_VERSION}"
    ))
}

/// Returns the binaries, building (once, under a file lock) any that
/// `KUBEBUILDER_ASSETS` does not provide.
pub fn ensure() -> Result<Binaries> {
    let assets = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from);
    let from_assets = |name: &str| {
        assets
            .as_ref()
            .map(|dir| dir.join(name))
            .filter(|p| p.is_file())
    };
    let cache = cache_dir();
    let bin = cache.join("bin");
    let need_kube = KUBE_COMMANDS
        .iter()
        .any(|c| from_assets(c).is_none() && !bin.join(c).is_file());
    let need_etcd = from_assets("etcd").is_none() && !bin.join("etcd").is_file();
    if need_kube || need_etcd {
        std::fs::create_dir_all(&cache)
            .with_context(|| format!("creating cache dir {}", cache.display()))?;
        let lock = File::create(cache.join(".lock")).context("creating build lock")?;
        lock.lock().context("locking the build cache")?;
        // Another process may have built them while we waited for the lock.
        if need_kube && KUBE_COMMANDS.iter().any(|c| !bin.join(c).is_file()) {
            build_kubernetes(&cache)?;
        }
        if need_etcd && !bin.join("etcd").is_file() {
            build_etcd(&cache)?;
        }
    }
    let pick = |name: &str| from_assets(name).unwrap_or_else(|| bin.join(name));
    Ok(Binaries {
        etcd: pick("etcd"),
        kube_apiserver: pick("kube-apiserver"),
        kube_controller_manager: pick("kube-controller-manager"),
        kube_scheduler: pick("kube-scheduler"),
        kubectl: pick("kubectl"),
    })
}

/// The `kubectl` built with the control plane (or `KUBEBUILDER_ASSETS/kubectl`).
pub fn kubectl() -> Result<PathBuf> {
    Ok(ensure()?.kubectl)
}

/// `go` in `dir`: the local toolchain, modules resolved as needed.
pub(crate) fn go(dir: &Path) -> Command {
    go_command(Command::new("go"), dir)
}

/// `go` under `nice -n 10`: long builds yield to the machine's other work.
pub(crate) fn nice_go(dir: &Path) -> Command {
    let mut nice = Command::new("nice");
    nice.args(["-n", "10", "go"]);
    go_command(nice, dir)
}

fn go_command(mut cmd: Command, dir: &Path) -> Command {
    cmd.current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .stdin(Stdio::null());
    cmd
}

/// Runs a `go` command, its progress on stderr; its stdout on success.
pub(crate) fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| {
        format!("{what}: could not run `go` (is the Go toolchain installed and on PATH?)")
    })?;
    if !out.status.success() {
        bail!("{what} failed with {}; see the Go output above", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{what}: output is not UTF-8"))
}

/// Reads the staging modules from Kubernetes' `go.mod` (`k8s.io/x => ./staging/...`).
fn staging_modules(kubernetes_go_mod: &str) -> Vec<String> {
    kubernetes_go_mod
        .lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches("replace").trim();
            let (module, target) = line.split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim().to_owned())
        })
        .collect()
}

fn write_tools_go(dir: &Path, packages: &[String]) -> Result<()> {
    let imports: String = packages.iter().map(|p| format!("\t_ \"{p}\"\n")).collect();
    std::fs::write(
        dir.join("tools.go"),
        format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n"),
    )
    .context("writing tools.go")
}

fn install(built: &Path, bin: &Path, names: &[&str]) -> Result<()> {
    std::fs::create_dir_all(bin)?;
    for name in names {
        std::fs::rename(built.join(name), bin.join(name))
            .with_context(|| format!("installing {name} into {}", bin.display()))?;
    }
    Ok(())
}

/// The kubelet's own cache directory: built from the same
/// `k8s.io/kubernetes` module and version as the control plane, under its own
/// key so adding it left the control plane's cache valid.
pub fn kubelet_cache_dir() -> PathBuf {
    cache_dir().with_file_name(format!("kubelet-k8s-v{KUBERNETES_VERSION}"))
}

/// The kubelet of [`KUBERNETES_VERSION`] (for the VM node image), built once
/// under a file lock (`KUBEBUILDER_ASSETS/kubelet` is used when present).
pub fn ensure_kubelet() -> Result<PathBuf> {
    ensure_node_command("kubelet")
}

/// kube-proxy of [`KUBERNETES_VERSION`] (the VM node image's Service
/// proxy), built like the kubelet, into the same cache directory.
pub fn ensure_kube_proxy() -> Result<PathBuf> {
    ensure_node_command("kube-proxy")
}

/// A node command of `k8s.io/kubernetes/cmd/` (`KUBEBUILDER_ASSETS/<name>`
/// when present), built once under a file lock.
fn ensure_node_command(name: &str) -> Result<PathBuf> {
    if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let candidate = PathBuf::from(assets).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let cache = kubelet_cache_dir();
    let binary = cache.join("bin").join(name);
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("creating cache dir {}", cache.display()))?;
    let lock = File::create(cache.join(".lock")).context("creating build lock")?;
    lock.lock()
        .context("locking the node commands' build cache")?;
    if !binary.is_file() {
        build_kubernetes_commands(&cache, &[name])?;
    }
    Ok(binary)
}

fn build_kubernetes(cache: &Path) -> Result<()> {
    build_kubernetes_commands(cache, &KUBE_COMMANDS)
}

/// Builds `commands` of `k8s.io/kubernetes/cmd/` into `cache/bin`, with
/// `nice -n 10` so the Go build does not starve the machine's other builds.
fn build_kubernetes_commands(cache: &Path, commands: &[&str]) -> Result<()> {
    let src = cache.join("src-kubernetes");
    std::fs::create_dir_all(&src)?;
    eprintln!(
        "testenv: building {} v{KUBERNETES_VERSION} \
         from the Go modules into {} (first run only; several minutes on 2 cores)",
        commands.join(", "),
        cache.display()
    );
    let mut download = go(&src);
    download.args([
        "mod",
        "download",
        "-json",
        &format!("k8s.io/kubernetes@v{KUBERNETES_VERSION}"),
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&run(download, "go mod download k8s.io/kubernetes")?)
            .context("parsing `go mod download -json` output")?;
    let go_mod_path = info["GoMod"]
        .as_str()
        .context("`go mod download` did not report the go.mod of k8s.io/kubernetes")?;
    let go_mod =
        std::fs::read_to_string(go_mod_path).with_context(|| format!("reading {go_mod_path}"))?;
    let staging = staging_modules(&go_mod);
    if staging.is_empty() {
        bail!("found no staging modules in {go_mod_path}; the Kubernetes go.mod layout changed");
    }
    let staging_version = format!(
        "v0.{}",
        KUBERNETES_VERSION
            .split_once('.')
            .map_or("", |(_, rest)| rest)
    );
    let replaces: String = staging
        .iter()
        .map(|m| format!("replace {m} => {m} {staging_version}\n"))
        .collect();
    std::fs::write(
        src.join("go.mod"),
        format!(
            "module confidential.dev/testenv/kubernetes\n\ngo 1.25\n\nrequire k8s.io/kubernetes v{KUBERNETES_VERSION}\n\n{replaces}"
        ),
    )?;
    let packages: Vec<String> = commands
        .iter()
        .map(|c| format!("k8s.io/kubernetes/cmd/{c}"))
        .collect();
    write_tools_go(&src, &packages)?;
    eprintln!("testenv: resolving modules (go mod tidy)");
    let mut tidy = go(&src);
    tidy.args(["mod", "tidy"]);
    run(tidy, "go mod tidy for Kubernetes")?;
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or("0");
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion=v{KUBERNETES_VERSION} \
         -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/component-base/version.gitTreeState=clean"
    );
    let out = src.join("out");
    std::fs::create_dir_all(&out)?;
    eprintln!("testenv: compiling (go build -v prints each package)");
    let mut build = nice_go(&src);
    build
        .args(["build", "-v", "-ldflags", &ldflags, "-o"])
        .arg(&out)
        .args(&packages);
    run(build, "go build of Kubernetes")?;
    install(&out, &cache.join("bin"), commands)?;
    eprintln!("testenv: Kubernetes binaries ready");
    Ok(())
}

fn build_etcd(cache: &Path) -> Result<()> {
    let src = cache.join("src-etcd");
    std::fs::create_dir_all(&src)?;
    eprintln!(
        "testenv: building etcd v{ETCD_VERSION} from go.etcd.io/etcd/server/v3 (first run only)"
    );
    std::fs::write(
        src.join("go.mod"),
        format!(
            "module confidential.dev/testenv/etcd\n\ngo 1.25\n\nrequire go.etcd.io/etcd/server/v3 v{ETCD_VERSION}\n"
        ),
    )?;
    let package = "go.etcd.io/etcd/server/v3".to_owned();
    write_tools_go(&src, std::slice::from_ref(&package))?;
    let mut tidy = go(&src);
    tidy.args(["mod", "tidy"]);
    run(tidy, "go mod tidy for etcd")?;
    let out = src.join("out");
    std::fs::create_dir_all(&out)?;
    let mut build = go(&src);
    build
        .args(["build", "-v", "-ldflags", "-s -w", "-o"])
        .arg(out.join("etcd"))
        .arg(&package);
    run(build, "go build of etcd")?;
    install(&out, &cache.join("bin"), &["etcd"])?;
    eprintln!("testenv: etcd ready");
    Ok(())
}

/// Krew release used by the plugin installation test.
pub const KREW_VERSION: &str = "0.4.3";

/// Returns the `krew` binary, building it once with `go install` (cached
/// like the control plane; `KREW` names an existing binary instead).
pub fn ensure_krew() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KREW").map(PathBuf::from) {
        return Ok(path);
    }
    let dir = cache_dir().join(format!("krew-v{KREW_VERSION}"));
    let krew = dir.join("krew");
    if krew.is_file() {
        return Ok(krew);
    }
    std::fs::create_dir_all(&dir)?;
    let lock = File::create(dir.join(".lock")).context("creating krew build lock")?;
    lock.lock().context("locking the krew build")?;
    if !krew.is_file() {
        eprintln!("testenv: building krew v{KREW_VERSION} from sigs.k8s.io/krew (first run only)");
        let mut install = go(&dir);
        install.env("GOBIN", &dir).args([
            "install",
            &format!("sigs.k8s.io/krew/cmd/krew@v{KREW_VERSION}"),
        ]);
        run(install, "go install of krew")?;
    }
    Ok(krew)
}

/// cosign release used by the measurement-signature compatibility tests.
pub const COSIGN_VERSION: &str = "2.6.5";

/// Returns the `cosign` binary, building it once with `go install` from
/// `github.com/sigstore/cosign/v2/cmd/cosign` (cached like the control
/// plane, about seven minutes on 2 busy cores; `COSIGN` names an existing
/// binary instead).
pub fn ensure_cosign() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("COSIGN").map(PathBuf::from) {
        return Ok(path);
    }
    let dir = cache_dir().join(format!("cosign-v{COSIGN_VERSION}"));
    let cosign = dir.join("cosign");
    if cosign.is_file() {
        return Ok(cosign);
    }
    std::fs::create_dir_all(&dir)?;
    let lock = File::create(dir.join(".lock")).context("creating cosign build lock")?;
    lock.lock().context("locking the cosign build")?;
    if !cosign.is_file() {
        eprintln!(
            "testenv: building cosign v{COSIGN_VERSION} from github.com/sigstore/cosign/v2 (first run only)"
        );
        let mut install = go(&dir);
        install.env("GOBIN", &dir).args([
            "install",
            "-ldflags",
            "-s -w",
            &format!("github.com/sigstore/cosign/v2/cmd/cosign@v{COSIGN_VERSION}"),
        ]);
        run(install, "go install of cosign")?;
    }
    Ok(cosign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_staging_modules_from_go_mod() {
        let go_mod = "module k8s.io/kubernetes\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tgithub.com/x/y => github.com/x/y v1.0.0\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n)\nreplace k8s.io/kms => ./staging/src/k8s.io/kms\n";
        assert_eq!(
            staging_modules(go_mod),
            ["k8s.io/api", "k8s.io/client-go", "k8s.io/kms"]
        );
    }
}
