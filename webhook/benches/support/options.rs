//! The admission benches' command line (`cargo bench ... -- --seconds 5`).
//! A relative `--out` is taken from the workspace root, so the commands the
//! README shows write where it says whichever directory `cargo bench` runs
//! the bench from (it runs it in the crate's directory).

use std::path::PathBuf;

use anyhow::{Context, Result};

pub struct Options {
    /// Alternating rounds per server (the side-by-side bench).
    pub rounds: usize,
    pub seconds: u64,
    pub connections: usize,
    pub pods: usize,
    pub out: PathBuf,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Options {
    /// `defaults` overridden by `--rounds`, `--seconds`, `--connections`,
    /// `--pods` and `--out` from the process arguments; `defaults.out` is
    /// relative to the workspace root too.
    pub fn parse(defaults: Options) -> Result<Options> {
        let mut o = defaults;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--rounds" => o.rounds = value()?.parse()?,
                "--seconds" => o.seconds = value()?.parse()?,
                "--connections" => o.connections = value()?.parse()?,
                "--pods" => o.pods = value()?.parse()?,
                "--out" => o.out = value()?.into(),
                _ => {} // `cargo bench` passes `--bench`.
            }
        }
        if o.out.is_relative() {
            o.out = workspace_root().join(&o.out);
        }
        Ok(o)
    }
}
