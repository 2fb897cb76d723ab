//! `kubectl confidential measurements`: signed node-image measurement files,
//! for publishers (`compute`, `sign`, `verify`) and for admins (`fetch` a
//! published file and check its signature locally, `add` it to an
//! AttestationPolicy after showing the change).
//!
//! The format: the file on disk is the canonical bytes (see
//! `confidential_attestation::measurements`), signed as `cosign sign-blob
//! --key` signs a blob, so cosign and this plugin sign and verify the same
//! bytes interchangeably.

mod fetch;
pub mod policy;
mod publish;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::connection::ConnectionArgs;
use crate::verify::trust::{read_signature, read_signed_file};

#[derive(Subcommand, Debug)]
pub enum MeasurementsCommand {
    /// Compute the expected PCR values of a node image from its components;
    /// prints the canonical measurement file (redirect it to a file and sign that).
    Compute {
        /// Image reference the measurements are for.
        #[arg(long)]
        image: String,
        /// `PCR=COMPONENT[,COMPONENT...]`; a component is a file path or
        /// `sha256:<hex>`. Components are extended in the order given.
        #[arg(
            long = "pcr",
            required_unless_present = "uki",
            conflicts_with = "uki",
            value_name = "PCR=COMPONENTS"
        )]
        pcrs: Vec<String>,
        /// Predict the PCRs of a measured boot of this node image UKI
        /// (`cargo xtask node-image`) under OVMF with a vTPM: firmware,
        /// systemd-stub and kernel events replayed from the file alone.
        #[arg(long, value_name = "FILE")]
        uki: Option<PathBuf>,
        /// PCRs whose mismatch only warns.
        #[arg(long = "warn-only", value_name = "PCR")]
        warn_only: Vec<String>,
    },
    /// Sign a measurement file with an ECDSA P-256 key (PKCS#8 or SEC1 PEM);
    /// prints the base64 signature `cosign sign-blob --key` would print.
    Sign {
        /// Private key PEM.
        #[arg(long)]
        key: PathBuf,
        /// The measurement file (canonical, as `compute` prints it).
        file: PathBuf,
    },
    /// Verify a measurement file's signature with a publisher public key.
    Verify {
        /// Publisher public key PEM (as `cosign generate-key-pair` writes it).
        #[arg(long)]
        key: PathBuf,
        /// Base64 signature, or `@path` to read it from a file.
        #[arg(long)]
        signature: String,
        /// Also require the file to be for this image.
        #[arg(long)]
        image: Option<String>,
        /// The measurement file.
        file: PathBuf,
    },
    /// Download (or read) a published measurement file and its signature,
    /// verify them with the publisher key, and save them locally.
    Fetch(fetch::FetchArgs),
    /// Put a verified measurement file into an AttestationPolicy: prints the
    /// change, applies it with --yes.
    Add(policy::AddArgs),
}

pub async fn run(connection: &ConnectionArgs, command: &MeasurementsCommand) -> Result<()> {
    match command {
        MeasurementsCommand::Compute {
            image,
            uki: Some(uki),
            warn_only,
            ..
        } => {
            let (file, notes) = publish::predict(image, uki, warn_only)?;
            for note in notes {
                eprintln!("{note}");
            }
            print!("{file}");
            Ok(())
        }
        MeasurementsCommand::Compute {
            image,
            pcrs,
            uki: None,
            warn_only,
        } => {
            let file = publish::compute(image, pcrs, warn_only)?;
            print!("{file}");
            Ok(())
        }
        MeasurementsCommand::Sign { key, file } => {
            let measurement_file = publish::read_canonical(file)?;
            let key = publish::read_signing_key(key)?;
            println!("{}", measurement_file.sign(&key));
            Ok(())
        }
        MeasurementsCommand::Verify {
            key,
            signature,
            image,
            file,
        } => {
            let trusted = read_signed_file(file, Some(signature), &read_key(key)?, key)?;
            if let Some(image) = image {
                trusted
                    .file
                    .verify_for(image, &read_signature(signature)?, &read_key(key)?)
                    .with_context(|| format!("{} is not for image {image}", file.display()))?;
            }
            println!(
                "Verified OK: {} for image {}",
                file.display(),
                trusted.file.image
            );
            Ok(())
        }
        MeasurementsCommand::Fetch(args) => fetch::run(args).await,
        MeasurementsCommand::Add(args) => policy::run(connection, args).await,
    }
}

fn read_key(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the publisher key {}", path.display()))
}
