//! kubectl's connection conventions against a real API server: the
//! `KUBECONFIG` list merged as kubectl merges it, `--context`, `--server`,
//! `--token`, `--certificate-authority`, `--insecure-skip-tls-verify`,
//! `--as`, exec credential plugins, `proxy-url`, and the errors: an
//! unreachable API server is reported as unreachable with its URL.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use confidential_testenv::{TestCluster, unique_name};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Runs the plugin with a clean environment: no KUBECONFIG, a HOME without
/// ~/.kube, plus `env`.
fn plugin(home: &Path, env: &[(&str, String)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"));
    cmd.env_remove("KUBECONFIG").env("HOME", home).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kubectl-confidential")
}

async fn run(home: &Path, env: Vec<(&'static str, String)>, args: Vec<String>) -> Result<Output> {
    let home = home.to_owned();
    Ok(tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        plugin(&home, &env, &args)
    })
    .await?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A service account bound to cluster-admin, and a token for it.
async fn admin_token(cluster: &TestCluster) -> Result<String> {
    let name = unique_name("plugin-admin");
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), "default");
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": name } }))?,
    )
    .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
        "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": "default" }],
    }))?;
    Api::<ClusterRoleBinding>::all(cluster.client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = sas
        .create_token_request(&name, &PostParams::default(), &request)
        .await?;
    answer
        .status
        .map(|s| s.token)
        .context("the API server issued no token")
}

/// An HTTP CONNECT proxy on loopback that counts the tunnels it opened.
async fn connect_proxy() -> Result<(String, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let counter = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(client);
                let mut line = String::new();
                reader.read_line(&mut line).await?;
                let target = line
                    .strip_prefix("CONNECT ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .context("not a CONNECT request")?
                    .to_owned();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).await?;
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                }
                let mut upstream = tokio::net::TcpStream::connect(&target).await?;
                let mut client = reader.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await?;
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                anyhow::Ok(())
            });
        }
    });
    Ok((addr, tunnels))
}

