//! `kubectl confidential measurements` as subcommands of the real binary:
//! the file `compute` writes is exactly what `sign` signs (and what cosign
//! signs as a blob), `verify`/`fetch` refuse anything that does not verify,
//! `add` shows a diff, applies only with `--yes`, and changes nothing when the
//! signature fails (real API server). cosign compatibility both ways with a
//! real cosign built from its Go module.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use confidential_api::AttestationPolicy;
use confidential_testenv::fixtures::Publisher;
use confidential_testenv::{TestCluster, crds_dir, install_crds, unique_name};
use kube::api::{Api, PostParams};
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn plugin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A publisher: key pair on disk, a computed measurement file and its
/// signature made by the `sign` subcommand.
struct Published {
    dir: tempfile::TempDir,
    publisher: Publisher,
}

impl Published {
    fn new(image: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let publisher = Publisher::random("acme");
        std::fs::write(
            dir.path().join("publisher.key"),
            publisher
                .signing_key()
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .as_bytes(),
        )?;
        publisher.write_public_key(&dir.path().join("publisher.pub"))?;
        std::fs::write(dir.path().join("kernel"), b"kernel bytes")?;
        let kernel = dir.path().join("kernel").display().to_string();
        let out = plugin(&[
            "measurements",
            "compute",
            "--image",
            image,
            "--pcr",
            &format!("4={kernel},sha256:{}", "11".repeat(32)),
            "--pcr",
            &format!("9=sha256:{}", "22".repeat(32)),
            "--warn-only",
            "9",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        std::fs::write(dir.path().join("m.json"), &out.stdout)?;
        let published = Self { dir, publisher };
        let out = plugin(&[
            "measurements",
            "sign",
            "--key",
            &published.p("publisher.key"),
            &published.p("m.json"),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        std::fs::write(published.dir.path().join("m.json.sig"), &out.stdout)?;
        Ok(published)
    }

    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[test]
fn the_file_on_disk_is_exactly_what_is_signed() -> Result<()> {
    let publisher = Published::new("registry.example/node:v1")?;
    let bytes = std::fs::read(publisher.p("m.json"))?;
    assert!(bytes.ends_with(b"}}\n"), "{}", text(&bytes));
    // The signature is over the raw file bytes, as `cosign sign-blob` signs.
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(std::fs::read_to_string(publisher.p("m.json.sig"))?.trim())?;
    let signature =
        p256::ecdsa::Signature::from_der(&der).map_err(|e| anyhow::anyhow!("signature: {e}"))?;
    publisher
        .publisher
        .signing_key()
        .verifying_key()
        .verify(&bytes, &signature)
        .map_err(|e| anyhow::anyhow!("the signature is not over the file's bytes: {e}"))?;

    let verify = |file: &str, key: &str, extra: &[&str]| {
        let mut args = vec!["measurements", "verify", "--key", key, "--signature"];
        let sig = format!("@{}", publisher.p("m.json.sig"));
        args.push(&sig);
        args.extend_from_slice(extra);
        args.push(file);
        plugin(&args.iter().map(|s| &**s).collect::<Vec<_>>())
    };
    let out = verify(&publisher.p("m.json"), &publisher.p("publisher.pub"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Verified OK"));
    let out = verify(
        &publisher.p("m.json"),
        &publisher.p("publisher.pub"),
        &["--image", "registry.example/node:v2"],
    );
    assert!(!out.status.success(), "another image");

    // Another key does not verify.
    let other = Published::new("registry.example/node:v1")?;
    let out = verify(&publisher.p("m.json"), &other.p("publisher.pub"), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not signed by"),
        "{}",
        text(&out.stderr)
    );

    // Any change to the bytes, even formatting, is refused by sign and verify.
    for (name, changed) in [
        (
            "spaced.json",
            String::from_utf8(bytes.clone())?.replace(",\"", ", \""),
        ),
        (
            "no-newline.json",
            String::from_utf8(bytes.clone())?.trim_end().to_owned(),
        ),
    ] {
        let path = publisher.dir.path().join(name);
        std::fs::write(&path, &changed)?;
        let path = path.display().to_string();
        let out = verify(&path, &publisher.p("publisher.pub"), &[]);
        assert!(!out.status.success(), "{name} verified");
        let out = plugin(&[
            "measurements",
            "sign",
            "--key",
            &publisher.p("publisher.key"),
            &path,
        ]);
        assert!(!out.status.success(), "{name} was signed");
        assert!(
            text(&out.stderr).contains("canonical"),
            "{}",
            text(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn fetch_saves_only_verified_files() -> Result<()> {
    let publisher = Published::new("registry.example/node:v1")?;
    let out_dir = tempfile::tempdir()?;
    let saved = out_dir.path().join("saved.json");
    let saved_s = saved.display().to_string();
    let out = plugin(&[
        "measurements",
        "fetch",
        "--file",
        &publisher.p("m.json"),
        "--publisher-key",
        &publisher.p("publisher.pub"),
        "--output-file",
        &saved_s,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(&saved)?,
        std::fs::read(publisher.p("m.json"))?
    );
    assert!(out_dir.path().join("saved.json.sig").exists());

    // Signed by someone else: refused, nothing saved.
    let other = Published::new("registry.example/node:v1")?;
    std::fs::remove_file(&saved)?;
    let out = plugin(&[
        "measurements",
        "fetch",
        "--file",
        &publisher.p("m.json"),
        "--publisher-key",
        &other.p("publisher.pub"),
        "--output-file",
        &saved_s,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing was saved"),
        "{}",
        text(&out.stderr)
    );
    assert!(!saved.exists());
    Ok(())
}

/// Serves `files` (path → bytes) over plain HTTP on loopback.
async fn serve_files(files: Vec<(String, Vec<u8>)>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let files = files.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await?;
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let response = match files.iter().find(|(p, _)| *p == path) {
                    Some((_, body)) => [
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes(),
                        body.clone(),
                    ]
                    .concat(),
                    None => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                stream.write_all(&response).await?;
                anyhow::Ok(())
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_downloads_the_file_and_its_signature() -> Result<()> {
    let publisher = Published::new("registry.example/node:v1")?;
    let addr = serve_files(vec![
        ("/v1/m.json".into(), std::fs::read(publisher.p("m.json"))?),
        (
            "/v1/m.json.sig".into(),
            std::fs::read(publisher.p("m.json.sig"))?,
        ),
    ])
    .await?;
    let cwd = tempfile::tempdir()?;
    let url = format!("http://{addr}/v1/m.json");
    let key = publisher.p("publisher.pub");
    let cwd_path = cwd.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
            .current_dir(&cwd_path)
            .args([
                "measurements",
                "fetch",
                "--url",
                &url,
                "--publisher-key",
                &key,
                "--image",
                "registry.example/node:v1",
            ])
            .output()
    })
    .await??;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(cwd.path().join("m.json"))?,
        std::fs::read(publisher.p("m.json"))?
    );
    let missing = format!("http://{addr}/v1/absent.json");
    let key = publisher.p("publisher.pub");
    let out = tokio::task::spawn_blocking(move || {
        plugin(&[
            "measurements",
            "fetch",
            "--url",
            &missing,
            "--publisher-key",
            &key,
        ])
    })
    .await?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    Ok(())
}

fn plugin_kc(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_shows_a_diff_applies_with_yes_and_refuses_bad_signatures() -> Result<()> {
    let cluster = TestCluster::start().await?;
    install_crds(&cluster.client, &crds_dir()).await?;
    let publisher = Published::new("registry.example/node:v2")?;
    let name = unique_name("policy");
    let policies: Api<AttestationPolicy> = Api::all(cluster.client.clone());
    let policy: AttestationPolicy = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "evidenceKinds": ["Tpm"],
                  "publishers": [{ "name": "acme", "publicKey": std::fs::read_to_string(publisher.p("publisher.pub"))? }] }
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    let before = policies.get(&name).await?;
    let kc = cluster.kubeconfig.clone();
    let run = |extra: Vec<String>| {
        let kc = kc.clone();
        let mut args = vec![
            "measurements".to_owned(),
            "add".into(),
            "--policy".into(),
            name.clone(),
        ];
        args.extend(extra);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            plugin_kc(&kc, &args)
        })
    };
    let file_args = vec![
        "--file".to_owned(),
        publisher.p("m.json"),
        "--publisher-key".into(),
        publisher.p("publisher.pub"),
    ];

    // A bad signature: refused, nothing changed.
    let other = Published::new("registry.example/node:v2")?;
    let mut bad = file_args.clone();
    bad.extend([
        "--signature".to_owned(),
        format!("@{}", other.p("m.json.sig")),
        "--yes".into(),
    ]);
    let out = run(bad).await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the policy was not changed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        policies.get(&name).await?.metadata.resource_version,
        before.metadata.resource_version
    );

    // Without --yes: the diff, nothing changed.
    let out = run(file_args.clone()).await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let diff = text(&out.stdout);
    assert!(
        diff.contains("+ ") && diff.contains("registry.example/node:v2") && diff.contains("--yes"),
        "{diff}"
    );
    assert_eq!(
        policies.get(&name).await?.metadata.resource_version,
        before.metadata.resource_version
    );

    // With --yes: applied, and the cluster's own check accepts the entry.
    let mut yes = file_args.clone();
    yes.push("--yes".into());
    let out = run(yes.clone()).await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = policies.get(&name).await?;
    assert_eq!(after.spec.images.len(), 1);
    confidential_webhook::verify::verify_entry(&after.spec.publishers, &after.spec.images[0])
        .map_err(anyhow::Error::msg)?;
    // Again: nothing to change.
    let out = run(yes).await?;
    assert!(
        text(&out.stdout).contains("nothing to change"),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

#[test]
fn cosign_and_the_plugin_verify_each_others_signatures() -> Result<()> {
    let cosign = confidential_testenv::binaries::ensure_cosign()?;
    let publisher = Published::new("registry.example/node:v1")?;
    let dir = publisher.dir.path();
    // Ours → cosign verify-blob.
    let out = Command::new(&cosign)
        .args([
            "verify-blob",
            "--key",
            &publisher.p("publisher.pub"),
            "--signature",
            &publisher.p("m.json.sig"),
            "--insecure-ignore-tlog=true",
            &publisher.p("m.json"),
        ])
        .output()?;
    assert!(
        out.status.success(),
        "cosign verify-blob: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // cosign sign-blob --key → ours.
    let out = Command::new(&cosign)
        .current_dir(dir)
        .env("COSIGN_PASSWORD", "")
        .args(["generate-key-pair"])
        .output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new(&cosign)
        .env("COSIGN_PASSWORD", "")
        .args([
            "sign-blob",
            "--yes",
            "--tlog-upload=false",
            "--key",
            &publisher.p("cosign.key"),
            &publisher.p("m.json"),
        ])
        .output()?;
    assert!(
        out.status.success(),
        "cosign sign-blob: {}",
        text(&out.stderr)
    );
    let signature = text(&out.stdout).trim().to_owned();
    let out = plugin(&[
        "measurements",
        "verify",
        "--key",
        &publisher.p("cosign.pub"),
        "--signature",
        &signature,
        &publisher.p("m.json"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // And cosign refuses what another key signed, like ours does.
    let out = Command::new(&cosign)
        .args([
            "verify-blob",
            "--key",
            &publisher.p("cosign.pub"),
            "--signature",
            &publisher.p("m.json.sig"),
            "--insecure-ignore-tlog=true",
            &publisher.p("m.json"),
        ])
        .output()?;
    assert!(!out.status.success());
    let out = plugin(&[
        "measurements",
        "verify",
        "--key",
        &publisher.p("publisher.pub"),
        "--signature",
        &signature,
        &publisher.p("m.json"),
    ]);
    assert!(!out.status.success());
    Ok(())
}
