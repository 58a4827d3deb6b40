//! Confinement of paths that come from files rather than from the user's
//! command line: backing references in image headers, image and memory
//! names in the manifest, the merge journal's image names.
//!
//! A tree directory may have been copied from someone else, so every name
//! read from it is hostile until checked. Every such name goes through
//! this one module before anything opens, writes or removes the file it
//! names; callers never join and canonicalize names themselves.
//!
//! Two strengths:
//! - [`Confine::reference`]: a name an image or the manifest uses to
//!   *read* another file (a backing file, a memory source). It may be
//!   absolute (libvirt writes absolute backing names) or climb with `..`,
//!   as long as the file it finally resolves to, after every symlink, lies
//!   inside the tree directory, unless the user opted into external files
//!   (`--allow-external-backing`).
//! - [`Confine::record`]: a name snaptree itself wrote into its own
//!   records (journal, manifest) and may act on destructively (remove,
//!   repair, patch). It must be a plain relative path with no `.`/`..`
//!   component, no component may be a symlink, and it must lie inside the
//!   tree directory: snaptree never writes anything else there, so
//!   anything else is refused, whatever the options.

use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// A name refused by the confinement check.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a name snaptree accepts from that source (see the module docs).
    #[error("{} {why}", shown(.name))]
    Invalid { name: String, why: String },
    /// The file it names does not exist or cannot be resolved.
    #[error("{} resolves to {path}: {source}", shown(.name), path = .path.display())]
    Missing {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// It resolves outside the tree directory.
    #[error("{} resolves to {target}, outside the tree directory {root} (allowed only with --allow-external-backing)", shown(.name), target = .target.display(), root = .root.display())]
    Outside {
        name: String,
        target: PathBuf,
        root: PathBuf,
    },
}

impl Refused {
    /// The name as it was read.
    pub fn name(&self) -> &str {
        match self {
            Refused::Invalid { name, .. }
            | Refused::Missing { name, .. }
            | Refused::Outside { name, .. } => name,
        }
    }
}

fn refuse(name: &str, why: impl Into<String>) -> Refused {
    Refused::Invalid {
        name: name.to_string(),
        why: why.into(),
    }
}

/// The tree directory names are confined to.
#[derive(Clone, Debug)]
pub struct Confine {
    /// Canonical path of the tree directory.
    root: PathBuf,
    allow_external: bool,
}

impl Confine {
    /// Confines names to `root` (canonicalized here). `allow_external`
    /// lets [`Confine::reference`] names leave it.
    pub fn new(root: &Path, allow_external: bool) -> std::io::Result<Confine> {
        Ok(Confine {
            root: root.canonicalize()?,
            allow_external,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The canonical path of the existing regular file (or block device)
    /// `name` refers to, relative to `base` (the directory of the file
    /// holding the name) when not absolute. Inside the tree, unless
    /// external files are allowed.
    pub fn reference(&self, base: &Path, name: &str) -> Result<PathBuf, Refused> {
        basic_checks(name)?;
        let path = base.join(name);
        let canon = path.canonicalize().map_err(|source| Refused::Missing {
            name: name.to_string(),
            path: path.clone(),
            source,
        })?;
        if !self.allow_external && !canon.starts_with(&self.root) {
            return Err(Refused::Outside {
                name: name.to_string(),
                target: canon,
                root: self.root.clone(),
            });
        }
        // Only regular files and block devices hold images or memory: a
        // FIFO would block the opener forever, a directory is no disk.
        let kind = std::fs::metadata(&canon)
            .map(|m| m.file_type())
            .map_err(|source| Refused::Missing {
                name: name.to_string(),
                path: canon.clone(),
                source,
            })?;
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(refuse(
                name,
                format!(
                    "resolves to {}, which is {}, not a regular file or block device",
                    canon.display(),
                    crate::input::kind_name(kind)
                ),
            ));
        }
        Ok(canon)
    }

    /// The path of `name`, a file snaptree's own records name relative to
    /// the tree directory: plain components only, none of them a symlink,
    /// inside the tree. The file itself need not exist (a journal names
    /// files a merge may already have removed).
    pub fn record(&self, name: &str) -> Result<PathBuf, Refused> {
        basic_checks(name)?;
        let rel = Path::new(name);
        let mut path = self.root.clone();
        for c in rel.components() {
            match c {
                Component::Normal(part) => path.push(part),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse(
                        name,
                        "is absolute; snaptree's records name files relative to the tree directory",
                    ))
                }
                Component::CurDir | Component::ParentDir => {
                    return Err(refuse(
                        name,
                        "contains '.' or '..'; snaptree's records never do",
                    ))
                }
            }
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(
                        name,
                        format!(
                            "{} is a symbolic link; snaptree's records name real files",
                            path.display()
                        ),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(refuse(name, format!("{}: {e}", path.display()))),
            }
        }
        if path == self.root {
            return Err(refuse(name, "names the tree directory itself"));
        }
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if !m.file_type().is_file() {
                return Err(refuse(
                    name,
                    format!("{} is not a regular file", path.display()),
                ));
            }
        }
        Ok(path)
    }

    /// `path` as snaptree's records name it: relative to the tree
    /// directory when inside it, else absolute.
    pub fn name_of(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }
}