fn kubeconfig(server: &str, ca_b64: &str, user_yaml: &str, extra_cluster: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\n{extra_cluster}\
         users:\n- name: u\n  user:\n{user_yaml}\
         contexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\ncurrent-context: ctx\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flags_and_kubeconfigs_work_like_kubectl() -> Result<()> {
    use base64::Engine;
    let cluster = TestCluster::start().await?;
    let cp = cluster
        .control_plane
        .as_ref()
        .context("private control plane")?;
    let server = cp.server.clone();
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(&cp.ca_pem);
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let ca_file = home.join("ca.pem");
    std::fs::write(&ca_file, &cp.ca_pem)?;
    let token = admin_token(&cluster).await?;
    let version = |extra: &[&str]| {
        let mut args = strings(extra);
        args.extend(strings(&["version", "-o", "json"]));
        args
    };
    let server_version = |out: &Output| -> Result<String> {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(json["server"]["kubernetesVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned())
    };

    // No kubeconfig at all: --server, --token, --certificate-authority.
    let ca = ca_file.display().to_string();
    let out = run(
        home,
        vec![],
        version(&[
            "--server",
            &server,
            "--token",
            &token,
            "--certificate-authority",
            &ca,
        ]),
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        server_version(&out)?.starts_with("v1."),
        "{}",
        text(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["clientVersion"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["server"]["gate"]["installed"], false);
    // Without the CA the server certificate is not trusted...
    let out = run(
        home,
        vec![],
        version(&["--server", &server, "--token", &token]),
    )
    .await?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&server), "{}", text(&out.stderr));
    // ...unless verification is switched off.
    let out = run(
        home,
        vec![],
        version(&[
            "--server",
            &server,
            "--token",
            &token,
            "--insecure-skip-tls-verify",
        ]),
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // --as impersonates: an unknown user may not read Deployments.
    let out = run(
        home,
        vec![],
        version(&[
            "--server",
            &server,
            "--token",
            &token,
            "--certificate-authority",
            &ca,
            "--as",
            "nobody",
        ]),
    )
    .await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("forbids"),
        "{}",
        text(&out.stderr)
    );

    // KUBECONFIG=a:b — clusters/users in one file, the context in the other.
    let token_user = format!("    token: {token}\n");
    let a = home.join("a.yaml");
    let b = home.join("b.yaml");
    std::fs::write(
        &a,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\n\
             users:\n- name: u\n  user:\n{token_user}"
        ),
    )?;
    std::fs::write(
        &b,
        "apiVersion: v1\nkind: Config\ncontexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\ncurrent-context: ctx\n",
    )?;
    let list = format!("{}:{}", a.display(), b.display());
    let out = run(home, vec![("KUBECONFIG", list)], version(&[])).await?;
    assert!(
        out.status.success(),
        "KUBECONFIG list: {}",
        text(&out.stderr)
    );
    assert!(server_version(&out)?.starts_with("v1."));
    // b alone names a cluster it does not define.
    let out = run(
        home,
        vec![("KUBECONFIG", b.display().to_string())],
        version(&[]),
    )
    .await?;
    assert!(!out.status.success());

    // --context picks a context other than the current one (which is dead).
    let two = home.join("two.yaml");
    std::fs::write(
        &two,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\n\
             - name: dead\n  cluster:\n    server: https://127.0.0.1:1\n\
             users:\n- name: u\n  user:\n{token_user}\
             contexts:\n- name: good\n  context:\n    cluster: c\n    user: u\n- name: bad\n  context:\n    cluster: dead\n    user: u\ncurrent-context: bad\n"
        ),
    )?;
    let kc = two.display().to_string();
    let out = run(home, vec![], version(&["--kubeconfig", &kc])).await?;
    assert!(!out.status.success(), "the current context is dead");
    let out = run(
        home,
        vec![],
        version(&["--kubeconfig", &kc, "--context", "good"]),
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(
        home,
        vec![],
        version(&["--kubeconfig", &kc, "--cluster", "c"]),
    )
    .await?;
    assert!(out.status.success(), "--cluster: {}", text(&out.stderr));
    // --server overrides the kubeconfig's server (its CA still applies).
    let wrong_server = home.join("wrong-server.yaml");
    std::fs::write(
        &wrong_server,
        kubeconfig("https://127.0.0.1:1", &ca_b64, &token_user, ""),
    )?;
    let wrong_server = wrong_server.display().to_string();
    let out = run(
        home,
        vec![],
        version(&["--kubeconfig", &wrong_server, "--server", &server]),
    )
    .await?;
    assert!(out.status.success(), "--server: {}", text(&out.stderr));

    // Exec credential plugin (as cloud providers' kubeconfigs use).
    let exec_user = format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n      args:\n      - -c\n      - 'printf %s \"{{\\\"apiVersion\\\":\\\"client.authentication.k8s.io/v1\\\",\\\"kind\\\":\\\"ExecCredential\\\",\\\"status\\\":{{\\\"token\\\":\\\"{token}\\\"}}}}\"'\n      interactiveMode: Never\n"
    );
    let exec = home.join("exec.yaml");
    std::fs::write(&exec, kubeconfig(&server, &ca_b64, &exec_user, ""))?;
    let out = run(
        home,
        vec![],
        version(&["--kubeconfig", &exec.display().to_string()]),
    )
    .await?;
    assert!(out.status.success(), "exec auth: {}", text(&out.stderr));

    // proxy-url: the connection goes through the HTTP CONNECT proxy.
    let (proxy, tunnels) = connect_proxy().await?;
    let proxied = home.join("proxied.yaml");
    std::fs::write(
        &proxied,
        kubeconfig(&server, &ca_b64, &token_user, "").replace(
            "    certificate-authority-data",
            &format!("    proxy-url: http://{proxy}\n    certificate-authority-data"),
        ),
    )?;
    let out = run(
        home,
        vec![],
        version(&["--kubeconfig", &proxied.display().to_string()]),
    )
    .await?;
    assert!(out.status.success(), "proxy-url: {}", text(&out.stderr));
    assert!(
        tunnels.load(Ordering::SeqCst) >= 1,
        "no request went through the proxy"
    );

    // An unreachable API server is reported as unreachable, with its URL.
    let dead = home.join("dead.yaml");
    std::fs::write(
        &dead,
        kubeconfig("https://127.0.0.1:1", &ca_b64, &token_user, ""),
    )?;
    let dead = dead.display().to_string();
    let out = run(home, vec![], strings(&["--kubeconfig", &dead, "status"])).await?;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("unreachable") && stderr.contains("https://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("kubectl confidential init"),
        "not a missing install: {stderr}"
    );
    let out = run(home, vec![], strings(&["--kubeconfig", &dead, "version"])).await?;
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains(&format!("Client Version: v{}", env!("CARGO_PKG_VERSION"))));
    assert!(
        text(&out.stderr).contains("unreachable"),
        "{}",
        text(&out.stderr)
    );
    // `version --client` never contacts the cluster.
    let out = run(
        home,
        vec![],
        strings(&["--kubeconfig", &dead, "version", "--client"]),
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // No kubeconfig anywhere: say how to point at a cluster.
    let out = run(home, vec![], strings(&["status"])).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--kubeconfig"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
