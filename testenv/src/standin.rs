//! Recorded stand-ins for host tools the bootstrapper runs (`cryptsetup`,
//! `kubeadm`): each is a small shell script that records its argv and stdin
//! to files and exits with a code chosen per subcommand, so tests see exactly
//! what the real tool would have been given, whether they call it by path or
//! put [`Standin::dir`] first on a child's `PATH`. Real runs of these tools
//! need device-mapper and a kubelet, which only the VM suite has (this
//! machine's kernel has no device-mapper).
//!
//! ```ignore
//! let cryptsetup = Standin::new("cryptsetup", &[("isLuks", 1)])?;
//! // ... run the bootstrapper with PATH=<cryptsetup.dir()>:$PATH ...
//! assert_eq!(cryptsetup.calls()?[1].argv[0], "luksFormat");
//! ```

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::TempDir;

/// One recorded invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub argv: Vec<String>,
    pub stdin: Vec<u8>,
}

/// A recording stand-in named `name` in its own directory.
pub struct Standin {
    dir: TempDir,
    name: String,
}

impl Standin {
    /// `exits` maps a first argument (subcommand) to its exit code; any
    /// other invocation exits 0.
    pub fn new(name: &str, exits: &[(&str, i32)]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("standin-").tempdir()?;
        let calls = dir.path().join("calls");
        std::fs::create_dir(&calls)?;
        let arms: String = exits
            .iter()
            .map(|(sub, code)| format!("  {sub}) exit {code};;\n"))
            .collect();
        let script = format!(
            "#!/bin/sh\n\
             c='{calls}'/$(ls '{calls}' | wc -l | tr -d ' ')\n\
             mkdir \"$c\"\n\
             for a in \"$@\"; do printf '%s\\0' \"$a\"; done > \"$c/argv\"\n\
             cat > \"$c/stdin\"\n\
             case \"$1\" in\n{arms}esac\n\
             exit 0\n",
            calls = calls.display()
        );
        let program = dir.path().join(name);
        std::fs::write(&program, script).context("writing the stand-in")?;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            dir,
            name: name.to_owned(),
        })
    }

    /// Directory holding the program (put it first on `PATH`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn program(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// `PATH` for a child process with this stand-in first.
    pub fn path_env(&self) -> std::ffi::OsString {
        let mut path = self.dir.path().as_os_str().to_owned();
        if let Some(rest) = std::env::var_os("PATH") {
            path.push(":");
            path.push(rest);
        }
        path
    }

    /// The recorded calls, in order.
    pub fn calls(&self) -> Result<Vec<Call>> {
        let calls = self.dir.path().join("calls");
        let mut entries: Vec<(usize, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&calls)? {
            let entry = entry?;
            let index = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse().ok())
                .context("unexpected file in the calls directory")?;
            entries.push((index, entry.path()));
        }
        entries.sort();
        entries
            .into_iter()
            .map(|(_, dir)| {
                Ok(Call {
                    argv: std::fs::read(dir.join("argv"))
                        .context("argv not recorded")?
                        .split(|b| *b == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                    stdin: std::fs::read(dir.join("stdin")).context("stdin not recorded")?,
                })
            })
            .collect()
    }
}
