//! The shared libraries a dynamically linked binary needs, as `ldd` (Debian's
//! `libc-bin`) resolves them on the build machine. Both the container images
//! and the node image's initramfs carry exactly these files next to the
//! binary, so a library `ldd` cannot find is an error: the image would not
//! start.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The libraries `ldd` lists for `binary` (resolved paths, plus the dynamic
/// loader), in the order ldd prints them.
pub fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd (Debian's libc-bin) on {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Parses ldd's output: `name => /path (addr)` and `/path (addr)` lines, in
/// order; the vDSO has no file and a statically linked binary no library;
/// a library ldd could not find is an error.
pub fn parse(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd cannot find a library on the build machine: {line}");
        }
        let target = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_library_files_in_order_and_skips_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007fc3ac936000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f0)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fc3abcd0000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007fc3ac938000)\n";
        assert_eq!(
            parse(text).expect("parse"),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse("\tstatically linked\n").expect("ok").is_empty());
    }

    #[test]
    fn refuses_a_missing_library() {
        for missing in ["libfoo.so.1", "libtss2-esys.so.0"] {
            let err = parse(&format!("\t{missing} => not found\n")).expect_err("missing");
            assert!(err.to_string().contains(missing), "{err}");
        }
    }
}