/// The directory `name` inside the tree directory `root`, created if
/// missing, refused if that name is a symlink or no directory: snaptree
/// writes and removes files in its own directories, which must not lead
/// out of the tree.
pub fn own_dir(root: &Path, name: &str) -> std::io::Result<PathBuf> {
    let path = root.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_dir() => Ok(path),
        Ok(_) => Err(std::io::Error::other(format!(
            "{} is not a directory (a symbolic link?); snaptree keeps its own files there",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&path)?;
            Ok(path)
        }
        Err(e) => Err(e),
    }
}

/// Whether `path` is a real directory (not a symlink to one).
pub fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

/// `name` quoted for a message, cut short when long: a crafted file may
/// hold names of any length, and `status` must stay readable.
pub fn shown(name: &str) -> String {
    const MAX: usize = 80;
    match name.char_indices().nth(MAX) {
        None => format!("{name:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &name[..cut], name.len()),
    }
}

/// What no name may be, whatever it is for.
fn basic_checks(name: &str) -> Result<(), Refused> {
    if name.is_empty() {
        return Err(refuse(name, "is empty"));
    }
    if name.contains('\0') {
        return Err(refuse(name, "contains a NUL byte"));
    }
    if name.len() > 4096 {
        return Err(refuse(name, "is longer than 4096 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Confine) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("tree")).unwrap();
        std::fs::write(t.path().join("outside"), b"x").unwrap();
        std::fs::write(t.path().join("tree/in.qcow2"), b"x").unwrap();
        std::fs::create_dir(t.path().join("tree/sub")).unwrap();
        std::fs::write(t.path().join("tree/sub/b.qcow2"), b"x").unwrap();
        std::os::unix::fs::symlink("../outside", t.path().join("tree/link-out")).unwrap();
        std::os::unix::fs::symlink("in.qcow2", t.path().join("tree/link-in")).unwrap();
        std::os::unix::fs::symlink("..", t.path().join("tree/up")).unwrap();
        let c = Confine::new(&t.path().join("tree"), false).unwrap();
        (t, c)
    }

    #[test]
    fn records_are_plain_relative_names_inside() {
        let (_t, c) = setup();
        assert_eq!(c.record("in.qcow2").unwrap(), c.root().join("in.qcow2"));
        assert_eq!(
            c.record("sub/b.qcow2").unwrap(),
            c.root().join("sub/b.qcow2")
        );
        assert_eq!(c.record("gone.qcow2").unwrap(), c.root().join("gone.qcow2"));
        for bad in [
            "../outside",
            "/etc/passwd",
            "sub/../in.qcow2",
            "./in.qcow2",
            "link-out",
            "link-in",
            "up/outside",
            "sub",
            "",
            "a\0b",
        ] {
            assert!(c.record(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn references_resolve_inside_unless_allowed() {
        let (t, c) = setup();
        let root = c.root().to_path_buf();
        assert_eq!(
            c.reference(&root, "in.qcow2").unwrap(),
            root.join("in.qcow2")
        );
        assert_eq!(
            c.reference(&root, "link-in").unwrap(),
            root.join("in.qcow2")
        );
        assert_eq!(
            c.reference(&root.join("sub"), "../in.qcow2").unwrap(),
            root.join("in.qcow2")
        );
        let abs = root.join("in.qcow2");
        assert!(c.reference(&root, abs.to_str().unwrap()).is_ok());
        for bad in [
            "../outside",
            "link-out",
            "up/outside",
            "missing",
            "/etc/passwd",
        ] {
            let e = c.reference(&root, bad).unwrap_err();
            assert_eq!(e.name(), bad);
        }
        let open = Confine::new(&t.path().join("tree"), true).unwrap();
        assert!(open.reference(&root, "../outside").is_ok());
        assert!(open.record("../outside").is_err(), "records stay confined");
    }
}
