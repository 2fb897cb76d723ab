//! A newc ("070701") cpio writer for the node image's initramfs.
//!
//! Written here rather than shelling out to `cpio`/`find` so that the archive
//! is reproducible by construction: entries are sorted by path, inode numbers
//! are their position, every mtime is the image's fixed epoch, owners are
//! root, and no path of the build machine appears in the archive. The kernel
//! unpacks exactly this format (`Documentation/driver-api/early-userspace`).

use std::collections::BTreeMap;

/// What an archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    /// A regular file with its permission bits (e.g. 0o755).
    File {
        mode: u32,
        contents: Vec<u8>,
    },
    Symlink {
        target: String,
    },
}

/// Why an archive could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("archive path {0:?} must be relative, without `.`/`..` components or empty parts")]
    BadPath(String),
    #[error("archive path {0:?} is added twice")]
    Duplicate(String),
    #[error("{0:?} is {1} bytes; newc stores sizes in 32 bits")]
    TooLarge(String, usize),
}

/// An archive being assembled: paths relative to `/`, kept sorted.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, EntryKind>,
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(())
}

impl Archive {
    /// Adds an entry and any missing parent directories.
    pub fn add(&mut self, path: &str, kind: EntryKind) -> Result<(), CpioError> {
        check_path(path)?;
        if let Some(existing) = self.entries.get(path) {
            // A directory named twice (e.g. as a parent and explicitly) is harmless.
            if *existing == EntryKind::Directory && kind == EntryKind::Directory {
                return Ok(());
            }
            return Err(CpioError::Duplicate(path.to_owned()));
        }
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), EntryKind::Directory);
                }
                Some(EntryKind::Directory) => {}
                Some(_) => return Err(CpioError::Duplicate(parent)),
            }
        }
        self.entries.insert(path.to_owned(), kind);
        Ok(())
    }

    /// The paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The newc bytes: entries in path order, inode = position, uid/gid 0,
    /// every mtime `mtime`, then the trailer.
    pub fn to_newc(&self, mtime: u32) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        for (index, (path, kind)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match kind {
                EntryKind::Directory => (0o040_755, &[]),
                EntryKind::File { mode, contents } => (0o100_000 | (mode & 0o7777), contents),
                EntryKind::Symlink { target } => (0o120_777, target.as_bytes()),
            };
            let size = u32::try_from(data.len())
                .map_err(|_| CpioError::TooLarge(path.clone(), data.len()))?;
            let nlink = if *kind == EntryKind::Directory { 2 } else { 1 };
            let ino =
                u32::try_from(index + 1).map_err(|_| CpioError::TooLarge(path.clone(), index))?;
            write_header(&mut out, ino, mode, nlink, mtime, size, path);
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        write_header(&mut out, 0, 0, 1, 0, 0, "TRAILER!!!");
        Ok(out)
    }
}

fn write_header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    name: &str,
) {
    // Name length includes the terminating NUL; the length fits: paths are
    // built by this program and far below 4 GiB.
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        mtime,
        size,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        u32::try_from(name_size).unwrap_or(u32::MAX),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &[u8]) -> EntryKind {
        EntryKind::File {
            mode: 0o644,
            contents: contents.to_vec(),
        }
    }

    #[test]
    fn entries_are_sorted_with_parents_first_whatever_the_insertion_order() {
        let mut a = Archive::default();
        a.add("usr/bin/tool", file(b"x")).expect("add");
        a.add("init", file(b"#!")).expect("add");
        a.add("etc/os-release", file(b"ID=x")).expect("add");
        let mut b = Archive::default();
        b.add("etc/os-release", file(b"ID=x")).expect("add");
        b.add("init", file(b"#!")).expect("add");
        b.add("usr/bin/tool", file(b"x")).expect("add");
        assert_eq!(
            a.paths().collect::<Vec<_>>(),
            [
                "etc",
                "etc/os-release",
                "init",
                "usr",
                "usr/bin",
                "usr/bin/tool"
            ]
        );
        assert_eq!(a.to_newc(1).expect("a"), b.to_newc(1).expect("b"));
    }

    #[test]
    fn newc_layout_matches_the_format() {
        let mut a = Archive::default();
        a.add("hello", file(b"hi\n")).expect("add");
        let bytes = a.to_newc(7).expect("newc");
        // Header: magic + 13 fields of 8 hex digits = 110 bytes, then "hello\0"
        // padded to a multiple of 4 (116), then the data padded (120).
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001", "inode");
        assert_eq!(&bytes[14..22], b"000081A4", "regular file 0644");
        assert_eq!(&bytes[46..54], b"00000007", "mtime");
        assert_eq!(&bytes[54..62], b"00000003", "size");
        assert_eq!(&bytes[94..102], b"00000006", "name size with NUL");
        assert_eq!(&bytes[110..116], b"hello\0");
        assert_eq!(&bytes[116..119], b"hi\n");
        assert_eq!(&bytes[120..126], b"070701", "trailer header is aligned");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn refuses_bad_paths_and_duplicates() {
        let mut a = Archive::default();
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/"] {
            assert_eq!(
                a.add(bad, file(b"")),
                Err(CpioError::BadPath(bad.to_owned())),
                "{bad:?}"
            );
        }
        a.add("a/b", file(b"1")).expect("add");
        assert_eq!(
            a.add("a/b", file(b"2")),
            Err(CpioError::Duplicate("a/b".into()))
        );
        assert_eq!(
            a.add("a/b/c", file(b"2")),
            Err(CpioError::Duplicate("a/b".into()))
        );
        a.add("a", EntryKind::Directory)
            .expect("a directory again is fine");
        assert_eq!(a.paths().count(), 2, "refused entries changed nothing");
    }
}
