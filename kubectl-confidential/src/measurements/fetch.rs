//! `measurements fetch`: get a published measurement file and its signature
//! (`--url`, signature at `<url>.sig`, or `--file`, signature at
//! `<file>.sig`), verify both locally with the publisher key, and only then
//! save them, so what lands on disk is always a verified pair ready for
//! `verify --measurements` and `measurements add`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use confidential_attestation::measurements::MeasurementFile;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::verify::trust::read_signature;

/// Largest file accepted (a measurement file is a few hundred bytes).
const MAX_BYTES: usize = 1 << 20;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["url", "file"])))]
pub struct FetchArgs {
    /// URL of the published measurement file (https, or http on loopback).
    #[arg(long)]
    url: Option<String>,
    /// A measurement file already on disk.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The publisher's public key (PEM).
    #[arg(long, value_name = "FILE")]
    publisher_key: PathBuf,
    /// Signature: base64, @FILE, or a URL (default: the source + `.sig`).
    #[arg(long)]
    signature: Option<String>,
    /// Require the file to be for this image.
    #[arg(long)]
    image: Option<String>,
    /// Where to save the verified file (its signature goes to FILE.sig);
    /// default: the URL's file name in the current directory.
    #[arg(short = 'O', long = "output-file", value_name = "FILE")]
    output: Option<PathBuf>,
}

async fn download(url: &str) -> Result<Vec<u8>> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .context("loading the system's CA certificates")?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let response = tokio::time::timeout(std::time::Duration::from_secs(60), client.get(uri))
        .await
        .with_context(|| format!("{url} did not answer within 60s"))?
        .with_context(|| format!("downloading {url}"))?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    if body.len() > MAX_BYTES {
        bail!(
            "{url} is {} bytes; a measurement file is far smaller",
            body.len()
        );
    }
    Ok(body.to_vec())
}

async fn signature_text(value: &str) -> Result<String> {
    if value.starts_with("https://") || value.starts_with("http://") {
        let bytes = download(value).await?;
        return Ok(String::from_utf8_lossy(&bytes).trim().to_owned());
    }
    read_signature(value)
}

fn file_name_of(url: &str) -> Result<PathBuf> {
    let name = url
        .split(['?', '#'])
        .next()
        .and_then(|u| u.rsplit('/').next())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .with_context(|| format!("{url} names no file; pass --output-file"))?;
    Ok(PathBuf::from(name))
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub async fn run(args: &FetchArgs) -> Result<()> {
    let key_pem = std::fs::read_to_string(&args.publisher_key)
        .with_context(|| format!("reading the publisher key {}", args.publisher_key.display()))?;
    let (bytes, default_signature, default_output) = match (&args.url, &args.file) {
        (Some(url), _) => (
            download(url).await?,
            format!("{url}.sig"),
            Some(file_name_of(url)?),
        ),
        (None, Some(file)) => (
            std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
            format!("@{}.sig", file.display()),
            None,
        ),
        (None, None) => bail!("pass --url or --file"),
    };
    let source = args
        .url
        .clone()
        .or_else(|| args.file.as_ref().map(|f| f.display().to_string()))
        .unwrap_or_default();
    let signature = signature_text(args.signature.as_deref().unwrap_or(&default_signature))
        .await
        .context("reading the signature; pass --signature")?;
    let file = MeasurementFile::from_canonical_json(&bytes)
        .with_context(|| format!("{source} is not a measurement file"))?;
    let verified = match &args.image {
        Some(image) => file.verify_for(image, &signature, &key_pem),
        None => file.verify(&signature, &key_pem),
    };
    verified.with_context(|| {
        format!(
            "{source} is not signed by {}; nothing was saved",
            args.publisher_key.display()
        )
    })?;
    let output = args.output.clone().or(default_output);
    if let Some(output) = &output {
        write_new(output, &bytes)?;
        write_new(
            Path::new(&format!("{}.sig", output.display())),
            format!("{signature}\n").as_bytes(),
        )?;
    }
    println!(
        "Verified OK: {source} is image {} with {} PCRs, signed by {}{}",
        file.image,
        file.measurements.pcrs().count(),
        args.publisher_key.display(),
        output
            .map(|o| format!("; saved to {} and {}.sig", o.display(), o.display()))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_name_comes_from_the_url_path() {
        assert_eq!(
            file_name_of("https://x.example/images/v1/measurements.json?x=1").ok(),
            Some(PathBuf::from("measurements.json"))
        );
        assert!(file_name_of("https://x.example/").is_err());
        assert!(file_name_of("https://x.example/..").is_err());
    }
}
